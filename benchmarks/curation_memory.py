"""Peak memory and throughput of `curate` on large simulated h5ad files: memory must not grow with cells.

For each requested size, writes a simulated raw-count h5ad (streamed, ``simulation.sources.write_large_h5ad``)
into a temporary directory and curates it in a fresh child process, which reports its own peak resident set
size (``getrusage(RUSAGE_SELF).ru_maxrss``) — so every size is measured alone, interpreter and imports
included. Prints a table and the ratio of the largest run's peak to the smallest's (goal ≤ 1.2).

    .venv/bin/python benchmarks/curation_memory.py                       # 50k and 500k cells
    .venv/bin/python benchmarks/curation_memory.py --cells 20000 200000 --genes 2000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

from _memory import measure_sizes, peak_rss_mb, run_child


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, nargs="+", default=[50_000, 500_000], help="cells per run")
    parser.add_argument("--genes", type=int, default=2_000, help="features in each simulated file")
    parser.add_argument("--chunk-size", type=int, default=10_000, help="curation chunk size (cells)")
    parser.add_argument("--min-genes-per-cell", type=int, default=200, help="QC threshold for the runs")
    parser.add_argument("--min-cells-per-gene", type=int, default=10, help="QC threshold for the runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tmp", type=Path, default=None, help="scratch directory (default: system temp)")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)  # internal: curate one config, report
    args = parser.parse_args(argv)
    if args.child:
        return _child(args.child)

    measure_sizes(args.cells, lambda directory, n: _measure(directory, n, args), _HEADER, _format_row, args.tmp,
                  "curation-bench-")
    return 0


def _measure(directory: Path, n_cells: int, args: argparse.Namespace) -> dict:
    """Simulate one file, curate it in a child process; returns the row of the result table."""
    from simulation.sources import write_large_h5ad

    directory.mkdir(parents=True)
    matrix = directory / "cells.h5ad"
    write_large_h5ad(matrix, n_cells=n_cells, n_genes=args.genes, seed=args.seed)
    config = {"raw_dir": str(directory), "work_dir": str(directory / "work"), "corpus_dir": str(directory / "c"),
              "chunk_size": args.chunk_size,
              "datasets": {"bench": {"modality": "single_cell", "format": "h5ad", "files": {"matrix": str(matrix)},
                                     "qc": {"min_genes_per_cell": args.min_genes_per_cell,
                                            "min_cells_per_gene": args.min_cells_per_gene}}}}
    config_path = directory / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    result = run_child(__file__, config_path, f"curation of {n_cells} cells")
    return {"cells": n_cells, "input_mb": matrix.stat().st_size / 2**20, "seconds": result["seconds"],
            "cells_per_s": n_cells / result["seconds"], "peak_rss_mb": result["peak_rss_mb"],
            "kept": result["n_samples"]}


def _child(config_path: Path) -> int:
    """Curate the single dataset of ``config_path`` in this process; print a JSON line with the results."""
    from curation.config import dataset_spec, load_config
    from curation.curate import curate_dataset
    from curation.genes import GeneTable
    from curation.io import limit_heap_fragmentation

    limit_heap_fragmentation()  # as `python -m curation` does
    config = load_config(config_path)
    spec = dataset_spec(config, "bench")
    gene_table = GeneTable.load()
    start = time.perf_counter()
    report = curate_dataset("bench", spec, Path(config["work_dir"]), gene_table=gene_table,
                            chunk_size=spec["chunk_size"], progress=False)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "n_samples": report["n_samples"]}))
    return 0


def _format_row(row: dict) -> str:
    return (f"{row['cells']:>10,} {row['input_mb']:>10.1f} {row['seconds']:>9.1f} {row['cells_per_s']:>10,.0f} "
            f"{row['peak_rss_mb']:>12.1f} {row['kept']:>10,}")


_HEADER = f"{'cells':>10} {'input MB':>10} {'seconds':>9} {'cells/s':>10} {'peak RSS MB':>12} {'kept':>10}"


if __name__ == "__main__":
    sys.exit(main())
