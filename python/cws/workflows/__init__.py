"""The user's loops end to end: the demo (train-pair and sweep live here too)."""
