"""HTML tables for the Snakemake report (``snakemake --report``), one subcommand per table.

    report_tables.py table1     --manifest CORPUS/manifest.json --paper '<json name -> {samples, genes}>' --out F
    report_tables.py training   --run RUN --out F
    report_tables.py evaluation --results a/results.csv b/results.csv --screens a b --out F [--markdown M]

The evaluation page leads with the columns of the paper's Tables 2 and 9–11 (ilisi, lin, knn, p.cst, bmdb, inv,
avg; mean ± std over seeds, the best post-processing per task, ×100 except iLISI), then the full results table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from curation.io import atomic_path

PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif}} table{{border-collapse:collapse}} td,th{{padding:2px 8px;border:1px solid #ccc}}
td{{text-align:right}}</style></head>
<body><h2>{title}</h2>{body}</body></html>
"""


def write_page(path: Path, title: str, body: str) -> None:
    """Write one self-contained HTML page atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(PAGE.format(title=title, body=body), encoding="utf-8")


def table1(manifest: Mapping[str, Any], paper: Mapping[str, Mapping[str, Any] | None]) -> pd.DataFrame:
    """Table 1: per dataset, modality, samples and genes in this corpus next to the paper's counts."""
    rows = []
    for name, report in sorted(manifest["datasets"].items()):
        counts = paper.get(name) or {}
        rows.append({"dataset": name, "modality": report.get("modality"), "samples": report.get("n_samples"),
                     "genes": report.get("n_genes"), "paper samples": counts.get("samples"),
                     "paper genes": counts.get("genes")})
    frame = pd.DataFrame(rows)
    total = {"dataset": "Total", "modality": "", "samples": int(frame["samples"].fillna(0).sum()),
             "genes": manifest.get("n_genes"),
             "paper samples": int(frame["paper samples"].fillna(0).sum()) or None, "paper genes": None}
    return pd.concat([frame, pd.DataFrame([total])], ignore_index=True)


#: results.csv column → the paper's column header (Tables 2, 9–11), in the paper's order.
PAPER_COLUMNS = {"ilisi": "ilisi", "lin": "lin", "knn": "knn", "pcst": "p.cst", "bmdb": "bmdb", "inv": "inv",
                 "avg": "avg"}
EMBEDDER_LABELS = {"txfm": "TxFM (CLS)", "txfm_codebook": "TxFM codebook (genes)",
                   "txfm_decoder": "TxFM decoder (genes)", "liblog": "(Lib+Log)Norm", "hvg_pca": "(Lib+Log)Norm+HVG+PCA",
                   "pca_screen": "PCA (fit on the screen)", "pca_corpus": "PCA [corpus]", "random": "Random embedding",
                   "mean_expression": "mean expression (reconstruction)"}


def _cell(row: Mapping[str, Any], column: str) -> str:
    value = row.get(column)
    if value is None or pd.isna(value):
        return ""
    scale, digits = (1.0, 2) if column == "ilisi" else (100.0, 2)
    std = row.get(f"{column}_std")
    text = f"{value * scale:.{digits}f}"
    if std is not None and not pd.isna(std):
        text += f" ± {std * scale:.{digits}f}"
    return text


def paper_table(results: pd.DataFrame) -> pd.DataFrame:
    """The paper's columns of a results.csv (paper protocol): one row per embedder, strings 'mean ± std'
    (×100 except ilisi; avg without std), plus the chosen post-processing per task."""
    rows = []
    for row in results.to_dict("records"):
        if not any(c in row and not pd.isna(row[c]) for c in PAPER_COLUMNS):
            continue
        out = {"model": EMBEDDER_LABELS.get(row["embedder"], row["embedder"])}
        out.update({header: _cell(row, column) for column, header in PAPER_COLUMNS.items()})
        choices = [f"{PAPER_COLUMNS[c]}:{row[f'{c}_postprocess']}" for c in PAPER_COLUMNS
                   if isinstance(row.get(f"{c}_postprocess"), str)]
        out["post-processing"] = ", ".join(choices)
        rows.append(out)
    return pd.DataFrame(rows)


def markdown(frame: pd.DataFrame) -> str:
    """A GitHub Markdown table of string cells."""
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "|".join("---" for _ in frame.columns) + "|"]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="table", required=True)
    t1 = sub.add_parser("table1")
    t1.add_argument("--manifest", type=Path, required=True)
    t1.add_argument("--paper", default="{}", help="JSON: dataset -> {samples, genes} from the paper")
    tr = sub.add_parser("training")
    tr.add_argument("--run", type=Path, required=True)
    ev = sub.add_parser("evaluation")
    ev.add_argument("--results", type=Path, nargs="+", required=True)
    ev.add_argument("--screens", nargs="+", required=True)
    ev.add_argument("--markdown", type=Path, default=None, help="also write the paper-column tables as Markdown")
    for p in (t1, tr, ev):
        p.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    if args.table == "table1":
        manifest = json.loads(args.manifest.read_text(encoding="utf-8"))
        frame = table1(manifest, json.loads(args.paper))
        write_page(args.out, "Table 1: DiverseRNA datasets (this build vs the paper)",
                   frame.to_html(index=False, na_rep="", float_format="{:,.0f}".format))
    elif args.table == "training":
        result = json.loads((args.run / "train_result.json").read_text(encoding="utf-8"))
        config = (args.run / "train_config.yaml").read_text(encoding="utf-8") if (args.run / "train_config.yaml").is_file() else ""
        body = pd.DataFrame([result]).to_html(index=False, na_rep="") + f"<h3>Settings</h3><pre>{config}</pre>"
        write_page(args.out, f"Training run {args.run.name}", body)
    else:
        if len(args.results) != len(args.screens):
            parser.error("--results and --screens must have the same length")
        parts, notes = [], []
        for screen, path in zip(args.screens, args.results):
            results = pd.read_csv(path)
            paper = paper_table(results)
            parts.append(f"<h3>{screen}</h3>")
            if len(paper):
                parts.append("<p>Columns of the paper's Tables 2 and 9–11 (appendix B.1.1 protocol): mean ± std "
                             "over seeds of the best post-processing per task; ×100 except iLISI.</p>"
                             + paper.to_html(index=False, na_rep=""))
                notes.append(f"### {screen}\n\n" + markdown(paper))
            parts.append("<h4>All columns</h4>" + results.to_html(index=False, na_rep="", float_format="{:.4g}".format))
        write_page(args.out, "Zero-shot evaluation", "".join(parts))
        if args.markdown is not None:
            with atomic_path(args.markdown) as tmp:
                tmp.write_text("\n".join(notes), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
