"""The one input transform of TxFM: raw counts of a batch of samples → model input and target entries.

Training (:mod:`txfm.data`) and embedding (:mod:`txfm.embed`, which ``txfm evaluate`` uses) both call
:class:`InputTransform`; nothing else normalises counts or samples input genes. numpy and numba only (no
torch), so the loader benchmark's peer environments can import it too: the per-sample loops (drawing K genes,
gathering their values) are compiled with numba, the rest is numpy.

A batch of ``B`` samples arrives as flat non-zero entries with per-sample offsets (CSR rows):
``offsets`` int64 [B+1], ``gene`` int [nnz] (vocabulary indices, unique within a sample), ``count`` float
[nnz] (raw counts), ``library`` float [B] (total raw counts), plus per sample its *candidate* genes — the
dataset panel in training, the genes mapped to the vocabulary in embedding — given as ``candidates`` (a
list of sorted int64 arrays) and ``group`` int64 [B] (which of them each sample uses).

1. **Normalise**: ``value = log1p(count / library · L)`` per entry (``L = library_size``, default
   :data:`LIBRARY_SIZE` = 1e5). A candidate gene without an entry was measured as zero: value 0.
2. **Sample K genes** per sample from its candidates, without replacement, uniformly or (``frequency``)
   with probability ∝ ``frequency^(1/temperature)`` (successive sampling, i.e. Gumbel-top-k). Cost O(K)
   per sample, not O(candidates): i.i.d. draws with replacement, of which the first K *distinct* ones in
   draw order are kept (exactly sampling without replacement); a sample short of K distinct draws gets
   more. Frequency draws are inverse-CDF lookups (O(K log P)); a sample still short after
   :data:`_MAX_ROUNDS` rounds (skewed weights) gets its remaining genes by Gumbel-top-k over the
   candidates not yet drawn (O(P) for that sample), which continues the same distribution. Samples with
   ≤ K candidates get all of them, then padding (gene 0, value 0, ``pad_mask`` True). The draws run in a
   compiled loop per sample (:func:`_sample_kernel`); :meth:`InputTransform._positions` states the same
   rule in numpy and finishes the rare sample the budget leaves short.
3. **Randomness** is counter-based: every sample has a 64-bit key (:func:`sample_keys`) and its j-th draw
   comes from ``SplitMix64(key + (⌊j/2⌋+1)·γ)`` (two 32-bit draws per hash). So a sample's genes depend
   only on its key — training keys samples by ``(seed, epoch, stream, micro-batch, position)``, embedding
   by ``(seed, cell index)``, which makes an embedding independent of the batch size.

Output (:meth:`InputTransform.__call__`, numpy): ``gene_idx`` int64 [B, K], ``values`` float32 [B, K],
``pad_mask`` bool [B, K], and the target as flat entries ``target_offsets`` int64 [B+1],
``target_gene`` int32 [nnz], ``target_value`` float32 [nnz] (the normalised non-zero entries; every other
panel gene's target is 0).
"""

from __future__ import annotations

from typing import Sequence

import numba
import numpy as np

LIBRARY_SIZE = 1e5
N_INPUT_GENES = 2048
SAMPLING_KINDS = ("uniform", "frequency")

