"""Shared driver of the memory benchmarks: one fresh child process per input size, peak RSS per child.

Each benchmark script measures one size in a child (``<script> --child <job file>``) so that every peak RSS
(``getrusage(RUSAGE_SELF).ru_maxrss``: interpreter and imports included) belongs to that size alone.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
GOAL_RATIO = 1.2


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, MB (Linux reports kibibytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(script: str, job_path: Path, what: str, env: dict[str, str] | None = None) -> dict:
    """Run ``script --child job_path`` in a fresh interpreter; return the JSON of its last stdout line."""
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    child = subprocess.run([sys.executable, script, "--child", str(job_path)], capture_output=True, text=True,
                           cwd=REPO, env=env, check=False)
    if child.returncode != 0:
        raise SystemExit(f"{what} failed:\n{child.stderr[-3000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def measure_sizes(sizes: list[int], measure: Callable[[Path, int], dict], header: str,
                  format_row: Callable[[dict], str], tmp: Path | None, prefix: str) -> list[dict]:
    """``measure(directory, n_cells)`` for each size (ascending) in a scratch directory; print the table as it
    fills and the ratio of the largest run's peak RSS to the smallest's against GOAL_RATIO."""
    rows: list[dict] = []
    print(header + "\n" + "-" * len(header), flush=True)
    with tempfile.TemporaryDirectory(dir=tmp, prefix=prefix) as scratch:
        for n_cells in sorted(sizes):
            rows.append(measure(Path(scratch) / f"cells_{n_cells}", n_cells))
            print(format_row(rows[-1]), flush=True)
    ratio = rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"]
    verdict = "OK" if ratio <= GOAL_RATIO else "ABOVE GOAL"
    print(f"\npeak RSS ratio {rows[-1]['cells']:,} / {rows[0]['cells']:,} cells: {ratio:.2f} "
          f"(goal ≤ {GOAL_RATIO}) {verdict}")
    return rows
