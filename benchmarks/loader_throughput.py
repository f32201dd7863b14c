"""Loader CPU cost per sample: txfm.data against the naive AnnData loader, scdataset and annbatch, in one run.

    .venv/bin/python benchmarks/loader_throughput.py [--samples 16000 --genes 20000 --k 2048 --micro-batch 32]

Every side reads one full epoch of the train split of the same simulated corpus (ALL its datasets) and
turns it into the same training micro-batches with the SAME micro-batch builder,
:class:`txfm.transform.InputTransform` (library-size normalisation, log1p, K-gene sampling, input values
and flat sparse-target entries) — the sides differ only in how they get the samples' rows. The
``builder alone`` row times that builder on the same epoch with the rows fetched beforehand, so "fetch"
(a side's CPU µs/sample minus the builder's) is what each side adds on top of the common work:

* ``txfm.data`` — ours: shuffled Parquet row groups, decoded once into the memory-mapped Arrow IPC decode
  cache (its one-off build is reported on its own line, as the h5ad and zarr conversions of the peers are
  not charged either); ``txfm.data, Parquet decode`` is the same loader decoding Parquet every epoch.
* ``naive AnnData`` — ``anndata.read_h5ad`` into memory, a map-style torch Dataset returning ``X[i]``,
  a shuffled ``DataLoader`` whose collate stacks the rows (``scipy.sparse.vstack``).
* ``scdataset`` (PyPI, installed with ``pip --target`` into the work directory) — ``scDataset`` with its
  BlockShuffling strategy (block 8, fetch factor 16) over the AnnData's X, in memory and backed (on disk).
* ``annbatch`` (PyPI, needs Python ≥ 3.12: a separate venv from a ``python3.12`` found on the machine) —
  a pre-shuffled zarr ``DatasetCollection`` and ``annbatch.Loader`` (chunk 64, 32 chunks preloaded).

Each side runs in its own child process after its imports; its cost is the child's CPU time
(``resource.getrusage``: user and system, as ``time.process_time`` counts them) from opening the data to
the end of the epoch, divided by the samples yielded — µs/sample in user, system and total — and the ratio
of each side's µs/sample to ours (> 1: ours is cheaper), on the total and on user time alone. System time
is mostly page faults of data being brought into memory (a peer reading the whole h5ad into RAM pays it
there). Wall time is printed beside it. Each side runs ``--repeats`` times, round-robin, and its cheapest
run is kept (shared machines are noisy). A peer that cannot be installed is listed with the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from txfm.transform import InputTransform, sample_keys  # noqa: E402  (numpy + numba: every side's environment has them)

SIDES = ("txfm", "txfm_parquet", "naive", "scdataset_memory", "scdataset_backed", "annbatch", "builder")
LABELS = {"builder": "builder alone (no fetch)", "txfm": "txfm.data (decode cache)",
          "txfm_parquet": "txfm.data, Parquet decode",
          "naive": "naive AnnData", "scdataset_memory": "scdataset, in memory",
          "scdataset_backed": "scdataset, backed h5ad", "annbatch": "annbatch (zarr)"}
PEERS = ("naive", "scdataset_memory", "scdataset_backed", "annbatch")
_SALT = 0xBE7C


def user_cpu() -> tuple[float, float]:
    """(user, system) CPU seconds of this process and its finished children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + children.ru_utime, own.ru_stime + children.ru_stime


# ------------------------------------------------------------------------------------------ shared builder
class Builder:
    """The micro-batch builder every peer uses: CSR rows (+ dataset index, library size) → training batch.

    It is the transform our loader calls (:class:`txfm.transform.InputTransform`, same settings, same
    per-sample keys by batch number), so every side does identical work per batch after fetching rows.
    """

    def __init__(self, panels: list[np.ndarray], n_genes: int, k: int, library_size: float, seed: int = 0):
        self.panels, self.seed = panels, seed
        self.transform = InputTransform(n_genes, k, library_size)
        self.index = 0

    def __call__(self, csr, dataset_idx: np.ndarray, library: np.ndarray) -> dict[str, np.ndarray]:
        keys = sample_keys((self.seed, self.index, _SALT), np.arange(csr.shape[0]))
        self.index += 1
        batch = self.transform(csr.indptr, csr.indices, csr.data, library, dataset_idx, self.panels, keys)
        batch["dataset_idx"], batch["library_size"] = dataset_idx, library.astype(np.float32)
        return batch