_GAMMA = np.uint64(0x9E3779B97F4A7C15)  # SplitMix64's increment (2^64 / golden ratio)
_MIX_1, _MIX_2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB  # SplitMix64 finaliser multipliers (after >>30, >>27)
_INV_2_32 = 1.0 / (1 << 32)  # a 32-bit draw d → uniform (d + 0.5) · 2^-32
_MASK = 0xFFFFFFFFFFFFFFFF
_MAX_ROUNDS = 2  # draw rounds before the Gumbel-top-k completion of a sample
_GUMBEL_COUNTER = 1 << 40  # counters of the completion's uniforms: disjoint from the draws'


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser, elementwise on uint64 (wrapping arithmetic); works in place on ``x``."""
    tmp = np.empty_like(x)
    for shift, multiplier in ((30, _MIX_1), (27, _MIX_2)):
        np.right_shift(x, np.uint64(shift), out=tmp)
        x ^= tmp
        x *= np.uint64(multiplier)
    np.right_shift(x, np.uint64(31), out=tmp)
    x ^= tmp
    return x


def _mix_int(x: int) -> int:
    """SplitMix64 finaliser on one Python int (mod 2^64)."""
    x = ((x ^ (x >> 30)) * _MIX_1) & _MASK
    x = ((x ^ (x >> 27)) * _MIX_2) & _MASK
    return x ^ (x >> 31)


def sample_keys(words: Sequence[int], index: np.ndarray) -> np.ndarray:
    """64-bit keys of the samples ``index`` (int [n]) of the random stream named by ``words`` → uint64 [n].

    ``words`` (non-negative ints, e.g. ``(seed, epoch, stream, batch, salt)``) are folded into one 64-bit
    base by chained SplitMix64; key ``i`` is the ``i``-th SplitMix64 output from that base, so it depends
    only on ``(words, i)``.
    """
    base = 0x6A09E667F3BCC909  # any fixed odd start; words are mixed in one at a time
    for word in words:
        base = _mix_int((base + (int(word) & _MASK) * int(_GAMMA) + int(_GAMMA)) & _MASK)
    with np.errstate(over="ignore"):
        return _mix(np.uint64(base) + (np.asarray(index, dtype=np.uint64) + np.uint64(1)) * _GAMMA)


def _draws(keys: np.ndarray, start: int, stop: int) -> np.ndarray:
    """32-bit draws ``[start, stop)`` of each key (``start`` even) → uint64 [m, stop − start] in [0, 2^32).

    Draws ``2i`` and ``2i+1`` are the low and high halves of ``SplitMix64(key + (i+1)·γ)`` (little-endian
    view), so a key's sequence does not depend on how many draws are asked for.
    """
    counters = np.arange(start // 2 + 1, (stop + 1) // 2 + 1, dtype=np.uint64) * _GAMMA
    with np.errstate(over="ignore"):
        bits = _mix(keys[:, None] + counters[None, :])
    return bits.view(np.uint32)[:, :stop - start].astype(np.uint64)


def _uniforms(keys: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Draws ``[start, stop)`` of each key as float64 uniforms in (0, 1) → [m, stop − start]."""
    return (_draws(keys, start, stop).astype(np.float64) + 0.5) * _INV_2_32


# ------------------------------------------------------------------------------------- compiled kernels
# The per-sample loops of the builder, compiled with numba: a Python loop over K draws is what numpy cannot
# vectorise without O(m · P) scratch. They compute exactly what the numpy code of InputTransform states
# (same draws, same order); tests compare the two. Every index is checked before use.
_U32 = np.uint64(0xFFFFFFFF)


@numba.njit(cache=True, nogil=True, inline="always")
def _mix_one(x):  # SplitMix64 finaliser on one uint64, as _mix
    x = (x ^ (x >> np.uint64(30))) * np.uint64(_MIX_1)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(_MIX_2)
    return x ^ (x >> np.uint64(31))


