"""The per-row loop of ``align``: one teacher's rows moved to the student's positions.

Plain Python over flat arrays, compiled by numba on first use (``compiled()``); without numba
the same functions run as Python. For each student row j (context ending at byte E, label token
v spanning [E, E')):

1. the teacher row i whose context ends last at or before E (row i predicts teacher token t*,
   spanning [c, F)); none, or F ≤ E, or a label past the teacher's text (E' beyond its last
   token: a character cut at the window's end that it did not read) → fallback;
2. E = c: a **shared** boundary, every entry kept; c < E < F: an **interior** row, entries kept
   that spell t*'s bytes up to E and more (t* among them, from its target log-prob when outside
   the top-k), rescaled (``keep_tail``: to 1 − tail). With ``student_splits`` the row is
   conditioned on the student's boundary at E, not the teacher's: an interior row keeps only
   the entries after whose first bytes the student ends a token at E (t* always), and a shared
   row adds the paths of the previous teacher row through tokens that cross E where the student
   ends a token at E (:func:`_crossing`), each side weighed by its mass;
3. the entries pushed forward to student ids: σ(t) (shared) or the student token of t's bytes
   after E (interior); at a shared boundary t* outside the top-k joins them out of the tail,
   unless it alone stands for v in a full row (then it stays in the tail, as in a store);
4. the actual path: the mass of t* and the teacher tokens after it up to the first teacher
   boundary at or after E' (chain rule over their target log-probs) moves from t*'s image to v;
5. the k_out largest entries kept (descending, ties in order of appearance), the rest and the
   mass without a student image to the tail; ids padded with unused ids of log-prob −inf. The
   tail is the stored value, bit for bit, when nothing changed it.
"""

from __future__ import annotations

import numpy as np

try:
    from numba.extending import register_jitable
except ImportError:  # without numba the kernels run as plain Python

    def register_jitable(fn):  # type: ignore[no-untyped-def]
        return fn


FALLBACK, SHARED, INTERIOR = 0, 1, 2


@register_jitable
def _log_sub(a: float, b: float) -> float:
    """log(e^a − e^b); −inf when b ≥ a."""
    if b >= a:
        return -np.inf
    if b == -np.inf:
        return a
    return a + np.log1p(-np.exp(b - a))


@register_jitable
def _spells_prefix(t: int, star: int, n: int, starts: np.ndarray, spelled: np.ndarray) -> bool:
    """Whether teacher token t spells the first n bytes of token ``star`` and more."""
    if t < 0 or t >= starts.shape[0] - 1 or starts[t + 1] - starts[t] <= n:
        return False
    a, b = starts[t], starts[star]
    for x in range(n):  # noqa: SIM110 (numba compiles no generator)
        if spelled[a + x] != spelled[b + x]:
            return False
    return True


@register_jitable
def _image(t: int, prefix: int, sigma: np.ndarray, starts: np.ndarray,
           suffix: np.ndarray) -> int:
    """The student id teacher token t stands for, read from byte ``prefix`` on (−1: none)."""
    if t < 0 or t >= sigma.shape[0]:
        return -1
    return sigma[t] if prefix == 0 else suffix[starts[t] + prefix]


@register_jitable
def _gather(row: int, star: int, prefix: int, top_ids: np.ndarray, top_lp: np.ndarray,
            starts: np.ndarray, spelled: np.ndarray, e_t: np.ndarray, e_lp: np.ndarray,
            sigma: np.ndarray, suffix: np.ndarray, student_lengths: np.ndarray,
            split_from: int) -> tuple[int, int]:
    """The top-k entries of teacher row ``row`` (zero mass skipped) into ``e_t``/``e_lp``; for
    an interior row (``prefix`` > 0) only tokens spelling the first ``prefix`` bytes of the
    actual token ``star`` and more, and (``split_from`` ≥ 0) that the student, reading them
    from byte ``split_from``, splits after ``prefix`` bytes (star always). Returns (count,
    column of star or −1)."""
    m, star_col = 0, -1
    for c in range(top_ids.shape[1]):
        t, lp = top_ids[row, c], top_lp[row, c]
        if not lp > -np.inf or (prefix > 0 and not _spells_prefix(t, star, prefix, starts,
                                                                  spelled)):
            continue
        if prefix > 0 and t != star and split_from >= 0 and not _splits_at(
                t, split_from, prefix, sigma, starts, suffix, student_lengths):
            continue  # the student, reading t, would not end a token where its row ends
        if t == star:
            star_col = m
        e_t[m], e_lp[m] = t, lp
        m += 1
    return m, star_col


