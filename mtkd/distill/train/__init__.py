"""The train stage: sparse KD losses, the loader over target + tokens stores, the training loop."""