@numba.njit(cache=True, nogil=True)
def _sample_kernel(keys, group, panel_flat, panel_start, limit, cdf_flat, k, stamp, tag, gene_idx, pad_mask):
    """K genes per sample by first-distinct draws (see the module docstring) → found int64 [B].

    ``panel_flat`` int32 / ``panel_start`` int64 [D+1]: the candidate sets concatenated; ``limit`` int64 [D]:
    draws allowed per sample before the numpy completion takes over (found < k marks such a sample);
    ``cdf_flat`` float64: each set's cumulative weights (frequency sampling) or empty (uniform); ``stamp``
    int32 [≥ max P] holds per position the tag of the last sample that drew it, so it is never cleared
    (``tag`` is the first sample's tag).
    ``gene_idx`` int64 [B·K] and ``pad_mask`` bool [B·K] (flat, C order) are written. Indices are unsigned
    after their bounds are checked (numba's signed indexing adds a negative-index fix-up to every access).
    """
    n_samples, n_sets = keys.size, panel_start.size - 1
    found = np.zeros(n_samples, dtype=np.int64)
    uniform = cdf_flat.size == 0
    if (panel_start[n_sets] > panel_flat.size or (not uniform and cdf_flat.size < panel_flat.size)
            or limit.size < n_sets or gene_idx.size < n_samples * k or pad_mask.size < n_samples * k):
        raise IndexError("kernel buffers smaller than the batch")
    for b in range(n_samples):
        g = np.uint64(group[b])
        if g >= n_sets:
            raise IndexError("group outside the candidate sets")
        lo, n_cand = panel_start[g], panel_start[g + 1] - panel_start[g]
        row = np.uint64(b * k)
        if n_cand <= k:
            for j in range(n_cand):
                gene_idx[row + np.uint64(j)] = panel_flat[np.uint64(lo + j)]
            for j in range(n_cand, k):
                gene_idx[row + np.uint64(j)] = 0
                pad_mask[row + np.uint64(j)] = True
            found[b] = k
            continue
        if n_cand > stamp.size:
            raise IndexError("stamp buffer smaller than a candidate set")
        mark = np.int32(tag + b)
        total = cdf_flat[np.uint64(lo + n_cand - 1)] if not uniform else 0.0
        n_found = 0
        key = keys[b]
        bits = np.uint64(0)
        n_draws = limit[g]
        for i in range((n_draws + 1) // 2):  # one SplitMix64 output = draws 2i (low half) and 2i+1 (high)
            bits = _mix_one(key + np.uint64(i + 1) * _GAMMA)
            for half in range(2 if 2 * i + 1 < n_draws else 1):
                draw = bits & _U32 if half == 0 else bits >> np.uint64(32)
                if uniform:  # multiply-shift: floor(draw · P / 2^32) < P
                    pos = (draw * np.uint64(n_cand)) >> np.uint64(32)
                else:  # inverse CDF: the first position whose cumulative weight exceeds u (searchsorted "right")
                    u = (np.float64(draw) + 0.5) * _INV_2_32 * total
                    left, right = 0, n_cand
                    while left < right:
                        mid = (left + right) // 2
                        if cdf_flat[np.uint64(lo + mid)] <= u:
                            left = mid + 1
                        else:
                            right = mid
                    pos = np.uint64(min(left, n_cand - 1))
                if stamp[pos] != mark:
                    stamp[pos] = mark
                    gene_idx[row + np.uint64(n_found)] = panel_flat[np.uint64(lo) + pos]
                    n_found += 1
                    if n_found == k:
                        break
            if n_found == k:
                break
        found[b] = n_found
    return found


@numba.njit(cache=True, nogil=True)
def _scale_kernel(offsets, count, scale, out):
    """``out[e] = float32(count[e]) · scale[b]`` for the entries e of each sample b (what
    ``np.multiply(count, np.repeat(scale, diff(offsets)), dtype=float32)`` computes, without the repeat)."""
    n_samples = scale.size
    if offsets.size != n_samples + 1 or offsets[0] < 0 or offsets[n_samples] > min(count.size, out.size):
        raise IndexError("offsets outside the entries")
    for b in range(n_samples):
        if offsets[b + 1] < offsets[b]:
            raise IndexError("offsets decrease")
        for e in range(offsets[b], offsets[b + 1]):
            out[np.uint64(e)] = np.float32(count[np.uint64(e)]) * scale[b]


@numba.njit(cache=True, nogil=True)
def _gather_kernel(offsets, gene, value, gene_idx, pad_mask, dense, values):
    """Per sample: scatter its entries into ``dense`` float32 [G] (all zero on entry and on exit), read its K
    inputs (``gene_idx`` / ``pad_mask`` flat [B·K]) into ``values`` float32 [B·K], zero the entries again.

    O(nnz + B·K). The caller has checked that ``gene`` and ``gene_idx`` lie in [0, G); offsets are checked
    here. Indices are unsigned (see :func:`_sample_kernel`).
    """
    n_samples = offsets.size - 1
    k = gene_idx.size // max(n_samples, 1)
    if offsets[0] < 0 or offsets[n_samples] > gene.size or gene.size != value.size or values.size < gene_idx.size:
        raise IndexError("offsets outside the entries")
    for b in range(n_samples):
        lo, hi = offsets[b], offsets[b + 1]
        if hi < lo:
            raise IndexError("offsets decrease")
        for e in range(lo, hi):
            dense[np.uint64(gene[np.uint64(e)])] = value[np.uint64(e)]
        for j in range(b * k, (b + 1) * k):
            values[np.uint64(j)] = 0.0 if pad_mask[np.uint64(j)] else dense[np.uint64(gene_idx[np.uint64(j)])]
        for e in range(lo, hi):
            dense[np.uint64(gene[np.uint64(e)])] = 0.0


def expected_draws(n_candidates: int, k: int) -> float:
    """Mean number of uniform draws with replacement until ``k`` of ``n_candidates`` are distinct (k < n)."""
    return n_candidates * float(np.log((n_candidates + 0.5) / (n_candidates - k + 0.5)))


class InputTransform:
    """Counts → model input (see the module docstring); holds the settings and reusable scratch buffers.

    ``n_genes`` = vocabulary size G; ``log_weight`` float64 [G] is required for ``sampling="frequency"``
    (use :func:`frequency_log_weight`) and ignored otherwise.
    """

    def __init__(self, n_genes: int, k: int = N_INPUT_GENES, library_size: float = LIBRARY_SIZE,
                 sampling: str = "uniform", log_weight: np.ndarray | None = None):
        if sampling not in SAMPLING_KINDS:
            raise ValueError(f"sampling must be one of {', '.join(SAMPLING_KINDS)}; got {sampling!r}")
        if k < 1 or library_size <= 0 or n_genes < 1:
            raise ValueError(f"need k >= 1, library_size > 0, n_genes >= 1; got {k}, {library_size}, {n_genes}")
        if sampling == "frequency" and (log_weight is None or np.shape(log_weight) != (n_genes,)):
            raise ValueError(f"frequency sampling needs log_weight of shape ({n_genes},)")
        self.n_genes, self.k, self.library_size, self.sampling = n_genes, k, float(library_size), sampling
        self.log_weight = None if sampling == "uniform" else np.asarray(log_weight, dtype=np.float64)
        self._buffers: dict[str, np.ndarray] = {}
        self._cdf: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # id(panel) → (panel, cumulative weights [P])
        self._flat: dict[tuple, tuple[list, tuple]] = {}  # ids of a candidates list → (its arrays, kernel view)
        self._tag = 1  # the kernel's next stamp tag (the stamp buffer starts at 0)

    def _buffer(self, name: str, size: int, dtype) -> np.ndarray:
        """A reused [size] scratch array, zeros when first made (grown on demand)."""
        buf = self._buffers.get(name)
        if buf is None or buf.size < size:
            buf = self._buffers[name] = np.zeros(max(size, 1), dtype=dtype)
        return buf[:size]

    # -------------------------------------------------------------------------------------------- steps
    def normalise(self, offsets: np.ndarray, count: np.ndarray, library: np.ndarray) -> np.ndarray:
        """``log1p(count / library · L)`` per entry, float32 [nnz] (a zero-library sample has no entries)."""
        scale = (self.library_size / np.where(library > 0, library, 1.0)).astype(np.float32)
        if offsets.shape != (scale.size + 1,) or offsets[0] != 0 or offsets[-1] != np.shape(count)[0]:
            raise ValueError(f"offsets {offsets.shape} ending at {offsets[-1] if offsets.size else None} do not "
                             f"match {scale.size} samples with {np.shape(count)[0]} entries")
        out = np.empty(offsets[-1], dtype=np.float32)
        _scale_kernel(offsets, count, scale, out)  # out = float32(count) · scale, per sample
        return np.log1p(out, out=out)

    def sample_genes(self, keys: np.ndarray, group: np.ndarray, candidates: Sequence[np.ndarray]
                     ) -> tuple[np.ndarray, np.ndarray]:
        """K candidate genes per sample → (gene_idx int64 [B, K], pad_mask bool [B, K]); keys uint64 [B].

        The compiled kernel draws every sample; the rare sample still short of K distinct genes after the
        draw budget (:data:`_MAX_ROUNDS` rounds) is finished by :meth:`_positions` (same draws, then the
        Gumbel-top-k completion).
        """
        k = self.k
        keys = np.ascontiguousarray(keys, dtype=np.uint64)
        group = np.ascontiguousarray(group, dtype=np.int64)
        if keys.shape != group.shape or keys.ndim != 1:
            raise ValueError(f"keys and group must be 1-D of one length; got {keys.shape} and {group.shape}")
        panel_flat, panel_start, limit, cdf_flat = self._flat_candidates(candidates)
        gene_idx = np.empty((group.size, k), dtype=np.int64)
        pad_mask = np.zeros((group.size, k), dtype=bool)
        stamp = self._buffer("draw_stamp", int(np.diff(panel_start).max(initial=1)), np.int32)
        if self._tag + group.size >= np.iinfo(np.int32).max:  # tags would wrap: start the stamps afresh
            self._buffers["draw_stamp"][:] = 0
            self._tag = 1
        found = _sample_kernel(keys, group, panel_flat, panel_start, limit, cdf_flat, k, stamp, self._tag,
                               gene_idx.reshape(-1), pad_mask.reshape(-1))
        self._tag += group.size
        short = np.flatnonzero(found < k)
        for g in np.unique(group[short]):
            sel = short[group[short] == g]
            gene_idx[sel] = candidates[g][self._positions(keys[sel], candidates[g])]
        return gene_idx, pad_mask

    def _flat_candidates(self, candidates: Sequence[np.ndarray]
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The kernel's view of ``candidates``: (concatenated sets int32, starts int64 [D+1], draw budget per
        set int64 [D], concatenated cumulative weights float64 or empty). Checked and cached by identity."""
        ident = tuple(map(id, candidates))
        cached = self._flat.get(ident)
        if cached is not None and all(a is b for a, b in zip(cached[0], candidates)):
            return cached[1]
        panels = [np.asarray(c, dtype=np.int64) for c in candidates]
        if not panels:
            raise ValueError("no candidate gene sets")
        for panel in panels:
            if panel.ndim != 1 or (panel.size and (panel.min() < 0 or panel.max() >= self.n_genes)):
                raise ValueError(f"candidate genes must be a 1-D array of vocabulary indices in [0, {self.n_genes})")
        start = np.concatenate([[0], np.cumsum([p.size for p in panels])]).astype(np.int64)
        rounds = (1 << _MAX_ROUNDS) - 1  # round r draws per_round · 2^r, from the first draw again
        limit = np.array([(self._per_round(p.size) if p.size > self.k else 0) * rounds for p in panels],
                         dtype=np.int64)
        cdf = (np.concatenate([self._panel_cdf(p) for p in panels]) if self.log_weight is not None
               else np.empty(0))
        flat = (np.concatenate(panels).astype(np.int32), start, limit, cdf)  # int32: half the cache footprint
        if len(self._flat) >= 8:
            self._flat.pop(next(iter(self._flat)))
        self._flat[ident] = (list(candidates), flat)  # holding the arrays keeps their ids unique
        return flat

    def _per_round(self, n_cand: int) -> int:
        """Draws per sample in the first round (round r draws twice as many as round r − 1)."""
        if self.log_weight is None:
            return int(expected_draws(n_cand, self.k) * 1.05) + 32
        return 2 * self.k + 32

    def _panel_cdf(self, panel: np.ndarray) -> np.ndarray:
        """Cumulative frequency weights of ``panel`` float64 [P] (the maximum weight scaled to 1)."""
        cached = self._cdf.get(id(panel))
        if cached is None or cached[0] is not panel:  # the tuple holds panel, so its id stays unique
            logw = self.log_weight[panel]
            top = logw.max(initial=-np.inf)
            weight = np.exp(logw - top) if np.isfinite(top) else np.ones(panel.size)
            cached = self._cdf[id(panel)] = (panel, np.cumsum(weight))
        return cached[1]

    def _positions(self, keys: np.ndarray, panel: np.ndarray) -> np.ndarray:
        """K distinct positions into ``panel`` (size P > K) per key, in draw order → int64 [m, K]."""
        k, n_cand = self.k, panel.size
        cdf = None if self.log_weight is None else self._panel_cdf(panel)
        per_round = self._per_round(n_cand)
        out = np.empty((keys.size, k), dtype=np.int64)
        todo = np.arange(keys.size)
        drawn = 0
        for round_ in range(_MAX_ROUNDS):
            drawn += per_round
            if cdf is None:  # multiply-shift: floor(draw · P / 2^32), bias ≤ P / 2^32
                pos = ((_draws(keys[todo], 0, drawn) * np.uint64(n_cand)) >> np.uint64(32)).astype(np.int64)
            else:
                u = _uniforms(keys[todo], 0, drawn) * cdf[-1]
                pos = np.minimum(np.searchsorted(cdf, u, side="right"), n_cand - 1)
            keep, found = self._first_distinct(pos, n_cand)
            done = found >= k
            out[todo[done]] = pos[done][keep[done]].reshape(-1, k)
            if done.all():
                return out
            if round_ == _MAX_ROUNDS - 1:
                break
            todo, per_round = todo[~done], per_round * 2
        # Completion (in practice only for very skewed frequency weights or fewer than K candidates of
        # non-zero weight): the draws so far fix a prefix, and Gumbel-top-k over the candidates not drawn
        # continues successive sampling with the same weights.
        pos, keep, todo = pos[~done], keep[~done], todo[~done]
        with np.errstate(divide="ignore"):  # weight 0 (never detected): log −inf, score +inf, chosen last
            logw = np.zeros(n_cand) if cdf is None else np.log(np.diff(cdf, prepend=0.0))
            score = np.log(-np.log(_uniforms(keys[todo], _GUMBEL_COUNTER, _GUMBEL_COUNTER + n_cand))) - logw
        rows = np.broadcast_to(np.arange(todo.size)[:, None], pos.shape)
        score[rows[keep], pos[keep]] = -np.inf  # the drawn prefix is kept; the K − |prefix| best others join it
        out[todo] = np.argpartition(score, k - 1, axis=1)[:, :k]
        return out

    def _first_distinct(self, pos: np.ndarray, n_cand: int) -> tuple[np.ndarray, np.ndarray]:
        """Mask of the first ≤K distinct draws of each row of ``pos`` int64 [m, n] → (bool [m, n], int [m]).

        The second array is how many distinct draws each row has. Works in a reused
        [m · n_cand] stamp buffer: only the positions written in this call are read, so it is never cleared.
        """
        m, n = pos.shape
        flat = (np.arange(m, dtype=np.int64)[:, None] * n_cand + pos).ravel()
        order = np.arange(flat.size, dtype=np.int32)
        stamp = self._buffer("stamp", m * n_cand, np.int32)
        stamp[flat] = flat.size
        np.minimum.at(stamp, flat, order)  # the first draw of each position wins (ufunc.at is ordered)
        first = (stamp[flat] == order).reshape(m, n)
        rank = np.cumsum(first, axis=1, dtype=np.int32)
        return first & (rank <= self.k), rank[:, -1]

    def input_values(self, offsets: np.ndarray, gene: np.ndarray, value: np.ndarray, gene_idx: np.ndarray,
                     pad_mask: np.ndarray) -> np.ndarray:
        """Normalised value of each input gene (0 = measured zero or padding) → float32 [B, K].

        Per sample, scatters its entries into a reused zeroed [G] row, gathers the K inputs and zeroes the
        entries again: O(nnz + B·K), no [B, G] allocation or fill.
        """
        if gene.shape != value.shape or offsets.size != gene_idx.shape[0] + 1:
            raise ValueError(f"entries do not match: gene {gene.shape}, value {value.shape}, offsets "
                             f"{offsets.shape} for {gene_idx.shape[0]} samples")
        if gene_idx.shape != pad_mask.shape:
            raise ValueError(f"gene_idx {gene_idx.shape} and pad_mask {pad_mask.shape} differ")
        for name, idx in (("gene", gene), ("gene_idx", gene_idx)):
            if idx.size and (idx.min() < 0 or idx.max() >= self.n_genes):
                raise ValueError(f"{name} outside the vocabulary [0, {self.n_genes})")
        values = np.empty(gene_idx.shape, dtype=np.float32)
        _gather_kernel(offsets, gene, value, np.ascontiguousarray(gene_idx).reshape(-1),
                       np.ascontiguousarray(pad_mask).reshape(-1), self._buffer("dense", self.n_genes, np.float32),
                       values.reshape(-1))
        return values

    def __call__(self, offsets: np.ndarray, gene: np.ndarray, count: np.ndarray, library: np.ndarray,
                 group: np.ndarray, candidates: Sequence[np.ndarray], keys: np.ndarray) -> dict[str, np.ndarray]:
        """The model input and target entries of one batch (shapes in the module docstring)."""
        offsets = np.asarray(offsets, dtype=np.int64)
        try:
            value = self.normalise(offsets, count, np.asarray(library, dtype=np.float64))
            gene_idx, pad_mask = self.sample_genes(keys, np.asarray(group, dtype=np.int64), candidates)
            values = self.input_values(offsets, gene, value, gene_idx, pad_mask)
        except IndexError as exc:  # raised by a kernel's bounds check
            raise ValueError(f"malformed batch: {exc}") from None
        return {"gene_idx": gene_idx, "values": values, "pad_mask": pad_mask, "target_offsets": offsets,
                "target_gene": np.asarray(gene, dtype=np.int32), "target_value": value}


def frequency_log_weight(gene_frequency: np.ndarray, temperature: float) -> np.ndarray:
    """log p (up to a constant) of frequency sampling: ``log(freq) / temperature``, −inf for never detected."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    with np.errstate(divide="ignore"):
        return np.log(np.asarray(gene_frequency, dtype=np.float64)) / temperature
