"""The science of mtkd: tempering and tail models, aggregation operators, weight policies.

The aggregation maths (``tails``, ``tempering``, ``operators``, ``weights``, ``diagnostics``,
``fuse``) is pure numpy: arrays in, arrays out, no I/O.
"""
