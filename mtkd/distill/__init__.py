"""Distillation: fuse teacher stores into targets (`aggregate`), train a student (`train`).

The two stages never import each other: ``aggregate`` is numpy/numba on CPU batch nodes,
``train`` is torch.
"""
