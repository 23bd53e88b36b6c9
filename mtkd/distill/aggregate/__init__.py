"""The aggregate stage: teacher stores → fused mixture targets (numpy/numba, no torch).

Pure maths, arrays in and arrays out (``tails``, ``tempering``, ``union``, ``imputation``,
``operators``, ``weights``, ``diagnostics``, ``fuse`` and its backends, ``targets``, ``sampled``,
and ``vocab_projection``/``align``/``cross``/``coverage`` for teachers with another
tokenizer), the stage's options
(``config``) and the job that drives it over store parts (``job``).
"""
