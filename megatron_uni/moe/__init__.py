"""Conditional Mixture-of-Experts: routers, expert linears, execution paths, folding."""
