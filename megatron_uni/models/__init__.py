"""Uni-Perceiver model pieces as megatron-core modules."""
