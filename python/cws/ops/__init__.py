"""The operations on checkpoints: extract, apply, compare, export, info, over the streaming engine."""
