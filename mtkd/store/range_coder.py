"""A binary range coder with adaptive probabilities, and non-negative integers binarised on it.

Why: zstd sees a store's coded rows as bytes and cannot use what a model of them knows (that a
recurrence bit at reference rank 3 is nearly always set, that a distance to the row's floor
sits near 70). A range coder spends −log₂ p bits on each binary decision whose probability p a
small adaptive model gives, so a row model (``stream_codec``) pays close to its entropy.

The coder is the classic carry-propagating one of LZMA (32-bit range, renormalised a byte at a
time, a cached byte for the carry): probabilities are 12-bit counts of a 0, nudged 1/32 of the
way towards each coded bit. Integers v are coded Elias-gamma style: e = (bit length of v + 1) −
1 in unary (e ones and a zero, the zero left out at e = 39), the top ``TREE_BITS`` bits below
the leading one through a binary tree of adaptive probabilities, the rest as plain bits.
Every function here is ``register_jitable``: numba inlines it into the kernels that call it
(plain Python without numba). State lives in small int64 arrays so that the kernels stay free
of classes:

* encoder ``enc``: [low, range, cache, cache_size, pos] and an output byte buffer;
* decoder ``dec``: [range, code, pos] over an input byte buffer (reads past its end give 0, so
  a damaged stream decodes to garbage that the caller's checks refuse, never out of bounds).
"""

from __future__ import annotations

import numpy as np

try:
    from numba.extending import register_jitable
except ImportError:  # without numba the kernels run as plain Python

    def register_jitable(fn):  # type: ignore[no-untyped-def]
        return fn


PROB_BITS = 12
PROB_ONE = 1 << PROB_BITS
PROB_INIT = PROB_ONE // 2
MOVE_BITS = 5  #: adaptation speed: each coded bit moves its probability 1/32 of the way
TOP = 1 << 24  #: renormalise below this range
MASK32 = 0xFFFFFFFF
MAX_EXPONENT = 40  #: integers below 2^40 (a larger exponent is a damaged stream)
TREE_BITS = 4  #: the bits below the leading one coded through a tree of probabilities
TREE_SIZE = 1 << TREE_BITS
#: Probabilities one integer context takes: the unary exponent's, then a tree per exponent.
UINT_PROBS = MAX_EXPONENT + MAX_EXPONENT * TREE_SIZE
ENC_STATE, DEC_STATE = 5, 3
LOW, RANGE, CACHE, CACHE_SIZE, POS = range(5)
D_RANGE, D_CODE, D_POS = range(3)


def new_probs(contexts: int) -> np.ndarray:
    """Fresh probabilities (every bit even) for ``contexts`` integer contexts."""
    return np.full(contexts * UINT_PROBS, PROB_INIT, dtype=np.int32)


@register_jitable
def encoder_init(enc):
    enc[LOW] = 0
    enc[RANGE] = MASK32
    enc[CACHE] = 0
    enc[CACHE_SIZE] = 1
    enc[POS] = 0


@register_jitable
def _shift_low(enc, out):
    low = enc[LOW]
    if low < 0xFF000000 or low > MASK32:
        carry = low >> 32
        temp = enc[CACHE]
        while True:
            if enc[POS] < len(out):
                out[enc[POS]] = (temp + carry) & 0xFF
            enc[POS] += 1
            temp = 0xFF
            enc[CACHE_SIZE] -= 1
            if enc[CACHE_SIZE] == 0:
                break
        enc[CACHE] = (low >> 24) & 0xFF
    enc[CACHE_SIZE] += 1
    enc[LOW] = (low & 0x00FFFFFF) << 8


@register_jitable
def encode_bit(enc, out, probs, at, bit):
    """Code ``bit`` with the probability ``probs[at]`` (of a 0) and adapt it."""
    p = probs[at]
    bound = (enc[RANGE] >> PROB_BITS) * p
    if bit == 0:
        enc[RANGE] = bound
        probs[at] = p + ((PROB_ONE - p) >> MOVE_BITS)
    else:
        enc[LOW] += bound
        enc[RANGE] -= bound
        probs[at] = p - (p >> MOVE_BITS)
    while enc[RANGE] < TOP:
        enc[RANGE] = (enc[RANGE] << 8) & MASK32
        _shift_low(enc, out)


