"""Distributed start-up, parallel layout and the CPU backend for megatron-core."""