def warm_up_builder() -> None:
    """Load the builder's compiled kernels (numba, from its on-disk cache) before any side's clock starts.

    Every side runs in a fresh process; loading the kernels is a one-off per process (tenths of a second),
    like the imports, and is not charged to the epoch. Same dtypes as the sides pass (int32 indices, float32
    counts).
    """
    transform = InputTransform(8, 4, 10.0)
    offsets = np.array([0, 2, 3], dtype=np.int64)
    transform(offsets, np.array([1, 5, 2], dtype=np.int32), np.ones(3, dtype=np.float32), np.full(2, 3.0),
              np.zeros(2, dtype=np.int64), [np.arange(8, dtype=np.int64)], sample_keys((0,), np.arange(2)))


def corpus_panels(corpus: Path) -> tuple[list[np.ndarray], int, list[str]]:
    """(panels, G, dataset names) from genes.parquet / datasets.parquet, with pyarrow only."""
    import pyarrow.parquet as pq

    datasets = pq.read_table(corpus / "datasets.parquet").to_pydict()
    n_genes = pq.read_metadata(corpus / "genes.parquet").num_rows
    return [np.asarray(p, dtype=np.int64) for p in datasets["measured_gene_idx"]], n_genes, datasets["dataset"]


# ----------------------------------------------------------------------------------------------- the sides
def run_txfm(args, cache: str) -> dict:
    import torch

    from txfm.data import CorpusInfo, LoaderConfig, make_loader

    torch.set_num_threads(1)
    info = CorpusInfo.open(args.corpus)
    cfg = LoaderConfig(micro_batch=args.micro_batch, n_input_genes=args.k, target_format="sparse",
                       decode_cache=cache, pin_memory=False)
    return consume(lambda: make_loader(info, cfg, [0], 1, epoch=0), lambda batch: batch)


def run_naive(args) -> dict:
    import anndata as ad
    import scipy.sparse as sp
    import torch
    from torch.utils.data import DataLoader, Dataset

    torch.set_num_threads(1)
    panels, n_genes, _ = corpus_panels(args.corpus)
    builder = Builder(panels, n_genes, args.k, 1e5)

    class Rows(Dataset):
        def __init__(self, adata):
            self.x = adata.X
            self.dataset_idx = adata.obs["dataset_idx"].to_numpy()
            self.library = adata.obs["library_size"].to_numpy()

        def __len__(self):
            return self.x.shape[0]

        def __getitem__(self, i):
            return self.x[i], self.dataset_idx[i], self.library[i]

    def collate(rows):
        x, d, lib = zip(*rows)
        return sp.vstack(x, format="csr"), np.asarray(d, dtype=np.int64), np.asarray(lib, dtype=np.float64)

    def batches():
        adata = ad.read_h5ad(args.h5ad)
        return DataLoader(Rows(adata), batch_size=args.micro_batch, shuffle=True, drop_last=True,
                          collate_fn=collate, generator=torch.Generator().manual_seed(0))

    return consume(batches, lambda batch: builder(*batch))


def run_scdataset(args, backed: bool) -> dict:
    import anndata as ad
    import torch

    sys.path.insert(0, str(args.peers / "scdataset"))
    from scdataset import BlockShuffling, scDataset

    torch.set_num_threads(1)
    panels, n_genes, _ = corpus_panels(args.corpus)
    builder = Builder(panels, n_genes, args.k, 1e5)

    def batches():
        adata = ad.read_h5ad(args.h5ad, backed="r" if backed else None)
        dataset_idx = adata.obs["dataset_idx"].to_numpy()
        library = adata.obs["library_size"].to_numpy()

        def fetch(collection, idx):  # scdataset sorts the fetch's indices; one read of fetch_factor batches
            return collection.X[idx], dataset_idx[idx], library[idx]

        def take(fetched, positions):
            x, d, lib = fetched
            return x[positions], d[positions], lib[positions]

        return scDataset(adata, BlockShuffling(block_size=8), batch_size=args.micro_batch, fetch_factor=16,
                         drop_last=True, fetch_callback=fetch, batch_callback=take, seed=0)

    return consume(batches, lambda batch: builder(*batch))


def run_annbatch(args) -> dict:
    from annbatch import DatasetCollection, Loader

    panels, n_genes, _ = corpus_panels(args.corpus)
    builder = Builder(panels, n_genes, args.k, 1e5)

    def batches():
        collection = DatasetCollection(args.zarr, mode="r")
        return Loader(batch_size=args.micro_batch, chunk_size=64, preload_nchunks=32, shuffle=True,
                      drop_last=True, preload_to_gpu=False, rng=np.random.default_rng(0)).use_collection(collection)

    def build(out):
        obs = out["obs"]
        return builder(out["X"], obs["dataset_idx"].to_numpy().astype(np.int64),
                       obs["library_size"].to_numpy().astype(np.float64))

    return consume(batches, build)