@register_jitable
def _splits_at(t: int, o: int, n: int, sigma: np.ndarray, starts: np.ndarray,
               suffix: np.ndarray, student_lengths: np.ndarray) -> bool:
    """Whether the student, reading teacher token t's bytes token by token from byte ``o``
    (where its own last token before n starts; σ, then the student token from each offset
    on), ends a token after exactly its first n bytes."""
    while o < n:
        u = _image(t, o, sigma, starts, suffix)
        if u < 0 or student_lengths[u] <= 0:
            return False
        o += student_lengths[u]
    return o == n


@register_jitable
def _crossing(row: int, last: int, o: int, n: int, target_last: float, top_ids: np.ndarray,
              top_lp: np.ndarray, sigma: np.ndarray, starts: np.ndarray, spelled: np.ndarray,
              suffix: np.ndarray, student_lengths: np.ndarray, x_u: np.ndarray,
              x_lp: np.ndarray) -> tuple[int, float]:
    """The paths through a shared boundary that the teacher's own boundary hides: the entries
    of teacher row ``row`` (which predicted ``last``, of ``n`` bytes: its top-k entry, else
    ``target_last``) that spell ``last`` and more, where the student (from byte ``o`` on,
    :func:`_splits_at`) ends a token after those n bytes. Their student images (their bytes
    after n) into ``x_u``, their log-probs, as shares of p(last) + their mass, into ``x_lp``.
    Returns (count, log of p(last)'s share); count 0 when there are none or p(last) is
    unknown."""
    m, mass, lp_last = 0, 0.0, target_last
    for c in range(top_ids.shape[1]):
        t, lp = top_ids[row, c], top_lp[row, c]
        if t == last and lp > -np.inf:
            lp_last = lp
        elif (t != last and lp > -np.inf and _spells_prefix(t, last, n, starts, spelled)
              and _splits_at(t, o, n, sigma, starts, suffix, student_lengths)):
            x_u[m], x_lp[m] = _image(t, n, sigma, starts, suffix), lp
            mass += np.exp(lp)
            m += 1
    if m == 0 or not lp_last > -np.inf:  # NaN: unknown
        return 0, 0.0
    log_norm = np.log(np.exp(lp_last) + mass)
    for a in range(m):
        x_lp[a] -= log_norm
    return m, lp_last - log_norm


@register_jitable
def _add(u: int, lp: float, n: int, mark_row: np.ndarray, mark_col: np.ndarray,
         f_id: np.ndarray, f_lp: np.ndarray, f_count: np.ndarray, nf: int) -> int:
    """Add mass e^lp to student id u among row n's ``nf`` entries (``f_count``: how many teacher
    entries each holds); the new entry count."""
    if mark_row[u] == n:
        col = mark_col[u]
        f_lp[col] = np.logaddexp(f_lp[col], lp)
        f_count[col] += 1
        return nf
    mark_row[u], mark_col[u] = n, nf
    f_id[nf], f_lp[nf], f_count[nf] = u, lp, 1
    return nf + 1


@register_jitable
def _path(lp: float, i: int, label_end: int, t_ends: np.ndarray, to: int, tn: int,
          target: np.ndarray, ro: int) -> tuple[float, int]:
    """Chain rule along the teacher's actual tokens after row i's token: log of its mass
    ``lp`` times p of each following token until one ends at or after ``label_end``; returns
    (log mass, the end of the last token)."""
    end = t_ends[to + i + 1]
    r = i + 1
    while end < label_end and r <= tn - 2:
        lp += min(target[ro + r], 0.0)
        end = t_ends[to + r + 1]
        r += 1
    return lp, end


