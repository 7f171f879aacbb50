"""checkpoints_utils package."""