def run_builder(args) -> dict:
    """The shared builder alone: the epoch's shuffled row batches are fetched (untimed) first, then built."""
    import anndata as ad

    panels, n_genes, _ = corpus_panels(args.corpus)
    builder = Builder(panels, n_genes, args.k, 1e5)
    adata = ad.read_h5ad(args.h5ad)
    dataset_idx, library = adata.obs["dataset_idx"].to_numpy(), adata.obs["library_size"].to_numpy()
    order = np.random.default_rng(0).permutation(adata.n_obs)
    rows = [np.sort(order[i:i + args.micro_batch]) for i in range(0, adata.n_obs - args.micro_batch + 1,
                                                                   args.micro_batch)]
    fetched = [(adata.X[r], dataset_idx[r], library[r]) for r in rows]
    return consume(lambda: fetched, lambda batch: builder(*batch))


def consume(make_batches, build) -> dict:
    """One epoch: open the data (``make_batches()``), build every batch. → samples and CPU/wall seconds."""
    user, system = user_cpu()
    wall, n = time.perf_counter(), 0
    for raw in make_batches():
        n += len(build(raw)["gene_idx"])
    user_end, system_end = user_cpu()
    return {"samples": n, "user_s": user_end - user, "sys_s": system_end - system,
            "wall_s": time.perf_counter() - wall}


def decode_cost(args) -> dict:
    """Decode µs/sample of every train row group: Parquet (read + checks) vs the memory-mapped cache.

    Both read every entry once (a sum over gene_idx and counts), so the lazy mmap pays its page faults.
    """
    from txfm.data import CorpusInfo, LoaderConfig, _list_units, _RowGroupReader

    info = CorpusInfo.open(args.corpus)
    units = _list_units(info.path, "train")
    out = {}
    for name, cache_dir in (("parquet", None), ("cache", LoaderConfig().cache_dir(info.path))):
        reader = _RowGroupReader(units.files, info, capacity=1, cache_dir=cache_dir)
        start = user_cpu()[0]
        for f, rg in zip(units.file.tolist(), units.row_group.tolist()):
            block = reader.get(f, rg)
            block.gene_idx.sum(dtype=np.int64), block.counts.sum()
        out[name] = (user_cpu()[0] - start) / units.rows.sum() * 1e6
    return out


# ------------------------------------------------------------------------------------------ preparation
def write_h5ad(corpus: Path, path: Path) -> None:
    """The train split as an AnnData: CSR counts [n, G], obs dataset_idx and library_size (record batches)."""
    import anndata as ad
    import pandas as pd
    import pyarrow.dataset as pads
    import scipy.sparse as sp

    from curation.io import atomic_path

    _, n_genes, names = corpus_panels(corpus)
    index = {name: i for i, name in enumerate(names)}
    indptr, indices, data, datasets, library = [np.zeros(1, dtype=np.int64)], [], [], [], []
    scanner = pads.dataset(corpus / "shards", partitioning="hive").scanner(
        columns=["dataset", "gene_idx", "counts", "library_size"], filter=pads.field("split") == "train")
    for batch in scanner.to_batches():
        genes, counts = batch.column("gene_idx"), batch.column("counts")
        offsets = genes.offsets.to_numpy().astype(np.int64)
        indptr.append(indptr[-1][-1] + offsets[1:] - offsets[0])
        indices.append(genes.values.to_numpy()[offsets[0]:offsets[-1]])
        data.append(counts.values.to_numpy()[offsets[0]:offsets[-1]])
        datasets += [index[name] for name in batch.column("dataset").to_pylist()]
        library.append(batch.column("library_size").to_numpy())
    matrix = sp.csr_matrix((np.concatenate(data), np.concatenate(indices), np.concatenate(indptr)),
                           shape=(len(datasets), n_genes))
    obs = pd.DataFrame({"dataset_idx": datasets, "library_size": np.concatenate(library)},
                       index=[str(i) for i in range(len(datasets))])
    with atomic_path(path) as tmp:
        ad.AnnData(X=matrix, obs=obs).write_h5ad(tmp)


def find_python312() -> str | None:
    """A Python ≥ 3.12 interpreter on this machine (annbatch's minimum), or None."""
    candidates = [shutil.which(n) for n in ("python3.13", "python3.12")]
    candidates += sorted(str(p) for p in Path("/root/.pyenv/versions").glob("3.1[2-9]*/bin/python"))
    for exe in filter(None, candidates):
        try:
            out = subprocess.run([exe, "-c", "import sys; print(sys.version_info >= (3, 12))"],
                                 capture_output=True, text=True, timeout=60)
        except OSError:
            continue
        if out.stdout.strip() == "True":
            return exe
    return None


