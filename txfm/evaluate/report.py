"""Outputs of ``txfm evaluate``: the results table (CSV + Markdown) and PNG plots, each written atomically."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from curation.io import atomic_path

def format_value(value: object) -> str:
    """One Markdown cell: floats to 3 significant decimals, NaN/None as '–'."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, (float, np.floating)):
        return f"{value:.4g}" if abs(value) >= 1 else f"{value:.3f}"
    return str(value)


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table of ``frame`` (no index)."""
    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(format_value(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body]) + "\n"


def write_results(results: pd.DataFrame, out_dir: str | os.PathLike, stem: str = "results") -> tuple[Path, Path]:
    """``<out>/<stem>.csv`` (all columns) and ``<out>/<stem>.md`` (same rows and columns); returns both paths."""
    out_dir = Path(out_dir)
    csv_path, md_path = out_dir / f"{stem}.csv", out_dir / f"{stem}.md"
    with atomic_path(csv_path) as tmp:
        results.to_csv(tmp, index=False)
    with atomic_path(md_path) as tmp:
        tmp.write_text(markdown_table(results))
    return csv_path, md_path


def write_frame(frame: pd.DataFrame, path: str | os.PathLike) -> Path:
    """A CSV, atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return path


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_recall(recall: pd.DataFrame, path: str | os.PathLike, lower: float = 5.0, upper: float = 95.0) -> Path:
    """Grouped bars: recall per database (and the average) at one threshold, one bar per embedder.

    ``recall``: long table with columns embedder, database, lower, upper, recall. A dashed line marks the
    rate at which random pairs are called, ``(lower + 100 − upper) / 100``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = recall[(recall["lower"] == lower) & (recall["upper"] == upper)]
    table = rows.pivot_table(index="database", columns="embedder", values="recall", sort=False)
    table.loc["average"] = table.mean(axis=0, skipna=True)
    embedders: Sequence[str] = list(dict.fromkeys(rows["embedder"]))
    table = table[embedders]
    positions = np.arange(len(table.index))
    width = 0.8 / max(len(embedders), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(table.index) * max(1, len(embedders)) / 2), 4))
    for i, embedder in enumerate(embedders):
        ax.bar(positions + (i - (len(embedders) - 1) / 2) * width, table[embedder].to_numpy(), width, label=embedder)
    ax.axhline((lower + 100.0 - upper) / 100.0, color="grey", linestyle="--", linewidth=1, label="random pairs")
    ax.set_xticks(positions, table.index)
    ax.set_ylabel(f"recall (called below P{lower:g} / above P{upper:g})")
    ax.set_title("Known-relationship recall")
    ax.legend(fontsize=8, ncols=2)
    return _save(fig, Path(path))


def plot_consistency(consistency: pd.DataFrame, path: str | os.PathLike, p_threshold: float = 0.01) -> Path:
    """Left: histogram of (consistency − null mean) per embedder. Right: ECDF of p-values, threshold marked.

    ``consistency``: long table with columns embedder, consistency, null_mean, p_value.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    scored = consistency[consistency["p_value"].notna()]
    for embedder, rows in scored.groupby("embedder", sort=False):
        excess = (rows["consistency"] - rows["null_mean"]).to_numpy()
        left.hist(excess, bins=30, histtype="step", linewidth=1.5, label=embedder)
        p = np.sort(rows["p_value"].to_numpy())
        right.step(p, np.arange(1, p.size + 1) / p.size, where="post", label=embedder)
    left.axvline(0.0, color="grey", linestyle="--", linewidth=1)
    left.set_xlabel("mean cosine similarity of a perturbation's cells − null mean")
    left.set_ylabel("perturbations")
    left.set_title("Perturbation consistency")
    right.axvline(p_threshold, color="grey", linestyle="--", linewidth=1, label=f"p = {p_threshold:g}")
    right.set_xscale("log")
    right.set_xlabel("permutation p-value")
    right.set_ylabel("fraction of perturbations ≤ p")
    for ax in (left, right):
        ax.legend(fontsize=8)
    return _save(fig, Path(path))
