"""Does the loader keep up? Loader samples/s (0, 1, 2 workers) against the training step's consumption rate.

    .venv/bin/python benchmarks/loader_vs_step.py                       # CPU: S at K=2048, micro-batch 4
    .venv/bin/python benchmarks/loader_vs_step.py --micro-batch 64 --device cuda --workers 0 2 4 8

Both are measured on the same machine in the same run, on the same synthetic corpus. The loader reads the
trainer's stream layout — ``--accum`` streams of one rank, sparse targets (the trainer default) — so with a
worker count that divides the number of streams every row group is decoded by exactly one worker (worker w
builds yielded micro-batches w, w+n, …, i.e. whole streams). The step rate is the trainer step of
benchmarks/train_throughput.py (trainer defaults, median of ``--steps``). Goal: loader ≥ 3× the step rate.
Loader rates are wall-clock, including worker start-up, best of ``--repeats``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_throughput import DEFAULTS, spawn_row  # noqa: E402

from txfm.data import CorpusInfo, LoaderConfig, make_loader  # noqa: E402
from simulation.corpus import write_synthetic_corpus  # noqa: E402


def loader_rate(info: CorpusInfo, cfg: LoaderConfig, accum: int, max_batches: int, repeats: int) -> float:
    """Best wall-clock samples/s over ``repeats`` reads of up to ``max_batches`` micro-batches."""
    best = 0.0
    for _ in range(repeats):
        start, samples = time.perf_counter(), 0
        for i, batch in enumerate(make_loader(info, cfg, list(range(accum)), accum, epoch=0)):
            samples += batch["gene_idx"].shape[0]
            if i + 1 == max_batches:
                break
        best = max(best, samples / (time.perf_counter() - start))
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="S")
    parser.add_argument("--k", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--accum", type=int, default=4, help="streams per rank (gradient accumulation)")
    parser.add_argument("--genes", type=int, default=8000)
    parser.add_argument("--samples", type=int, default=6000)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--loader-batches", type=int, default=400, help="micro-batches read per measurement")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args(argv)
    work = args.dir or Path(tempfile.mkdtemp(prefix="txfm-loader-vs-step-"))
    corpus = work / "corpus"
    try:
        if not corpus.exists():
            write_synthetic_corpus(corpus, n_samples=args.samples, n_genes=args.genes, n_datasets=3,
                                   panel_fraction=(0.7, 1.0), mean_library_size=4000.0, val_fraction=0.1)
        info = CorpusInfo.open(corpus)
        step = spawn_row({"corpus": str(corpus), "preset": args.preset, "micro_batch": args.micro_batch,
                          "k": args.k, "steps": args.steps, "warmup": 1, "threads": 0, "device": args.device,
                          "switches": dict(DEFAULTS)})
        if "error" in step:
            raise SystemExit(f"step measurement failed: {step['error']}")
        print(f"{args.preset} step, K={args.k}, B={args.micro_batch}, G={info.n_genes} on {step['device']}: "
              f"{step['samples_per_s']:.2f} samples/s ({step['step_s']:.2f} s/step)")
        print(f"{'workers':>8}{'loader samples/s':>18}{'÷ step rate':>13}")
        for workers in args.workers:
            cfg = LoaderConfig(micro_batch=args.micro_batch, n_input_genes=args.k, num_workers=workers,
                               target_format="sparse")
            rate = loader_rate(info, cfg, args.accum, args.loader_batches, args.repeats)
            print(f"{workers:>8}{rate:>18.0f}{rate / step['samples_per_s']:>12.0f}×", flush=True)
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
