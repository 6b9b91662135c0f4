"""Loaded models: in-place steering, the training monitor, activation steering."""