@register_jitable
def _finish(n: int, nf: int, f_id: np.ndarray, f_lp: np.ndarray, order: np.ndarray,
            mark_row: np.ndarray, out_ids: np.ndarray, out_lp: np.ndarray) -> float:
    """Row n's output: its entries by descending mass (stable), the first k_out kept, ids
    padded with unused student ids at −inf. Returns the mass of the entries cut."""
    for a in range(nf):  # insertion sort: nf ≤ 2k + 2, nearly sorted
        col = order[a] = a
        b = a
        while b > 0 and f_lp[order[b - 1]] < f_lp[col]:
            order[b] = order[b - 1]
            b -= 1
        order[b] = col
    k_out = out_ids.shape[1]
    kept, cut = 0, 0.0
    for a in range(nf):
        col = order[a]
        if not f_lp[col] > -np.inf:
            mark_row[f_id[col]] = -1  # zero mass: free to pad with
        elif kept < k_out:
            out_ids[n, kept], out_lp[n, kept] = f_id[col], f_lp[col]
            kept += 1
        else:
            cut += np.exp(f_lp[col])
    u = 0
    while kept < k_out:
        while mark_row[u] == n:
            u += 1
        out_ids[n, kept], out_lp[n, kept] = u, -np.inf
        kept += 1
        u += 1
    return cut


