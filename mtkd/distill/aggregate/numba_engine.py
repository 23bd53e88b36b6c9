"""The numba backend of ``fuse``: fused per-row kernels (``numba_kernels``), no dense
``[K, N, U+1]`` stack for the built-in operators; several times faster than numpy.

Per block:

1. tempered probs: for float16 inputs (the stored dtype) none are materialised: kernels look up
   e = exp(l/T) in a table over the 65536 float16 bit patterns (one per temperature) and scale
   it by 1/Z_T per (row, teacher); other dtypes get l/T − log Z_T from a kernel and one numpy
   exp over the block;
2. a kernel unions the ids with a stamp array over the vocabulary (O(Σk), no sort);
3. numpy computes the imputation per (row, teacher) (``impute_logs``, shared with numpy);
4. a kernel fills a small per-row scratch with each teacher's values on the union and
   accumulates Σ p log p, the disagreement and the operator (linear q, or the geometric
   log-pool; other operators get the dense stack and run in numpy);
5. numpy normalises (geometric) and takes log q; a kernel writes packed top-k sort keys and the
   Jensen gap; numpy sorts the keys; a kernel decodes them.

Bulk exp/log stay in numpy: numba's scalar exp/log are several times slower here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mtkd.distill.aggregate.engine import BlockResult, ids_outside_vocab, weight_inputs
from mtkd.distill.aggregate.imputation import impute_logs, tempered_rank_exponent
from mtkd.distill.aggregate.numba_kernels import (
    MODE_GEOMETRIC,
    MODE_LINEAR,
    MODE_STACK,
    compiled,
)
from mtkd.distill.aggregate.operators import Geometric, Linear, Operator, PowerMean, Stack, xlogx
from mtkd.distill.aggregate.tails import TailModel, as_float64, float16_values, logsumexp
from mtkd.distill.aggregate.tempering import TeacherRows
from mtkd.distill.aggregate.weights import WeightInputs

# Table lookups of exp(l/T) need l_max/T well above −745 (underflow); the top log-prob of a
# distribution over V ids is ≥ −log V, so T ≥ 0.05 is safe for any V < 10^15.
_HALF_MIN_TEMPERATURE = 0.05


class _Workspace:
    """Buffers reused from block to block. Fresh multi-megabyte temporaries per block cost more
    than the kernels themselves here: glibc returns them to the OS and every block pays the
    page faults again."""

    def __init__(self) -> None:
        self.bufs: dict[str, np.ndarray] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: type = np.float64) -> np.ndarray:
        """A C-contiguous array of ``shape`` (contents undefined), valid until the next
        ``get`` of the same name."""
        size = int(np.prod(shape))
        buf = self.bufs.get(name)
        if buf is None or buf.size < size or buf.dtype != dtype:
            buf = self.bufs[name] = np.empty(max(size, 1), dtype)
        return buf[:size].reshape(shape)


class NumbaEngine:
    """The numba backend (a ``FusionEngine``)."""

    def __init__(self, teachers: Sequence[TeacherRows], temps: np.ndarray, model: TailModel,
                 vocab_size: int, rank: bool) -> None:
        self.kern = compiled()
        self.teachers, self.temps, self.model = teachers, temps, model
        self.vocab_size, self.rank = vocab_size, rank
        n_teachers = len(teachers)
        self.ks = np.array([t.k for t in teachers], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.ks)]).astype(np.int64)
        self.inv_t = 1.0 / temps
        self.mark = np.full(vocab_size, -1, dtype=np.int64)
        self.rows_seen = 0
        self.half = bool(
            all(np.asarray(t.logprobs).dtype == np.float16 for t in teachers)
            and temps.min() >= _HALF_MIN_TEMPERATURE
        )
        self.ltab = float16_values() if self.half else np.zeros(1)
        uniq = sorted(set(temps.tolist()))
        self.tidx = np.array([uniq.index(t) for t in temps.tolist()], dtype=np.int64)
        if self.half:
            with np.errstate(over="ignore", invalid="ignore"):
                self.etab = np.exp(self.ltab[None, :] / np.array(uniq)[:, None])
        else:
            self.etab = np.zeros((1, 1))
            self.tidx = np.zeros(n_teachers, dtype=np.int64)
        self.dummy2 = np.zeros((1, 1))
        self.dummy_bits = np.zeros((1, 1), np.uint16)
        self.work = _Workspace()

    def _bits(self, start: int, stop: int) -> np.ndarray:
        """The float16 log-probs' bits side by side, ``[n, Σk]`` uint16."""
        out = self.work.get("bits", (stop - start, int(self.starts[-1])), np.uint16)
        for j, t in enumerate(self.teachers):
            out[:, self.starts[j]:self.starts[j + 1]] = t.logprobs[start:stop].view(np.uint16)
        return out

    def _shifted(self, start: int, stop: int, log_z: np.ndarray | None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """[n, Σk] of l/T − c side by side (c = log Z_T if given, else the row max of l/T),
        with c and the row min of l, ``[n,K]`` each (non-float16 inputs)."""
        n, n_teachers = stop - start, len(self.teachers)
        out = self.work.get("shifted", (n, int(self.starts[-1])))
        shift, lmin = np.empty((n, n_teachers)), np.empty((n, n_teachers))
        use = log_z is not None
        lz = np.ascontiguousarray(log_z) if use else shift
        for j, t in enumerate(self.teachers):
            lp = t.logprobs[start:stop]
            if lp.dtype not in (np.float32, np.float64):
                lp = as_float64(lp)
            self.kern.shift(np.ascontiguousarray(lp), float(self.inv_t[j]), lz, use, out,
                            int(self.starts[j]), j, shift, lmin)
        return out, shift, lmin

    def _normalise(self, start: int, stop: int) -> tuple[np.ndarray, ...]:
        """log Z_T, the tempered tail log-mass, the row min of l, Σ_topk p log p and the
        entropy per (row, teacher), ``[n,K]`` each."""
        n, n_teachers = stop - start, len(self.teachers)
        s, sd = np.empty((n, n_teachers)), np.empty((n, n_teachers))
        if self.half:
            lmin = np.empty((n, n_teachers))
            self.kern.sums_h(self._bits(start, stop), self.starts, self.tidx, self.etab,
                             self.ltab, self.inv_t, s, sd, lmin)
            m = np.zeros((n, n_teachers))
        else:
            d, m, lmin = self._shifted(start, stop, None)
            e = np.exp(d, out=self.work.get("exp", d.shape))
            self.kern.sums(e, d, self.starts, s, sd)
        ltu = np.empty((n, n_teachers))
        for j, (t, temp) in enumerate(zip(self.teachers, self.temps, strict=True)):
            rows = t.rows(start, stop)
            ltu[:, j] = self.model.log_tempered_tail(
                rows.logprobs, rows.tail_logmass, temp, self.vocab_size,
                rows.tempered_tail(temp),
            )
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            log_z = np.logaddexp(m + np.log(s), ltu)
            c = np.exp(m - log_z)
            # Σ_i p_i log p_i with p_i = c·e_i, log p_i = d_i + m − log Z (Σ e d = sd)
            plogp = c * sd + np.where(s > 0, c * s * (m - log_z), 0.0)
            log_tail = ltu - log_z
        ent = -(plogp + xlogx(np.exp(log_tail), log_tail))
        return log_z, log_tail, lmin, plogp, ent

    def policy_inputs(self, block_rows: int) -> tuple[WeightInputs, tuple[np.ndarray, ...]]:
        """Entropies for a weight policy, and the normaliser cache (log Z_T, tempered tail,
        row min of l, Σ_topk p log p per (row, teacher))."""
        n, n_teachers = self.teachers[0].n, len(self.teachers)
        arrays = [np.empty((n, n_teachers)) for _ in range(5)]
        for start in range(0, n, block_rows):
            stop = min(start + block_rows, n)
            for a, b in zip(arrays, self._normalise(start, stop), strict=True):
                a[start:stop] = b
        return weight_inputs(self.teachers, arrays[4]), tuple(arrays[:4])

    def block(self, start: int, stop: int, ws: np.ndarray, op: Operator,
              norm: tuple[np.ndarray, ...] | None, keep: bool, ids_out: np.ndarray,
              probs_out: np.ndarray, tail_out: np.ndarray) -> BlockResult:
        """``FusionEngine.block``: the steps of the module docstring."""
        kern, n, n_teachers = self.kern, stop - start, len(self.teachers)
        log_z, log_t, lmin, plogp_own = norm if norm is not None else self._normalise(
            start, stop)[:4]
        log_z = np.ascontiguousarray(log_z)
        if self.half:
            bits, p, lp = self._bits(start, stop), self.dummy2, self.dummy2
            scale = np.exp(-log_z)
        else:
            lp = self._shifted(start, stop, log_z)[0]
            p = np.exp(lp, out=self.work.get("exp", lp.shape))
            bits, scale = self.dummy_bits, self.dummy2
        work = self.work
        width = int(self.starts[-1])
        ids = work.get("ids", (n, width), np.int32)
        for j, t in enumerate(self.teachers):
            ids[:, self.starts[j]:self.starts[j + 1]] = t.ids[start:stop]
        cols = work.get("cols", (n, width), np.int32)
        union = work.get("union", (n, width), np.int32)
        counts = np.zeros(n, np.int32)
        bad = kern.union(ids, self.mark, self.rows_seen, self.vocab_size, cols, union, counts)
        self.rows_seen += n
        if bad >= 0:
            raise ids_outside_vocab(
                int(np.searchsorted(self.starts, bad % width, side="right")) - 1, self.vocab_size)
        umax = int(counts.max()) if n else 0
        exps = None
        if self.rank:
            exps = np.stack([tempered_rank_exponent(t.logprobs[start:stop], temp)
                             for t, temp in zip(self.teachers, self.temps, strict=True)], axis=1)
        with np.errstate(invalid="ignore"):
            log_pmin = np.where(self.ks > 0, lmin * self.inv_t - log_z, -np.inf)
        log_v, log_tail = impute_logs(log_t, log_pmin, counts[:, None] - self.ks, self.ks,
                                      self.vocab_size, exps)
        v, tail = np.exp(log_v), np.exp(log_tail)
        mode = _operator_mode(op)
        dense = (n_teachers, n, umax + 1) if mode == MODE_STACK else (1, 1, 1)
        stack, log_stack = work.get("stack", dense), work.get("log_stack", dense)
        plogp = np.empty((n, n_teachers))

        def combine(rows: np.ndarray | None, mode: int) -> tuple[np.ndarray, np.ndarray]:
            def sel(a: np.ndarray) -> np.ndarray:
                return a if rows is None or a.shape[0] != n else np.ascontiguousarray(a[rows])

            m = n if rows is None else len(rows)
            vals = work.get("vals", (n, umax + 1)) if rows is None else np.empty((m, umax + 1))
            disagree = np.empty(m)
            kern.combine(sel(cols), sel(counts), self.starts, self.half, sel(p), sel(lp),
                         sel(bits), self.tidx, self.etab, self.ltab, self.inv_t, sel(scale),
                         sel(log_z), sel(plogp_own), sel(v), sel(log_v), sel(tail),
                         sel(log_tail), sel(ws),
                         mode, vals, stack, log_stack, disagree,
                         plogp if rows is None else np.empty((m, n_teachers)))
            return vals, disagree

        vals, disagree = combine(None, mode)
        if mode == MODE_LINEAR:
            q = vals
        elif mode == MODE_GEOMETRIC:
            log_norm = logsumexp(vals)
            with np.errstate(invalid="ignore"):
                q = np.exp(vals - log_norm[:, None])
            empty = np.flatnonzero(~np.isfinite(log_norm))
            if len(empty):  # no mass left: the linear mixture (as operators._normalise_log)
                q[empty] = combine(empty, MODE_LINEAR)[0]
        else:
            q = op(Stack(stack, log_stack, plogp.T), ws)
        with np.errstate(divide="ignore"):
            log_q = np.log(q, out=work.get("log_q", q.shape))
        keys = work.get("keys", (n, umax), np.int64)
        gap = np.empty(n)
        kern.finish(q, log_q, cols, counts, self.starts, self.half, p, bits, self.tidx,
                    self.etab, scale, v, tail, ws, plogp, union, mode == MODE_LINEAR, keys, gap)
        keys.sort(axis=1)
        kern.decode(keys, ids_out, probs_out, tail_out)
        return BlockResult(
            q[:, umax], gap, disagree,
            [self._teacher_probs(j, p, bits, scale) for j in range(n_teachers)] if keep else [],
            list(np.exp(log_t).T),
        )

    def _teacher_probs(self, j: int, p: np.ndarray, bits: np.ndarray, scale: np.ndarray
                       ) -> np.ndarray:
        """Teacher j's tempered top-k probs on the block, ``[n,k_j]``."""
        a, b = int(self.starts[j]), int(self.starts[j + 1])
        if not self.half:
            return p[:, a:b]
        return self.etab[self.tidx[j]][bits[:, a:b]] * scale[:, j, None]


def _operator_mode(op: Operator) -> int:
    """What the combine kernel computes for ``op``: linear and geometric pooling (power means
    of α = 1 and 0 included) in the kernel, any other operator in numpy on the dense stack."""
    if isinstance(op, Linear) or (isinstance(op, PowerMean) and op.alpha == 1.0):
        return MODE_LINEAR
    if isinstance(op, Geometric) or (isinstance(op, PowerMean) and op.alpha == 0.0):
        return MODE_GEOMETRIC
    return MODE_STACK
