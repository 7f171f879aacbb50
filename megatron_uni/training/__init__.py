"""Training: the step (megatron's schedules over packed batches), loop, optimizer, checkpoints."""