def align_kernel(
    s_ids: np.ndarray, s_ends: np.ndarray, s_offsets: np.ndarray, s_row0: np.ndarray,
    t_ids: np.ndarray, t_ends: np.ndarray, t_offsets: np.ndarray, t_row0: np.ndarray,
    top_ids: np.ndarray, top_lp: np.ndarray, tail: np.ndarray, target: np.ndarray,
    sigma: np.ndarray, starts: np.ndarray, spelled: np.ndarray, suffix: np.ndarray,
    student_lengths: np.ndarray, keep_tail: bool, student_splits: bool,
    out_ids: np.ndarray, out_lp: np.ndarray, out_tail: np.ndarray, out_target: np.ndarray,
    out_kind: np.ndarray, out_chunk: np.ndarray, mark_row: np.ndarray, mark_col: np.ndarray,
) -> None:
    """Fill the student rows ``out_*`` of every sequence (see the module doc). Flat token
    arrays cut by ``*_offsets``; ``*_row0[s]``: the first row of sequence s."""
    width = 2 * top_ids.shape[1] + 2  # a row, the crossing paths, star and v
    e_t = np.empty(width, np.int64)
    e_lp = np.empty(width, np.float64)
    f_id = np.empty(width, np.int64)
    f_lp = np.empty(width, np.float64)
    f_count = np.empty(width, np.int64)
    order = np.empty(width, np.int64)
    x_u = np.empty(top_ids.shape[1], np.int64)  # the crossing tokens of the row before
    x_lp = np.empty(top_ids.shape[1], np.float64)
    for s in range(s_offsets.shape[0] - 1):
        so, sn = s_offsets[s], s_offsets[s + 1] - s_offsets[s]
        to, tn, ro = t_offsets[s], t_offsets[s + 1] - t_offsets[s], t_row0[s]
        i = -1
        for j in range(sn - 1):
            n = s_row0[s] + j
            e, label_end, v = s_ends[so + j], s_ends[so + j + 1], s_ids[so + j + 1]
            while i + 1 <= tn - 2 and t_ends[to + i + 1] <= e:
                i += 1  # the teacher row whose context ends last at or before e
            kind, row, star, prefix, c = FALLBACK, ro + i, -1, 0, e
            # the bytes the student's token before e spells (a SentencePiece dummy space too;
            # 0 for a special token), measured like the teacher's; unknown: the whole text
            w_s = student_lengths[s_ids[so + j]] if s_ids[so + j] >= 0 else e + 1
            if i >= 0 and label_end <= t_ends[to + tn - 1]:
                c, star = t_ends[to + i], t_ids[to + i + 1]
                span = t_ends[to + i + 1] - c
                if c == e:
                    kind = SHARED
                elif c + span > e:
                    kind, prefix = INTERIOR, starts[star + 1] - starts[star] - span + e - c
            m, star_col, lp_star = 0, -1, -np.inf
            if kind != FALLBACK:
                split_from = max(prefix - w_s, 0) if student_splits else -1
                m, star_col = _gather(row, star, prefix, top_ids, top_lp, starts, spelled, e_t,
                                      e_lp, sigma, suffix, student_lengths, split_from)
                lp_star = e_lp[star_col] if star_col >= 0 else target[row]
                if not lp_star > -np.inf:  # NaN: unknown
                    lp_star = -np.inf
            base, delta, nx = 0.0, 0.0, 0
            if kind == INTERIOR:  # condition on the bytes of star already read
                if star_col < 0 and lp_star > -np.inf:
                    e_t[m], e_lp[m], star_col = star, lp_star, m
                    m += 1
                    base = -np.exp(lp_star)  # out of the tail
                total = 0.0
                for a in range(m):
                    total += np.exp(e_lp[a])
                if total > 0.0:
                    rest = max(np.exp(tail[row]) + base, 0.0) if keep_tail else 0.0
                    shift = np.log1p(-min(rest, 1.0)) - np.log(total)
                    for a in range(m):
                        e_lp[a] += shift
                    base = rest
                    if star_col >= 0:
                        lp_star = e_lp[star_col]
                else:
                    kind = FALLBACK
            elif kind == SHARED:
                base = np.exp(tail[row])
                last = t_ids[to + i]
                n_last = starts[last + 1] - starts[last] if i >= 1 and last >= 0 else 0
                if student_splits and n_last > 0:  # tokens that cross e
                    nx, shift = _crossing(row - 1, last, max(n_last - w_s, 0), n_last,
                                          target[row - 1], top_ids, top_lp, sigma, starts,
                                          spelled, suffix, student_lengths, x_u, x_lp)
                    if nx > 0:  # this row's paths weigh p(last) / (p(last) + theirs)
                        for a in range(m):
                            e_lp[a] += shift
                        lp_star += shift
                        base *= np.exp(shift)
            out_kind[n], out_chunk[n] = kind, False
            if kind == FALLBACK:
                _finish(n, 0, f_id, f_lp, order, mark_row, out_ids, out_lp)
                out_tail[n], out_target[n] = 0.0, -np.inf
                continue
            nf = 0
            for a in range(m):  # the pushforward
                u = _image(e_t[a], prefix, sigma, starts, suffix)
                if u < 0:
                    delta += np.exp(e_lp[a])
                else:
                    nf = _add(u, e_lp[a], n, mark_row, mark_col, f_id, f_lp, f_count, nf)
            for a in range(nx):  # the crossing paths, by their bytes after e
                if x_u[a] < 0:
                    delta += np.exp(x_lp[a])
                else:
                    nf = _add(x_u[a], x_lp[a], n, mark_row, mark_col, f_id, f_lp, f_count, nf)
            u_star = _image(star, prefix, sigma, starts, suffix)
            # star outside the top-k, alone standing for v, in a full row: left in the tail
            alone = False
            if kind == SHARED and star_col < 0 and lp_star > -np.inf:
                alone = (nx == 0 and u_star == v and mark_row[v] != n
                         and nf >= out_ids.shape[1])
                if u_star >= 0 and not alone:
                    delta -= np.exp(lp_star)
                    nf = _add(u_star, lp_star, n, mark_row, mark_col, f_id, f_lp, f_count, nf)
            if lp_star > -np.inf:  # the actual path's mass goes to the actual student token
                lp_path, end = -np.inf, -1
                if student_lengths[v] > 0:
                    lp_path, end = _path(lp_star, i, label_end, t_ends, to, tn, target, ro)
                elif starts[star + 1] == starts[star]:  # both tokens spell nothing here
                    lp_path, end = lp_star, label_end
                out_chunk[n] = c == e and end == label_end and lp_path > -np.inf
                if lp_path > -np.inf and u_star != v:
                    if u_star < 0:
                        delta -= np.exp(lp_path)
                    else:
                        col = mark_col[u_star]
                        f_lp[col] = _log_sub(f_lp[col], lp_path)
                    nf = _add(v, lp_path, n, mark_row, mark_col, f_id, f_lp, f_count, nf)
            pure = kind == SHARED and nx == 0 and u_star == v and target[row] > -np.inf
            if mark_row[v] == n:  # the stored target log-prob when v is star's alone
                col = mark_col[v]
                out_target[n] = target[row] if pure and f_count[col] == 1 else f_lp[col]
            else:
                out_target[n] = target[row] if alone else -np.inf
            delta += _finish(n, nf, f_id, f_lp, order, mark_row, out_ids, out_lp)
            if kind == SHARED and nx == 0 and delta == 0.0:
                out_tail[n] = tail[row]  # unchanged: the stored value exactly
            else:
                r = base + delta
                out_tail[n] = np.log(r) if r > 0.0 else -np.inf


_KERNEL = None


def compiled():  # type: ignore[no-untyped-def]
    """``align_kernel`` compiled by numba (on first use, cached on disk)."""
    global _KERNEL
    if _KERNEL is None:
        import numba

        _KERNEL = numba.njit(cache=True, nogil=True, error_model="numpy")(align_kernel)
    return _KERNEL
