"""DATACARD.md: the corpus's Table 1 (dataset, modality, samples, genes) and what curation removed.

``write_datacard(corpus_dir, reports)`` takes the per-dataset summaries that ``build_corpus`` stores under
``datasets`` in manifest.json, so a card can be re-rendered from a built corpus alone
(``python -m curation datacard CORPUS``). It also draws ``detected_genes.png``: the distribution of
``n_genes_detected`` per dataset, accumulated over the shards in fixed log-spaced bins (bounded memory).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pyarrow.parquet as pq

from curation import schema
from curation.io import atomic_path

PLOT_FILE = "detected_genes.png"
#: Validation batches quoted by name per dataset before the list is abbreviated.
MAX_LISTED_BATCHES = 20
HISTOGRAM_BINS = 60


def write_datacard(corpus_dir: str | Path, reports: Mapping[str, Mapping[str, Any]]) -> None:
    """Write ``<corpus>/DATACARD.md`` and ``<corpus>/detected_genes.png`` (both atomically).

    ``reports`` maps dataset name → summary with keys (missing ones print as "n/a"): modality, n_samples,
    n_train, n_val, n_genes, n_raw_samples, n_curated, qc_removed ({reason: n}), dedup_removed,
    dedup_removed_by_reason ({reason: n}), dedup_removed_by_dataset ({other dataset: n}),
    phenoprint_removed, n_unmapped_genes, unmapped_gene_examples, n_genes_below_qc, train_batches, val_batches (list),
    source, licence.
    """
    corpus = Path(corpus_dir)
    n_vocabulary = pq.read_metadata(corpus / schema.GENES_FILE).num_rows
    edges, histograms = detected_genes_histograms(corpus, max(n_vocabulary, 10))
    with atomic_path(corpus / PLOT_FILE) as tmp:
        _plot_histograms(tmp, edges, histograms)
    text = render_datacard(reports, n_vocabulary)
    with atomic_path(corpus / schema.DATACARD_FILE) as tmp:
        tmp.write_text(text, encoding="utf-8")


def render_datacard(reports: Mapping[str, Mapping[str, Any]], n_vocabulary: int) -> str:
    """The Markdown text of the data card."""
    lines = ["# DiverseRNA data card", "",
             f"Corpus format {schema.FORMAT_VERSION}. Samples are raw counts over each dataset's measured gene "
             "panel, after QC, cross-dataset deduplication and phenotypic pruning (see below).", "",
             "## Table 1: datasets", "", table1_markdown(reports, n_vocabulary), "",
             f"![Genes detected per sample, by dataset]({PLOT_FILE})", "", "## Curation by dataset", ""]
    for name in sorted(reports):
        lines += _dataset_section(name, reports[name])
    return "\n".join(lines).rstrip() + "\n"


def table1_markdown(reports: Mapping[str, Mapping[str, Any]], n_vocabulary: int) -> str:
    """The paper's Table 1 as a Markdown table: dataset, modality, samples, genes, and the total row.

    The total's genes is the corpus vocabulary (union of the panels), not the sum of panel sizes.
    """
    rows = ["| Dataset | Modality | Samples | Genes |", "|---|---|---:|---:|"]
    for name in sorted(reports):
        report = reports[name]
        rows.append(f"| {name} | {report.get('modality', 'n/a')} | {_number(report.get('n_samples'))} | "
                    f"{_number(report.get('n_genes'))} |")
    total = sum(int(r.get("n_samples") or 0) for r in reports.values())
    rows.append(f"| **Total** | | **{_number(total)}** | **{_number(n_vocabulary)}** |")
    return "\n".join(rows)


def detected_genes_histograms(corpus: Path, max_genes: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Histogram counts of n_genes_detected per dataset over log-spaced bins from 1 to ``max_genes``.

    Returns (bin edges, shape (HISTOGRAM_BINS + 1,); {dataset: counts, shape (HISTOGRAM_BINS,)}). Samples
    with 0 detected genes fall into the first bin. Reads only the n_genes_detected column.
    """
    edges = np.logspace(0, np.log10(max_genes), HISTOGRAM_BINS + 1)
    histograms: dict[str, np.ndarray] = {}
    for shard in schema.list_shards(corpus):
        dataset = shard.parent.name.removeprefix("dataset=")
        counts = histograms.setdefault(dataset, np.zeros(HISTOGRAM_BINS, dtype=np.int64))
        for batch in pq.ParquetFile(shard, pre_buffer=False).iter_batches(columns=["n_genes_detected"]):
            detected = np.clip(batch.column(0).to_numpy(zero_copy_only=False), edges[0], edges[-1])
            counts += np.histogram(detected, bins=edges)[0]
    return edges, dict(sorted(histograms.items()))


