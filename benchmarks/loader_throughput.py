"""Throughput of the txfm.data loader against a naive AnnData baseline, measured in the same run.

    .venv/bin/python benchmarks/loader_throughput.py [--samples 20000 --genes 8000 --workers 0 2 ...]

Both paths produce the same training micro-batches from the same simulated train split: K input genes drawn
from the sample's dataset panel, their log1p(count / library · L) values, the dense [B, G] target and its
mask. The baseline is what one writes first: read the data as an ``.h5ad``, densify one row at a time,
normalise it, draw its genes with ``rng.choice``, build its target, stack. Ours streams Parquet row groups
and does everything vectorised per micro-batch (txfm.data).

Reported per method: wall-clock samples/s, samples/s per core (wall rate / processes doing the work) and
samples per CPU-second (user+sys of this process and its workers; the fairest "per core" figure on a shared
machine), and the ratio of samples per CPU-second to the baseline's. Each measurement is repeated
``--repeats`` times and the fastest kept (shared machines are noisy). The baseline is charged its share of
the one-off ``read_h5ad`` (read seconds × processed / total samples), as ours is charged its Parquet reads.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from curation import schema  # noqa: E402
from curation.io import atomic_path  # noqa: E402
from txfm.data import CorpusInfo, LoaderConfig, make_loader  # noqa: E402
from simulation.corpus import write_synthetic_corpus  # noqa: E402


def cpu_seconds() -> float:
    """User+sys CPU time of this process plus its finished (joined) children, in seconds."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def write_h5ad(corpus: Path, path: Path, info: CorpusInfo) -> None:
    """The train split as an AnnData: CSR counts [n, G] and obs['dataset_idx'], streamed by record batch."""
    indptr, indices, data, datasets = [np.zeros(1, dtype=np.int64)], [], [], []
    scanner = pads.dataset(corpus / schema.SHARDS_DIR, partitioning="hive").scanner(
        columns=["dataset", "gene_idx", "counts"], filter=pads.field("split") == "train")
    for batch in scanner.to_batches():
        genes, counts = batch.column("gene_idx"), batch.column("counts")
        offsets = genes.offsets.to_numpy().astype(np.int64)
        indptr.append(indptr[-1][-1] + offsets[1:] - offsets[0])
        indices.append(genes.values.to_numpy()[offsets[0]:offsets[-1]])
        data.append(counts.values.to_numpy()[offsets[0]:offsets[-1]])
        datasets += [info.dataset_index[name] for name in batch.column("dataset").to_pylist()]
    matrix = sp.csr_matrix((np.concatenate(data), np.concatenate(indices), np.concatenate(indptr)),
                           shape=(len(datasets), info.n_genes))
    adata = ad.AnnData(X=matrix, obs=pd.DataFrame({"dataset_idx": datasets},
                                                   index=[str(i) for i in range(len(datasets))]))
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp)


def naive_batches(adata: ad.AnnData, info: CorpusInfo, n_samples: int, micro_batch: int, k: int,
                  library_size: float, seed: int):
    """Baseline: per-row densify, normalise, rng.choice genes, build target; stack per micro-batch."""
    rng = np.random.default_rng(seed)
    panels, panel_mask = info.panels, info.panel_mask.numpy()
    dataset_idx = adata.obs["dataset_idx"].to_numpy()
    for start in range(0, n_samples - micro_batch + 1, micro_batch):
        rows = []
        for i in range(start, start + micro_batch):
            counts = adata.X[i].toarray().ravel()
            d = dataset_idx[i]
            library = counts.sum()
            normalised = np.log1p(counts / library * library_size).astype(np.float32)
            genes = np.zeros(k, dtype=np.int64)
            pad = np.ones(k, dtype=bool)
            if len(panels[d]) > k:
                genes[:], pad[:] = rng.choice(panels[d], k, replace=False), False
            else:
                genes[:len(panels[d])], pad[:len(panels[d])] = panels[d], False
            values = np.where(pad, 0.0, normalised[genes]).astype(np.float32)
            target = np.where(panel_mask[d], normalised, 0.0).astype(np.float32)
            rows.append((genes, values, pad, target, panel_mask[d], d, library))
        yield {name: torch.from_numpy(np.stack(column)) for name, column in
               zip(("gene_idx", "values", "pad_mask", "target", "target_mask", "dataset_idx", "library_size"),
                   zip(*rows))}


