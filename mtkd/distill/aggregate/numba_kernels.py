"""The numba backend's kernels: plain Python loops over rows, compiled by numba on first use
(``compiled()``), each writing into arrays its caller owns. ``numba_engine`` drives them.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from mtkd.distill.aggregate.diagnostics import ZERO_Q_LOG

_LOW_MAX = (1 << 31) - 1  # the low 31 bits of a top-k key hold LOW_MAX − id (ties → smaller id)
_PAD_KEY = 1  # sorts after every real key (real keys are ≤ 0)
# What ``combine`` accumulates: linear q, the geometric log-pool, or the dense stacks for an
# operator that runs in numpy.
MODE_LINEAR, MODE_GEOMETRIC, MODE_STACK = 0, 1, 2


def _shift_kernel(
    lp: np.ndarray, inv_t: float, log_z: np.ndarray, use_log_z: bool, out: np.ndarray,
    col0: int, j: int, shift: np.ndarray, lmin: np.ndarray,
) -> None:
    """out[:, col0:col0+k] = lp·(1/T) − c per row, c = log_z[:, j] if ``use_log_z`` else
    the row max of lp/T (saved in ``shift[:, j]``); the row min of lp into ``lmin[:, j]``."""
    n, k = lp.shape
    for r in range(n):
        hi, lo = -np.inf, np.inf
        for i in range(k):
            x = lp[r, i]
            hi = max(hi, x)
            lo = min(lo, x)
        c = log_z[r, j] if use_log_z else (hi * inv_t if hi > -np.inf else 0.0)
        for i in range(k):
            out[r, col0 + i] = lp[r, i] * inv_t - c
        shift[r, j] = c
        lmin[r, j] = lo


def _sums_kernel(e: np.ndarray, d: np.ndarray, starts: np.ndarray, s_out: np.ndarray,
                 sd_out: np.ndarray) -> None:
    """Per row and teacher: Σ e and Σ e·d over the teacher's columns."""
    n = e.shape[0]
    for r in range(n):
        for j in range(starts.shape[0] - 1):
            s, sd = 0.0, 0.0
            for c in range(starts[j], starts[j + 1]):
                s += e[r, c]
                if e[r, c] > 0.0:
                    sd += e[r, c] * d[r, c]
            s_out[r, j] = s
            sd_out[r, j] = sd


def _sums_kernel_h(
    bits: np.ndarray, starts: np.ndarray, tidx: np.ndarray, etab: np.ndarray, ltab: np.ndarray,
    inv_t: np.ndarray, s_out: np.ndarray, sd_out: np.ndarray, lmin: np.ndarray,
) -> None:
    """Float16 inputs: per row and teacher, Σ e and Σ e·l/T with e = exp(l/T) from the table,
    and the row min of l."""
    n = bits.shape[0]
    for r in range(n):
        for j in range(starts.shape[0] - 1):
            s, sd, lo = 0.0, 0.0, np.inf
            tab = etab[tidx[j]]
            for c in range(starts[j], starts[j + 1]):
                b = bits[r, c]
                e = tab[b]
                s += e
                if e > 0.0:
                    sd += e * ltab[b]
                lo = min(lo, ltab[b])
            s_out[r, j] = s
            sd_out[r, j] = sd * inv_t[j]
            lmin[r, j] = lo


def _union_kernel(ids: np.ndarray, mark: np.ndarray, row0: int, vocab_size: int,
                  cols: np.ndarray, union: np.ndarray, counts: np.ndarray) -> int:
    """Per row: the union of ``ids [n,W]`` in first-seen order into ``union``, its size into
    ``counts``, the union column of every input id into ``cols``. ``mark [V]`` packs, per id,
    the last (global) row that saw it (high 32 bits; rows numbered from ``row0``) and its
    column there (low 32 bits). Branch-free: the new/seen outcome is unpredictable. Returns
    r·W + c of the first id outside [0, V), or −1."""
    n, width = ids.shape
    for r in range(n):
        tag = np.int64(row0 + r) << 32
        u = 0
        for c in range(width):
            i = ids[r, c]
            if i < 0 or i >= vocab_size:
                return r * width + c
            m = mark[i]
            new = (m & ~np.int64(0xFFFFFFFF)) != tag
            m = (tag | u) if new else m
            mark[i] = m
            union[r, u] = i
            cols[r, c] = m & 0xFFFFFFFF
            u += new
        counts[r] = u
    return -1