def _plot_histograms(path: Path, edges: np.ndarray, histograms: Mapping[str, np.ndarray]) -> None:
    """Step histograms (one line per dataset, normalised to its sample count) on a log x axis, PNG."""
    from matplotlib.figure import Figure  # Figure + savefig use the Agg canvas; no pyplot global state

    figure = Figure(figsize=(7, 4), dpi=100)
    axes = figure.subplots()
    for dataset, counts in histograms.items():
        total = counts.sum()
        axes.stairs(counts / total if total else counts, edges, label=f"{dataset} (n={total:,})")
    axes.set_xscale("log")
    axes.set_xlabel("genes detected per sample (n_genes_detected)")
    axes.set_ylabel("fraction of samples")
    axes.set_title("Detected genes by dataset")
    if histograms:
        axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, format="png", metadata={"Software": None})


def _dataset_section(name: str, report: Mapping[str, Any]) -> list[str]:
    source = report.get("source") or "n/a"
    licence = report.get("licence") or "n/a"
    qc = report.get("qc_removed") or {}
    qc_total = sum(int(v) for v in qc.values()) if qc else None
    val_batches = list(report.get("val_batches") or [])
    listed = ", ".join(f"`{b}`" for b in val_batches[:MAX_LISTED_BATCHES])
    if len(val_batches) > MAX_LISTED_BATCHES:
        listed += f", … ({len(val_batches) - MAX_LISTED_BATCHES} more)"
    n_batches = len(val_batches) + int(report.get("train_batches") or 0)
    examples = ", ".join(f"`{g}`" for g in report.get("unmapped_gene_examples") or [])
    return [
        f"### {name}", "",
        f"{report.get('modality', 'n/a')}; source: {source}; licence: {licence}.", "",
        "| Step | Samples |", "|---|---:|",
        f"| input | {_number(report.get('n_raw_samples'))} |",
        f"| removed by QC | {_number(qc_total)}{_breakdown(qc)} |",
        f"| after QC | {_number(report.get('n_curated'))} |",
        f"| removed by dedup | {_number(report.get('dedup_removed'))}"
        f"{_breakdown(report.get('dedup_removed_by_reason') or {})} |",
        f"| removed by phenoprint | {_number(report.get('phenoprint_removed'))} |",
        f"| in corpus | {_number(report.get('n_samples'))} (train {_number(report.get('n_train'))}, "
        f"val {_number(report.get('n_val'))}) |", "",
        f"Duplicates removed, by the dataset holding the kept copy: "
        f"{_inline(report.get('dedup_removed_by_dataset') or {})}.", "",
        f"Unmapped genes: {_number(report.get('n_unmapped_genes'))}" + (f" (e.g. {examples})." if examples else "."),
        "",
        f"Mapped genes below the QC detection threshold (not in the panel): "
        f"{_number(report.get('n_genes_below_qc'))}; panel: {_number(report.get('n_genes'))} genes.", "",
        f"Validation batches: {len(val_batches)} of {n_batches}" + (f": {listed}." if listed else "."), "",
    ]


def _number(value: Any) -> str:
    return "n/a" if value is None else f"{int(value):,}"


def _breakdown(counts: Mapping[str, Any]) -> str:
    """The non-zero counts as a parenthesised "key: n" list (empty string when there are none)."""
    nonzero = {key: n for key, n in counts.items() if n}
    return f" ({_inline(nonzero)})" if nonzero else ""


def _inline(counts: Mapping[str, Any]) -> str:
    return ", ".join(f"{key}: {_number(n)}" for key, n in sorted(counts.items())) or "none"
