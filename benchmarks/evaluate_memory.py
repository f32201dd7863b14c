"""Peak memory of `txfm evaluate` (Lib+Log and HVG+PCA) on large simulated screens: it must not grow with cells.

For each requested size, writes a simulated CRISPR screen with planted modules (``txfm.evaluate.simulate``,
streamed to an h5ad, ``--genes`` genes) and its planted relationship database into a temporary directory,
then evaluates it in a fresh child process (``run_evaluation`` with the ``liblog`` and ``hvg_pca`` embedders,
the screen read backed), which reports its own peak resident set size (``getrusage(RUSAGE_SELF).ru_maxrss``,
interpreter and imports included). Prints one row per size and the ratio of the largest peak to the smallest.

    .venv/bin/python benchmarks/evaluate_memory.py                          # 20k and 100k cells × 10k genes
    .venv/bin/python benchmarks/evaluate_memory.py --cells 5000 20000 --genes 2000 --blas-threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GOAL_RATIO = 1.2


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

    rows: list[dict] = []
    print(_header(), flush=True)
    with tempfile.TemporaryDirectory(dir=args.tmp, prefix="evaluate-bench-") as scratch:
        for n_cells in sorted(args.cells):
            rows.append(_measure(Path(scratch) / f"cells_{n_cells}", n_cells, args))
            print(_format_row(rows[-1]), flush=True)
    ratio = rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"]
    verdict = "OK" if ratio <= GOAL_RATIO else "ABOVE GOAL"
    print(f"\npeak RSS ratio {rows[-1]['cells']:,} / {rows[0]['cells']:,} cells: {ratio:.2f} "
          f"(goal ≤ {GOAL_RATIO}) {verdict}")
    return 0


def _measure(directory: Path, n_cells: int, args: argparse.Namespace) -> dict:
    """Simulate one screen (in this process), evaluate it in a child process; returns the table row."""
    from txfm.evaluate.simulate import plan_screen, write_relationships, write_screen_h5ad

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
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if args.blas_threads is not None:
        env.update({name: str(args.blas_threads) for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")})
    child = subprocess.run([sys.executable, __file__, "--child", str(job_path)], capture_output=True, text=True,
                           cwd=REPO, env=env, check=False)
    if child.returncode != 0:
        raise SystemExit(f"evaluation of {n_cells} cells failed:\n{child.stderr[-3000:]}")
    result = json.loads(child.stdout.strip().splitlines()[-1])
    return {"cells": n_cells, "input_mb": screen.stat().st_size / 2**20, "write_s": write_seconds, **result}


def _child(job_path: Path) -> int:
    """Evaluate one screen in this process; print a JSON line with time, peak RSS and the recall."""
    import pandas as pd

    from curation.io import limit_heap_fragmentation
    from txfm.evaluate import EvaluationConfig, run_evaluation
    from txfm.evaluate.simulate import BATCH_COLUMN, CONTROL_LABEL, PERTURBATION_COLUMN

    limit_heap_fragmentation()  # as `txfm evaluate` does
    job = json.loads(job_path.read_text())
    cfg = EvaluationConfig(input=job["input"], perturbation_column=PERTURBATION_COLUMN, control_labels=[CONTROL_LABEL],
                           batch_column=BATCH_COLUMN, out=job["out"], embedders=["liblog", "hvg_pca"],
                           label_column=job["label_column"], relationships=job["relationships"], seed=job["seed"],
                           progress=False)
    started = time.perf_counter()
    results: pd.DataFrame = run_evaluation(cfg).set_index("embedder")
    seconds = time.perf_counter() - started
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kibibytes on Linux
    timing = json.loads((Path(job["out"]) / "report.json").read_text())["embedders"]
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_kb / 1024,
                      "liblog_s": timing["liblog"]["seconds"], "hvg_pca_s": timing["hvg_pca"]["seconds"],
                      "recall_liblog": float(results.loc["liblog", "recall_avg_5_95"]),
                      "recall_hvg_pca": float(results.loc["hvg_pca", "recall_avg_5_95"])}))
    return 0


def _header() -> str:
    header = (f"{'cells':>9} {'input MB':>9} {'write s':>8} {'eval s':>8} {'liblog s':>9} {'hvg_pca s':>9} "
              f"{'peak RSS MB':>12} {'recall liblog':>13} {'recall hvg':>11}")
    return header + "\n" + "-" * len(header)


def _format_row(row: dict) -> str:
    return (f"{row['cells']:>9,} {row['input_mb']:>9.1f} {row['write_s']:>8.1f} {row['seconds']:>8.1f} "
            f"{row['liblog_s']:>9.1f} {row['hvg_pca_s']:>9.1f} {row['peak_rss_mb']:>12.1f} "
            f"{row['recall_liblog']:>13.3f} {row['recall_hvg_pca']:>11.3f}")


if __name__ == "__main__":
    sys.exit(main())