def _combine_kernel(
    cols: np.ndarray, counts: np.ndarray, starts: np.ndarray, half: bool, p: np.ndarray,
    lp: np.ndarray, bits: np.ndarray, tidx: np.ndarray, etab: np.ndarray, ltab: np.ndarray,
    inv_t: np.ndarray, scale: np.ndarray, log_z: np.ndarray, plogp_own: np.ndarray,
    v: np.ndarray, log_v: np.ndarray, tail: np.ndarray, log_tail: np.ndarray, w: np.ndarray,
    mode: int, vals: np.ndarray, stack: np.ndarray, log_stack: np.ndarray,
    disagree: np.ndarray, plogp: np.ndarray,
) -> None:
    """Per row: each teacher on union + tail into a scratch (own probs from ``p``/``lp``, or
    for float16 inputs from ``bits``: p = etab[T][bits]·scale, log p = ltab[bits]/T − log Z);
    Σ p log p per teacher on union + tail (from its top-k part ``plogp_own``), the
    disagreement, and (mode 0) linear q or (mode 1) Σ_j w_j log x_j (geometric, unnormalised)
    into ``vals [n, umax+1]`` (tail bucket last), or (mode 2) the dense stacks."""
    n = cols.shape[0]
    n_teachers = starts.shape[0] - 1
    umax = vals.shape[1] - 1
    x = np.zeros((n_teachers, umax + 1))
    lx = np.full((n_teachers, umax + 1), -np.inf)
    n_pairs = n_teachers * (n_teachers - 1) / 2.0
    for r in range(n):
        size = counts[r]
        for j in range(n_teachers):
            vj = v[r, j]
            for u in range(size):
                x[j, u] = vj
            x[j, umax] = tail[r, j]
            if mode != MODE_LINEAR:
                lvj = log_v[r, j]
                for u in range(size):
                    lx[j, u] = lvj
                lx[j, umax] = log_tail[r, j]
            tab = etab[tidx[j]]
            sc, lz, it = scale[r, j], log_z[r, j], inv_t[j]
            if half:
                for c in range(starts[j], starts[j + 1]):
                    x[j, cols[r, c]] = tab[bits[r, c]] * sc
            else:
                for c in range(starts[j], starts[j + 1]):
                    x[j, cols[r, c]] = p[r, c]
            if mode != MODE_LINEAR:
                for c in range(starts[j], starts[j + 1]):
                    lx[j, cols[r, c]] = ltab[bits[r, c]] * it - lz if half else lp[r, c]
            own = plogp_own[r, j]
            missing = size - (starts[j + 1] - starts[j])
            if vj > 0.0:
                own += missing * (vj * log_v[r, j])
            if tail[r, j] > 0.0:
                own += tail[r, j] * log_tail[r, j]
            plogp[r, j] = own
        overlap = 0.0
        for a in range(n_teachers):
            for b2 in range(a + 1, n_teachers):
                s = 0.0
                for u in range(size):
                    s += min(x[a, u], x[b2, u])
                overlap += s + min(x[a, umax], x[b2, umax])
        disagree[r] = max(1.0 - overlap / n_pairs, 0.0) if n_teachers > 1 else 0.0
        if mode == MODE_STACK:
            for j in range(n_teachers):
                for u in range(size):
                    stack[j, r, u] = x[j, u]
                    log_stack[j, r, u] = lx[j, u]
                for u in range(size, umax):
                    stack[j, r, u] = 0.0
                    log_stack[j, r, u] = -np.inf
                stack[j, r, umax] = x[j, umax]
                log_stack[j, r, umax] = lx[j, umax]
            continue
        src = x if mode == MODE_LINEAR else lx
        pad = 0.0
        for u in range(size):
            vals[r, u] = 0.0
        vals[r, umax] = 0.0
        for j in range(n_teachers):
            wj = w[r, j]
            if wj == 0.0:
                continue
            if mode != MODE_LINEAR:
                pad = -np.inf
            for u in range(size):
                vals[r, u] += wj * src[j, u]
            vals[r, umax] += wj * src[j, umax]
        for u in range(size, umax):
            vals[r, u] = pad


