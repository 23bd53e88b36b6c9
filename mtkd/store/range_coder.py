"""A binary range coder with adaptive probabilities, and non-negative integers binarised on it.

Why: zstd sees a store's coded rows as bytes and cannot use what a model of them knows (that a
recurrence bit at reference rank 3 is nearly always set, that a distance to the row's floor
sits near 70). A range coder spends −log₂ p bits on each binary decision whose probability p a
small adaptive model gives, so a row model (``stream_codec``) pays close to its entropy.

The coder is the classic carry-propagating one of LZMA (32-bit range, renormalised a byte at a
time, a cached byte for the carry): probabilities are 12-bit counts of a 0, nudged 1/32 of the
way towards each coded bit. Integers v are coded Elias-gamma style: e = (bit length of v + 1) −
1 through a 6-level binary tree of adaptive probabilities (6 decisions where unary took e + 1),
the top ``TREE_BITS`` bits of v + 1 below its leading one through a tree per e, the rest as
plain bits, up to 16 in one step (a division instead of a decision per bit).
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
MAX_EXPONENT = 40  #: integers below 2^40 − 1 (a larger exponent is a damaged stream)
EXPONENT_BITS = 6  #: the exponent through a tree of 2^6 leaves (≥ MAX_EXPONENT)
EXPONENT_SIZE = 1 << EXPONENT_BITS
TREE_BITS = 4  #: the bits below the leading one coded through a tree of probabilities
TREE_SIZE = 1 << TREE_BITS
DIRECT_BITS = 16  #: plain bits coded in one step (the range keeps ≥ 2^8 per value)
#: Probabilities one integer context takes: the exponent's tree, then a tree per exponent.
UINT_PROBS = EXPONENT_SIZE + MAX_EXPONENT * TREE_SIZE
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
    """Code ``0 ≤ value < 2^bits`` (bits ≤ ``DIRECT_BITS``) at even odds, in one step."""
    if bits == 0:
        return
    enc[RANGE] >>= bits
    enc[LOW] += value * enc[RANGE]
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
    if bits == 0:
        return 0
    dec[D_RANGE] >>= bits
    value = min(dec[D_CODE] // dec[D_RANGE], (1 << bits) - 1)  # (less only if damaged)
    dec[D_CODE] -= value * dec[D_RANGE]
    while dec[D_RANGE] < TOP:
        dec[D_RANGE] = (dec[D_RANGE] << 8) & MASK32
        dec[D_CODE] = ((dec[D_CODE] << 8) | _byte(dec, buf)) & MASK32
    return value


@register_jitable
def fresh(probs, ready, ctx):
    """Integer context ``ctx``, its probabilities reset if the stream has not used it yet
    (``ready[ctx]``): a stream uses few of a model's contexts, and resetting them all would
    dominate short streams."""
    if not ready[ctx]:
        probs[ctx * UINT_PROBS:(ctx + 1) * UINT_PROBS] = PROB_INIT
        ready[ctx] = True
    return ctx


@register_jitable
def encode_uint(enc, out, probs, ctx, value):
    """Code ``0 ≤ value < 2^40 − 1`` in the integer context ``ctx`` (see the module doc)."""
    base = ctx * UINT_PROBS
    v = value + 1
    e = 0
    while (v >> (e + 1)) != 0:
        e += 1
    node = 1
    for b in range(EXPONENT_BITS - 1, -1, -1):  # e through a tree of probabilities
        bit = (e >> b) & 1
        encode_bit(enc, out, probs, base + node, bit)
        node = (node << 1) | bit
    tree = min(e, TREE_BITS)
    node = 1
    tree_base = base + EXPONENT_SIZE + e * TREE_SIZE
    for b in range(e - 1, e - 1 - tree, -1):
        bit = (v >> b) & 1
        encode_bit(enc, out, probs, tree_base + node, bit)
        node = (node << 1) | bit
    rest = e - tree
    while rest > 0:  # the low bits at even odds, up to DIRECT_BITS at a time
        n = min(rest, DIRECT_BITS)
        rest -= n
        encode_direct(enc, out, (v >> rest) & ((1 << n) - 1), n)


@register_jitable
def decode_uint(dec, buf, probs, ctx):
    """The value :func:`encode_uint` coded in ``ctx``."""
    base = ctx * UINT_PROBS
    node = 1
    for _ in range(EXPONENT_BITS):
        node = (node << 1) | decode_bit(dec, buf, probs, base + node)
    e = min(node - EXPONENT_SIZE, MAX_EXPONENT - 1)  # (a damaged stream: any e)
    tree = min(e, TREE_BITS)
    node = 1
    tree_base = base + EXPONENT_SIZE + e * TREE_SIZE
    for _ in range(tree):
        node = (node << 1) | decode_bit(dec, buf, probs, tree_base + node)
    v = node
    rest = e - tree
    while rest > 0:
        n = min(rest, DIRECT_BITS)
        rest -= n
        v = (v << n) | decode_direct(dec, buf, n)
    return v - 1