@register_jitable
def encode_direct(enc, out, value, bits):
    """Code the low ``bits`` bits of ``value`` (high first) at even odds."""
    for b in range(bits - 1, -1, -1):
        enc[RANGE] >>= 1
        if (value >> b) & 1:
            enc[LOW] += enc[RANGE]
        while enc[RANGE] < TOP:
            enc[RANGE] = (enc[RANGE] << 8) & MASK32
            _shift_low(enc, out)


@register_jitable
def encoder_flush(enc, out):
    """Write the last bytes; returns the stream's length (which may exceed ``len(out)``: then
    the stream did not fit and its tail was dropped)."""
    for _ in range(5):
        _shift_low(enc, out)
    return enc[POS]


@register_jitable
def decoder_init(dec, buf, start):
    dec[D_RANGE] = MASK32
    dec[D_CODE] = 0
    dec[D_POS] = start
    for _ in range(5):  # the encoder's first byte is always 0
        dec[D_CODE] = ((dec[D_CODE] << 8) | _byte(dec, buf)) & MASK32


@register_jitable
def _byte(dec, buf):
    at = dec[D_POS]
    dec[D_POS] = at + 1
    return buf[at] if at < len(buf) else 0


@register_jitable
def decode_bit(dec, buf, probs, at):
    p = probs[at]
    bound = (dec[D_RANGE] >> PROB_BITS) * p
    if dec[D_CODE] < bound:
        dec[D_RANGE] = bound
        probs[at] = p + ((PROB_ONE - p) >> MOVE_BITS)
        bit = 0
    else:
        dec[D_CODE] -= bound
        dec[D_RANGE] -= bound
        probs[at] = p - (p >> MOVE_BITS)
        bit = 1
    while dec[D_RANGE] < TOP:
        dec[D_RANGE] = (dec[D_RANGE] << 8) & MASK32
        dec[D_CODE] = ((dec[D_CODE] << 8) | _byte(dec, buf)) & MASK32
    return bit


@register_jitable
def decode_direct(dec, buf, bits):
    value = 0
    for _ in range(bits):
        dec[D_RANGE] >>= 1
        bit = 0
        if dec[D_CODE] >= dec[D_RANGE]:
            dec[D_CODE] -= dec[D_RANGE]
            bit = 1
        value = (value << 1) | bit
        while dec[D_RANGE] < TOP:
            dec[D_RANGE] = (dec[D_RANGE] << 8) & MASK32
            dec[D_CODE] = ((dec[D_CODE] << 8) | _byte(dec, buf)) & MASK32
    return value


@register_jitable
def encode_uint(enc, out, probs, ctx, value):
    """Code ``0 ≤ value < 2^40 − 1`` in the integer context ``ctx`` (see the module doc)."""
    base = ctx * UINT_PROBS
    v = value + 1
    e = 0
    while (v >> (e + 1)) != 0:
        e += 1
    for i in range(e):
        encode_bit(enc, out, probs, base + i, 1)
    if e < MAX_EXPONENT - 1:
        encode_bit(enc, out, probs, base + e, 0)
    tree = min(e, TREE_BITS)
    node = 1
    tree_base = base + MAX_EXPONENT + e * TREE_SIZE
    for b in range(e - 1, e - 1 - tree, -1):
        bit = (v >> b) & 1
        encode_bit(enc, out, probs, tree_base + node, bit)
        node = (node << 1) | bit
    encode_direct(enc, out, v, e - tree)


@register_jitable
def decode_uint(dec, buf, probs, ctx):
    """The value :func:`encode_uint` coded in ``ctx``."""
    base = ctx * UINT_PROBS
    e = 0
    while e < MAX_EXPONENT - 1 and decode_bit(dec, buf, probs, base + e) == 1:
        e += 1
    tree = min(e, TREE_BITS)
    node = 1
    tree_base = base + MAX_EXPONENT + e * TREE_SIZE
    for _ in range(tree):
        node = (node << 1) | decode_bit(dec, buf, probs, tree_base + node)
    v = (node << (e - tree)) | decode_direct(dec, buf, e - tree)
    return v - 1
