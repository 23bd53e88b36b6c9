"""The aggregate stage: teacher stores → fused mixture targets (numpy/numba, no torch).

Pure maths (``tails``, ``tempering``, ``operators``, ``weights``, ``diagnostics``, ``fuse``,
``sampled``: arrays in, arrays out, no I/O) and the job that drives it over store parts (``job``).
"""
