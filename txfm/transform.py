"""The one input transform of TxFM: raw counts of a batch of samples → model input and target entries.

Training (:mod:`txfm.data`) and embedding (:mod:`txfm.embed`, which ``txfm evaluate`` uses) both call
:class:`InputTransform`; nothing else normalises counts or samples input genes. numpy only (no torch), so
the loader benchmark's peer environments can import it too.

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
   candidates not yet drawn (O(P) for that sample), which continues the same distribution. Samples with ≤ K candidates get all of
   them, then padding (gene 0, value 0, ``pad_mask`` True).
3. **Randomness** is counter-based: every sample has a 64-bit key (:func:`sample_keys`) and its j-th draw
   comes from ``SplitMix64(key + (⌊j/2⌋+1)·γ)`` (two 32-bit draws per hash). So a sample's genes depend only on its key — training keys samples
   by ``(seed, epoch, stream, micro-batch, position)``, embedding by ``(seed, cell index)``, which makes an
   embedding independent of the batch size.

Output (:meth:`InputTransform.__call__`, numpy): ``gene_idx`` int64 [B, K], ``values`` float32 [B, K],
``pad_mask`` bool [B, K], and the target as flat entries ``target_offsets`` int64 [B+1],
``target_gene`` int32 [nnz], ``target_value`` float32 [nnz] (the normalised non-zero entries; every other
panel gene's target is 0).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

LIBRARY_SIZE = 1e5
N_INPUT_GENES = 2048
SAMPLING_KINDS = ("uniform", "frequency")

_GAMMA = np.uint64(0x9E3779B97F4A7C15)  # SplitMix64's increment (2^64 / golden ratio)
_MASK = 0xFFFFFFFFFFFFFFFF
_MAX_ROUNDS = 2  # draw rounds before the Gumbel-top-k completion of a sample
_GUMBEL_COUNTER = 1 << 40  # counters of the completion's uniforms: disjoint from the draws'


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser, elementwise on uint64 (wrapping arithmetic); works in place on ``x``."""
    tmp = np.empty_like(x)
    for shift, multiplier in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
        np.right_shift(x, np.uint64(shift), out=tmp)
        x ^= tmp
        x *= np.uint64(multiplier)
    np.right_shift(x, np.uint64(31), out=tmp)
    x ^= tmp
    return x


def _mix_int(x: int) -> int:
    """SplitMix64 finaliser on one Python int (mod 2^64)."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
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
    return (_draws(keys, start, stop).astype(np.float64) + 0.5) * (1.0 / (1 << 32))


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
        per_entry = np.repeat(scale, np.diff(offsets))
        out = np.multiply(count, per_entry, dtype=np.float32)
        return np.log1p(out, out=out)

    def sample_genes(self, keys: np.ndarray, group: np.ndarray, candidates: Sequence[np.ndarray]
                     ) -> tuple[np.ndarray, np.ndarray]:
        """K candidate genes per sample → (gene_idx int64 [B, K], pad_mask bool [B, K]); keys uint64 [B]."""
        k = self.k
        gene_idx = np.zeros((group.size, k), dtype=np.int64)
        pad_mask = np.zeros((group.size, k), dtype=bool)
        for g in np.unique(group):  # loop over candidate sets in the batch, vectorised over their samples
            sel = np.flatnonzero(group == g)
            panel = candidates[g]
            if panel.size <= k:
                gene_idx[sel, :panel.size] = panel
                pad_mask[sel, panel.size:] = True
            else:
                gene_idx[sel] = panel[self._positions(keys[sel], panel)]
        return gene_idx, pad_mask

    def _positions(self, keys: np.ndarray, panel: np.ndarray) -> np.ndarray:
        """K distinct positions into ``panel`` (size P > K) per key, in draw order → int64 [m, K]."""
        k, n_cand = self.k, panel.size
        cdf = None
        if self.log_weight is not None:
            cached = self._cdf.get(id(panel))
            if cached is None or cached[0] is not panel:  # the tuple holds panel, so its id stays unique
                logw = self.log_weight[panel]
                top = logw.max()
                weight = np.exp(logw - top) if np.isfinite(top) else np.ones(n_cand)
                cached = self._cdf[id(panel)] = (panel, np.cumsum(weight))
            cdf = cached[1]
        per_round = int(expected_draws(n_cand, k) * 1.05) + 32 if cdf is None else 2 * k + 32
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

        Scatters the entries into a reused zeroed [B · G] row and gathers the K inputs, then zeroes those
        entries again: O(nnz + B·K), no [B, G] allocation or fill.
        """
        n_samples = offsets.size - 1
        flat = np.repeat(np.arange(n_samples, dtype=np.int64) * self.n_genes, np.diff(offsets)) + gene
        scratch = self._buffer("dense", n_samples * self.n_genes, np.float32)  # left zeroed
        scratch[flat] = value
        values = scratch[np.arange(n_samples, dtype=np.int64)[:, None] * self.n_genes + gene_idx]
        scratch[flat] = 0.0
        values[pad_mask] = 0.0
        return values

    def __call__(self, offsets: np.ndarray, gene: np.ndarray, count: np.ndarray, library: np.ndarray,
                 group: np.ndarray, candidates: Sequence[np.ndarray], keys: np.ndarray) -> dict[str, np.ndarray]:
        """The model input and target entries of one batch (shapes in the module docstring)."""
        offsets = np.asarray(offsets, dtype=np.int64)
        value = self.normalise(offsets, count, np.asarray(library, dtype=np.float64))
        gene_idx, pad_mask = self.sample_genes(keys, np.asarray(group, dtype=np.int64), candidates)
        return {"gene_idx": gene_idx, "values": self.input_values(offsets, gene, value, gene_idx, pad_mask),
                "pad_mask": pad_mask, "target_offsets": offsets,
                "target_gene": np.asarray(gene, dtype=np.int32), "target_value": value}


def frequency_log_weight(gene_frequency: np.ndarray, temperature: float) -> np.ndarray:
    """log p (up to a constant) of frequency sampling: ``log(freq) / temperature``, −inf for never detected."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    with np.errstate(divide="ignore"):
        return np.log(np.asarray(gene_frequency, dtype=np.float64)) / temperature