def prepare_peers(peers: Path) -> dict[str, str]:
    """Install the peers (pip, into ``peers``); → {side: python executable or 'unavailable: reason'}."""
    python = {side: sys.executable for side in ("naive", "txfm", "txfm_parquet", "builder")}
    peers.mkdir(parents=True, exist_ok=True)
    target = peers / "scdataset"
    if not (target / "scdataset").is_dir():
        done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                               "scdataset"], capture_output=True, text=True)
        if done.returncode:
            python["scdataset_memory"] = python["scdataset_backed"] = \
                f"unavailable: pip install scdataset failed ({done.stderr.strip().splitlines()[-1:]})"
    python.setdefault("scdataset_memory", sys.executable)
    python.setdefault("scdataset_backed", sys.executable)
    venv = peers / "annbatch-venv"
    exe = venv / "bin" / "python"
    ready = exe.exists() and subprocess.run([str(exe), "-c", "import annbatch, numba, pyarrow"],
                                            capture_output=True).returncode == 0
    if not ready:  # new, or made before the builder needed numba
        base = find_python312()
        if base is None:
            python["annbatch"] = "unavailable: annbatch needs Python >= 3.12 and none was found on this machine"
            return python
        install = [str(exe), "-m", "pip", "install", "-q", "annbatch", "numpy", "numba", "pyarrow"]
        for step in ([base, "-m", "venv", str(venv)], install):
            done = subprocess.run(step, capture_output=True, text=True)
            if done.returncode:
                shutil.rmtree(venv, ignore_errors=True)
                python["annbatch"] = f"unavailable: {' '.join(step[-3:])} failed"
                return python
    python["annbatch"] = str(exe)
    return python


def write_collection(python: str, h5ad: Path, zarr_path: Path) -> None:
    """annbatch's pre-shuffled zarr collection of the h5ad (its documented preparation step), in its venv."""
    code = ("import sys, warnings; warnings.simplefilter('ignore'); from annbatch import DatasetCollection; "
            "DatasetCollection(sys.argv[2]).add_adatas([sys.argv[1]], shuffle=True)")
    subprocess.run([python, "-c", code, str(h5ad), str(zarr_path)], check=True, capture_output=True)