def _finish_kernel(
    q: np.ndarray, log_q: np.ndarray, cols: np.ndarray, counts: np.ndarray, starts: np.ndarray,
    half: bool, p: np.ndarray, bits: np.ndarray, tidx: np.ndarray, etab: np.ndarray,
    scale: np.ndarray, v: np.ndarray, tail: np.ndarray, w: np.ndarray, plogp: np.ndarray,
    union: np.ndarray, linear: bool, keys: np.ndarray, gap: np.ndarray,
) -> None:
    """Per row: packed top-k sort keys of q's union columns into ``keys [n,umax]`` (ascending
    order = descending float32 q, then ascending id) and the Jensen gap Σ_j w_j KL(x_j‖q):
    for linear q, Σ_j w_j Σ x_j log x_j − Σ q log q; otherwise Σ_u x_j(u) log q(u) =
    v_j·(Σ_U log q − Σ_own log q) + Σ_own p log q + t_j log q_tail where q > 0 on the union
    (else term by term, log q taken as ``diagnostics.ZERO_Q_LOG`` where q = 0 < x_j)."""
    n = cols.shape[0]
    n_teachers = starts.shape[0] - 1
    umax = q.shape[1] - 1
    x = np.empty(umax + 1)
    fbuf = np.zeros(max(umax, 1), np.float32)
    ibuf = fbuf.view(np.int32)
    zero32 = np.float32(0.0)
    for r in range(n):
        size = counts[r]
        for u in range(size):
            fbuf[u] = np.float32(q[r, u]) + zero32
        for u in range(size):
            keys[r, u] = -((np.int64(ibuf[u]) << 32) | (_LOW_MAX - np.int64(union[r, u])))
        for u in range(size, umax):
            keys[r, u] = _PAD_KEY
        if linear:
            total = 0.0
            for j in range(n_teachers):
                if w[r, j] > 0.0:
                    total += w[r, j] * plogp[r, j]
            for u in range(size):
                if q[r, u] > 0.0:
                    total -= q[r, u] * log_q[r, u]
            if q[r, umax] > 0.0:
                total -= q[r, umax] * log_q[r, umax]
            gap[r] = total
            continue
        sum_log = 0.0
        positive = True
        for u in range(size):
            if q[r, u] > 0.0:
                sum_log += log_q[r, u]
            else:
                positive = False
        total = 0.0
        for j in range(n_teachers):
            wj = w[r, j]
            if not wj > 0.0:
                continue
            cross = 0.0
            tab = etab[tidx[j]]
            sc = scale[r, j]
            vj = v[r, j]
            if not positive:
                for u in range(size):
                    x[u] = vj
            own_log = 0.0
            for c in range(starts[j], starts[j + 1]):
                pc = tab[bits[r, c]] * sc if half else p[r, c]
                col = cols[r, c]
                if positive:
                    own_log += log_q[r, col]
                    cross += pc * log_q[r, col]
                else:
                    x[col] = pc
            if positive:
                if vj > 0.0:
                    cross += vj * (sum_log - own_log)
            else:
                for u in range(size):
                    if x[u] > 0.0:
                        cross += x[u] * (log_q[r, u] if q[r, u] > 0.0 else ZERO_Q_LOG)
            t = tail[r, j]
            if t > 0.0:
                cross += t * (log_q[r, umax] if q[r, umax] > 0.0 else ZERO_Q_LOG)
            total += wj * (plogp[r, j] - cross)
        gap[r] = total


def _decode_kernel(keys: np.ndarray, ids: np.ndarray, probs: np.ndarray,
                   tail_mass: np.ndarray) -> None:
    """The first ``k_out`` sorted keys of each row as ids and float32 probs, padded with −1 / 0
    (keys of zero mass are padding), and tail_mass = max(1 − Σ probs, 0) in float64."""
    n, umax = keys.shape
    k_out = ids.shape[1]
    ibuf = np.zeros(1, np.int32)
    fbuf = ibuf.view(np.float32)
    for r in range(n):
        total = 0.0
        c = 0
        while c < min(k_out, umax):
            key = keys[r, c]
            if key > 0:
                break
            neg = -key
            ibuf[0] = np.int32(neg >> 32)
            if not fbuf[0] > 0.0:
                break
            probs[r, c] = fbuf[0]
            ids[r, c] = np.int32(_LOW_MAX - (neg & 0xFFFFFFFF))
            total += np.float64(fbuf[0])
            c += 1
        for c2 in range(c, k_out):
            probs[r, c2] = 0.0
            ids[r, c2] = -1
        tail_mass[r] = max(1.0 - total, 0.0)


_KERNELS: SimpleNamespace | None = None


def compiled() -> SimpleNamespace:
    """The jitted kernels (compiled on first use, cached on disk by numba)."""
    global _KERNELS
    if _KERNELS is None:
        import numba

        jit = numba.njit(cache=True, nogil=True, error_model="numpy")
        # Reassociation lets LLVM vectorise the sums (several accumulators instead of one
        # dependency chain); no nnan/ninf: the kernels see −inf log-probs.
        fast = numba.njit(cache=True, nogil=True, error_model="numpy",
                          fastmath={"reassoc", "nsz", "arcp", "contract"})
        _KERNELS = SimpleNamespace(
            shift=jit(_shift_kernel), sums=fast(_sums_kernel), sums_h=fast(_sums_kernel_h),
            union=jit(_union_kernel), combine=fast(_combine_kernel),
            finish=fast(_finish_kernel), decode=jit(_decode_kernel),
        )
    return _KERNELS