def measure(make_batches, repeats: int, progress: bool) -> tuple[int, float, float]:
    """Consume ``make_batches()`` ``repeats`` times. → (samples, wall seconds, CPU seconds) of the fastest run"""
    runs = []
    for _ in range(repeats):
        wall, cpu, n = time.perf_counter(), cpu_seconds(), 0
        for batch in tqdm(make_batches(), desc="batches", disable=not progress, leave=False):
            n += batch["gene_idx"].shape[0]
        runs.append((n, time.perf_counter() - wall, cpu_seconds() - cpu))
    return min(runs, key=lambda run: run[2])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20_000, help="samples in the simulated corpus")
    parser.add_argument("--genes", type=int, default=8000, help="vocabulary size G")
    parser.add_argument("--datasets", type=int, default=4)
    parser.add_argument("--mean-library-size", type=float, default=4000.0,
                        help="single-cell depth; 4000 gives ~2.6k non-zeros per sample at G=8000")
    parser.add_argument("--k", type=int, default=2048, help="input genes per sample")
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--baseline-samples", type=int, default=2048, help="samples the baseline processes")
    parser.add_argument("--repeats", type=int, default=3, help="runs per method; the fastest is kept")
    parser.add_argument("--dir", type=Path, default=None, help="work directory (default: a temporary one)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    progress = not args.no_progress
    work = args.dir or Path(tempfile.mkdtemp(prefix="txfm-loader-bench-"))
    corpus = work / "corpus"
    try:
        if not corpus.exists():
            write_synthetic_corpus(corpus, n_samples=args.samples, n_genes=args.genes, n_datasets=args.datasets,
                                   mean_library_size=args.mean_library_size, panel_fraction=(0.7, 1.0),
                                   progress=progress)
        info = CorpusInfo.open(corpus)
        h5ad = work / "train.h5ad"
        if not h5ad.exists():
            write_h5ad(corpus, h5ad, info)
        read_start = time.perf_counter()
        adata = ad.read_h5ad(h5ad)
        read_seconds = time.perf_counter() - read_start
        nnz_per_sample = adata.X.nnz / adata.n_obs
        print(f"corpus: {adata.n_obs} train samples, G={info.n_genes}, K={args.k}, B={args.micro_batch}, "
              f"{nnz_per_sample:.0f} non-zeros/sample, panels {sorted(p.size for p in info.panels)}; "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; read_h5ad {read_seconds:.1f} s")

        rows = []
        n_base = min(args.baseline_samples, adata.n_obs)
        n, wall, cpu = measure(lambda: naive_batches(adata, info, n_base, args.micro_batch, args.k, 1e5, seed=0),
                               args.repeats, progress)
        read_share = read_seconds * n / adata.n_obs
        rows.append(("naive h5ad rows", 0, n, wall + read_share, cpu + read_share))
        for workers in args.workers:
            cfg = LoaderConfig(micro_batch=args.micro_batch, n_input_genes=args.k, num_workers=workers)
            n, wall, cpu = measure(lambda: make_loader(info, cfg, [0], 1, epoch=0), args.repeats, progress)
            rows.append(("txfm.data", workers, n, wall, cpu))

        base_per_cpu = rows[0][2] / rows[0][4]
        print(f"\n{'method':<17}{'workers':>8}{'samples':>9}{'samples/s':>11}{'per core':>10}"
              f"{'per CPU-s':>11}{'ratio':>7}")
        for method, workers, n, wall, cpu in rows:
            rate = n / wall
            print(f"{method:<17}{workers:>8}{n:>9}{rate:>11.0f}{rate / max(1, workers):>10.0f}"
                  f"{n / cpu:>11.0f}{n / cpu / base_per_cpu:>7.1f}")
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