def run_side(python: str, side: str, args) -> dict:
    """Run one side in a child process (one thread for numpy/BLAS) and parse its JSON line."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore"}
    command = [python, __file__, "--side", side, "--corpus", str(args.corpus), "--h5ad", str(args.h5ad),
               "--zarr", str(args.zarr), "--peers", str(args.peers), "--k", str(args.k),
               "--micro-batch", str(args.micro_batch)]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"failed: {tail[:160]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=16_000, help="samples in the simulated corpus (both splits)")
    parser.add_argument("--genes", type=int, default=20_000, help="vocabulary size G")
    parser.add_argument("--datasets", type=int, default=4)
    parser.add_argument("--mean-library-size", type=float, default=6000.0,
                        help="single-cell depth; 6000 gives ~5k non-zeros per sample at G=20,000")
    parser.add_argument("--k", type=int, default=2048, help="input genes per sample")
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--sides", nargs="+", default=list(SIDES), choices=SIDES)
    parser.add_argument("--repeats", type=int, default=2, help="runs per side; the cheapest (CPU) is kept")
    parser.add_argument("--dir", type=Path, default=None, help="work directory, kept (default: a temporary one)")
    parser.add_argument("--peers", type=Path, default=None, help="where peers are installed (default: <dir>/peers)")
    # child mode
    parser.add_argument("--side", choices=SIDES + ("decode",), help=argparse.SUPPRESS)
    parser.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--h5ad", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--zarr", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.side:
        warm_up_builder()
        runners = {"txfm": lambda: run_txfm(args, "auto"), "txfm_parquet": lambda: run_txfm(args, "none"),
                   "naive": lambda: run_naive(args), "scdataset_memory": lambda: run_scdataset(args, False),
                   "scdataset_backed": lambda: run_scdataset(args, True), "annbatch": lambda: run_annbatch(args),
                   "builder": lambda: run_builder(args), "decode": lambda: decode_cost(args)}
        print(json.dumps(runners[args.side]()))
        return

    work = args.dir or Path(tempfile.mkdtemp(prefix="txfm-loader-bench-"))
    args.corpus, args.h5ad, args.zarr = work / "corpus", work / "train.h5ad", work / "annbatch.zarr"
    args.peers = args.peers or work / "peers"
    try:
        from simulation.corpus import write_synthetic_corpus
        from txfm.data import build_decode_cache

        if not args.corpus.exists():
            write_synthetic_corpus(args.corpus, n_samples=args.samples, n_genes=args.genes,
                                   n_datasets=args.datasets, mean_library_size=args.mean_library_size,
                                   panel_fraction=(0.7, 1.0))
        if not args.h5ad.exists():
            write_h5ad(args.corpus, args.h5ad)
        python = prepare_peers(args.peers)
        if "annbatch" in args.sides and not python["annbatch"].startswith("unavailable") and not args.zarr.exists():
            write_collection(python["annbatch"], args.h5ad, args.zarr)
        shutil.rmtree(args.corpus / ".decoded", ignore_errors=True)
        start = user_cpu()[0]
        build_decode_cache(args.corpus, "train")
        cache_seconds = user_cpu()[0] - start

        panels, n_genes, _ = corpus_panels(args.corpus)
        results, decode = {}, {}
        for _ in range(args.repeats):  # round-robin, so drifting machine load touches every side alike
            for side in args.sides:
                r = ({"error": python[side]} if python[side].startswith("unavailable")
                     else run_side(python[side], side, args))
                best = results.get(side)
                if best is None or ("samples" in r and ("samples" not in best or
                                                        r["user_s"] + r["sys_s"] < best["user_s"] + best["sys_s"])):
                    results[side] = r
            d = run_side(sys.executable, "decode", args)
            decode = {k: min(v, decode.get(k, v)) for k, v in d.items()} if "error" not in d else decode
        ours = results.get("txfm", {})
        n_train = ours.get("samples") or 1
        print(f"corpus: G={n_genes}, {len(panels)} datasets (panels {sorted(p.size for p in panels)}), "
              f"K={args.k}, B={args.micro_batch}, one full epoch of the train split; load average "
              f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        print(f"decode µs/sample (user CPU, every train row group): Parquet {decode.get('parquet', float('nan')):.1f}"
              f" → memory-mapped cache {decode.get('cache', float('nan')):.1f}; one-off cache build "
              f"{cache_seconds / n_train * 1e6:.1f} µs/sample")
        print(f"\n{'side':<28}{'samples':>9}{'user':>8}{'sys':>8}{'CPU µs/sample':>15}{'fetch':>8}{'wall s':>8}"
              f"{'CPU vs ours':>13}{'user vs ours':>14}")
        cost = {s: ((r["user_s"] + r["sys_s"]) / r["samples"], r["user_s"] / r["samples"])
                for s, r in results.items() if "samples" in r}
        for side in args.sides:
            r = results[side]
            if "error" in r:
                print(f"{LABELS[side]:<28}  {r['error']}")
                continue
            cpu, user = cost[side]
            ratios = (f"{cpu / cost['txfm'][0]:>12.2f}x{user / cost['txfm'][1]:>13.2f}x" if "txfm" in cost
                      else "")
            fetch = f"{(cpu - cost['builder'][0]) * 1e6:>8.1f}" if "builder" in cost else f"{'–':>8}"
            print(f"{LABELS[side]:<28}{r['samples']:>9}{user * 1e6:>8.1f}{r['sys_s'] / r['samples'] * 1e6:>8.1f}"
                  f"{cpu * 1e6:>15.1f}{fetch}{r['wall_s']:>8.1f}{ratios}")
        peers = [s for s in PEERS if s in cost]
        if "txfm" in cost and peers:
            for i, name in ((0, "CPU (user+sys)"), (1, "user CPU")):
                best = min(peers, key=lambda s: cost[s][i])
                print(f"per {name} second, ours = {cost[best][i] / cost['txfm'][i]:.2f}x the best peer "
                      f"({LABELS[best]}); goal ≥ 3x")
            if "builder" in cost:
                fetch = {s: cost[s][0] - cost["builder"][0] for s in peers + ["txfm"]}
                best = min(peers, key=fetch.get)
                print(f"fetch only (CPU µs/sample minus the builder's): ours {fetch['txfm'] * 1e6:.1f}, best peer "
                      f"{LABELS[best]} {fetch[best] * 1e6:.1f}")
                # Every side pays the builder, so even a loader whose fetch cost nothing would stop here.
                best = min(peers, key=lambda s: cost[s][0])
                print(f"ceiling of the CPU ratio with a free fetch (best peer / builder alone): "
                      f"{cost[best][0] / cost['builder'][0]:.2f}x")
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
