"""Peak memory of `txfm evaluate` (Lib+Log and HVG+PCA) on large simulated screens: it must not grow with cells.

For each requested size, writes a simulated CRISPR screen with planted modules (``simulation.screen``,
streamed to an h5ad, ``--genes`` genes) and its planted relationship database into a temporary directory,
then evaluates it in a fresh child process (``run_evaluation`` with the ``liblog`` and ``hvg_pca`` embedders and
``protocol="efaar"``, the streamed pipeline; the screen read backed), which reports its own peak resident set size (``getrusage(RUSAGE_SELF).ru_maxrss``,
interpreter and imports included). Prints one row per size and the ratio of the largest peak to the smallest.

    .venv/bin/python benchmarks/evaluate_memory.py                          # 20k and 100k cells × 10k genes
    .venv/bin/python benchmarks/evaluate_memory.py --cells 5000 20000 --genes 2000 --blas-threads 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from _memory import measure_sizes, peak_rss_mb, run_child


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, nargs="+", default=[20_000, 100_000], help="cells per run")
    parser.add_argument("--genes", type=int, default=10_000, help="genes in each simulated screen")
    parser.add_argument("--modules", type=int, default=60, help="planted modules (8 perturbed genes each)")
    parser.add_argument("--label-column", default=None, help="also run the probes on this obs column (e.g. module)")
    parser.add_argument("--blas-threads", type=int, default=None,
                        help="threads for BLAS/OpenMP in the child (OPENBLAS/OMP/MKL_NUM_THREADS); 1 avoids "
                             "OpenBLAS spin-waiting on an oversubscribed machine (default: library default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tmp", type=Path, default=None, help="scratch directory (default: system temp)")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)  # internal: evaluate one screen, report
    args = parser.parse_args(argv)
    if args.child:
        return _child(args.child)

    measure_sizes(args.cells, lambda directory, n: _measure(directory, n, args), _HEADER, _format_row, args.tmp,
                  "evaluate-bench-")
    return 0


def _measure(directory: Path, n_cells: int, args: argparse.Namespace) -> dict:
    """Simulate one screen (in this process), evaluate it in a child process; returns the table row."""
    from simulation.screen import plan_screen, write_relationships, write_screen_h5ad

    directory.mkdir(parents=True)
    plan = plan_screen(n_cells=n_cells, n_genes=args.genes, n_modules=args.modules, genes_per_module=8,
                       n_inert=args.modules * 2, n_batches=8, mean_library=2500.0, seed=args.seed)
    started = time.perf_counter()
    screen = write_screen_h5ad(directory / "screen.h5ad", plan, chunk_rows=1000, progress=True)
    write_seconds = time.perf_counter() - started
    write_relationships(directory / "db" / "PLANTED.txt", plan.relationships)
    job = {"input": str(screen), "out": str(directory / "eval"), "relationships": str(directory / "db"),
           "label_column": args.label_column, "seed": args.seed}
    job_path = directory / "job.json"
    job_path.write_text(json.dumps(job))
    env = {}
    if args.blas_threads is not None:
        env = {name: str(args.blas_threads) for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    result = run_child(__file__, job_path, f"evaluation of {n_cells} cells", env)
    return {"cells": n_cells, "input_mb": screen.stat().st_size / 2**20, "write_s": write_seconds, **result}


def _child(job_path: Path) -> int:
    """Evaluate one screen in this process; print a JSON line with time, peak RSS and the recall."""
    import pandas as pd

    from curation.io import limit_heap_fragmentation
    from txfm.evaluate import EvaluationConfig, run_evaluation
    from simulation.screen import BATCH_COLUMN, CONTROL_LABEL, PERTURBATION_COLUMN

    limit_heap_fragmentation()  # as `txfm evaluate` does
    job = json.loads(job_path.read_text())
    cfg = EvaluationConfig(input=job["input"], perturbation_column=PERTURBATION_COLUMN, control_labels=[CONTROL_LABEL],
                           batch_column=BATCH_COLUMN, out=job["out"], embedders=["liblog", "hvg_pca"],
                           label_column=job["label_column"], relationships=job["relationships"], seed=job["seed"],
                           progress=False, protocol="efaar")  # the streamed pipeline; the paper protocol holds
    # its scored cells (at most --max-cells × embedding width) in memory by design
    started = time.perf_counter()
    results: pd.DataFrame = run_evaluation(cfg).set_index("embedder")
    seconds = time.perf_counter() - started
    timing = json.loads((Path(job["out"]) / "report.json").read_text())["embedders"]
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_rss_mb(),
                      "liblog_s": timing["liblog"]["seconds"], "hvg_pca_s": timing["hvg_pca"]["seconds"],
                      "recall_liblog": float(results.loc["liblog", "recall_avg_5_95"]),
                      "recall_hvg_pca": float(results.loc["hvg_pca", "recall_avg_5_95"])}))
    return 0


_HEADER = (f"{'cells':>9} {'input MB':>9} {'write s':>8} {'eval s':>8} {'liblog s':>9} {'hvg_pca s':>9} "
           f"{'peak RSS MB':>12} {'recall liblog':>13} {'recall hvg':>11}")


def _format_row(row: dict) -> str:
    return (f"{row['cells']:>9,} {row['input_mb']:>9.1f} {row['write_s']:>8.1f} {row['seconds']:>8.1f} "
            f"{row['liblog_s']:>9.1f} {row['hvg_pca_s']:>9.1f} {row['peak_rss_mb']:>12.1f} "
            f"{row['recall_liblog']:>13.3f} {row['recall_hvg_pca']:>11.3f}")


if __name__ == "__main__":
    sys.exit(main())
