"""Zero-shot evaluation of cell embeddings on a perturbation screen: ``txfm evaluate``.

Embedders (``--embedders``): ``txfm`` (CLS embedding of ``--checkpoint``), ``liblog`` (library-size normalised
log1p of all genes), ``hvg_pca`` (Seurat-flavour highly variable genes + PCA), ``pca_corpus`` (PCA fitted on the
``--corpus`` training shards over the genes the screen measures) and ``random`` (Gaussian null).

Every embedding goes through the same EFAAR-style post-processing — per batch, centre and scale on that
batch's control cells; PCA fitted on the controls, with whitening; mean per perturbation — and then:

* recall of known gene–gene relationships (CORUM, HuMAP, Reactome, SIGNOR, StringDB): cosine similarity of
  perturbation aggregates vs 5,000 random pairs, called below the null's 5th / above its 95th percentile
  (and 10th / 90th);
* perturbation consistency: share of perturbations whose cells are more similar to each other than random
  cell sets of the same size (≥ 1,000 draws) at p < 0.01;
* kNN and linear-probe accuracy of ``--label-column``, cross-validated by batch;
* with a checkpoint: recall on its exported gene weights (codebook, decoder), and with a corpus too, the
  reconstruction of held-out validation samples (Poisson deviance, Pearson r) vs the mean-expression baseline.

Everything streams: the screen is read backed, chunk by chunk; only per-batch control statistics,
per-perturbation sums and reservoirs live in memory, and processed cell embeddings are spilled to a scratch
file. Python API: run_evaluation(EvaluationConfig(...)).
"""

from __future__ import annotations

import argparse
import sys

from txfm.evaluate.embedders import EMBEDDER_NAMES
from txfm.evaluate.pipeline import EvaluationConfig, run_evaluation

__all__ = ["EvaluationConfig", "run_evaluation", "register"]

_EPILOG = """\
outputs in --out:
  results.csv / results.md   one row per embedder, one column per metric:
                             recall_<database>_<lo>_<hi>, recall_avg_<lo>_<hi> (share of a database's pairs
                             among the perturbed genes that are called; random pairs score (lo + 100 - hi) %),
                             consistency_fraction (p < --p-threshold), knn_accuracy, linear_probe_accuracy,
                             reconstruction_poisson_deviance, reconstruction_pearson;
                             rows txfm_codebook / txfm_decoder: recall on the checkpoint's gene weights;
                             row mean_expression: the reconstruction baseline
  recall.csv                 recall per embedder, database and threshold (with pair counts)
  consistency.csv            per perturbation: cells, consistency, null mean, p-value
  recall_by_database.png     grouped bars of recall per database (5/95)
  consistency.png            consistency distributions and p-value ECDFs
  report.json                settings, screen summary, per-embedder details (genes used, PCA variance, timing)
  gene_weights.parquet       the checkpoint's exported gene weights (with --checkpoint)

example:
  txfm evaluate --input screen.h5ad --perturbation-column gene --control-label non-targeting \\
      --batch-column gem_group --checkpoint runs/S --corpus corpus/ --out eval/
"""


def _csv_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _run(args: argparse.Namespace) -> int:
    import logging

    from curation.io import limit_heap_fragmentation

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    limit_heap_fragmentation()  # the screen is streamed: keep peak memory independent of its size
    cfg = EvaluationConfig(
        input=args.input, perturbation_column=args.perturbation_column, control_labels=args.control_label,
        batch_column=args.batch_column, out=args.out, checkpoint=args.checkpoint, corpus=args.corpus,
        embedders=_csv_list(args.embedders) if args.embedders else None, label_column=args.label_column,
        gene_column=args.gene_column, allow_normalised=args.allow_normalised, n_components=args.n_components,
        hvg_genes=args.hvg_genes, hvg_components=args.hvg_components, corpus_components=args.corpus_components,
        corpus_max_samples=args.corpus_max_samples, relationships=args.relationships,
        databases=_csv_list(args.databases) if args.databases else None, n_null_pairs=args.n_null_pairs,
        n_null_sets=args.n_null_sets, p_threshold=args.p_threshold, reservoir=args.reservoir,
        probe_max_cells=args.probe_max_cells, probe_folds=args.probe_folds, knn_k=args.knn_k,
        gene_weights=not args.no_gene_weights, reconstruction=not args.no_reconstruction,
        reconstruction_max_batches=args.reconstruction_max_batches, batch_size=args.batch_size,
        n_input_genes=args.n_input_genes, device=args.device, seed=args.seed, progress=not args.no_progress,
        scratch_dir=args.scratch_dir)
    results = run_evaluation(cfg)
    print(f"wrote {args.out}/results.csv ({len(results)} rows) and plots", file=sys.stderr)
    return 0


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``txfm evaluate`` to a CLI's subparsers (sets ``func``)."""
    parser = subparsers.add_parser(
        "evaluate", help="zero-shot benchmarks of embeddings on a perturbation screen",
        description=__doc__,
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    screen = parser.add_argument_group("screen")
    screen.add_argument("--input", required=True, help=".h5ad of raw counts (cells × genes), read backed")
    screen.add_argument("--perturbation-column", required=True, help="obs column naming each cell's perturbed gene "
                                                                     "(gene symbols, matched to the databases)")
    screen.add_argument("--control-label", required=True, action="append",
                        help="value of the perturbation column for control cells (repeat for several)")
    screen.add_argument("--batch-column", required=True, help="obs column of the batch (gem group, plate); "
                                                              "post-processing is per batch")
    screen.add_argument("--label-column", default=None, help="obs column for the kNN / linear probes "
                                                             "(e.g. the perturbation or a cell type); default: no probes")
    screen.add_argument("--gene-column", default=None, help="var column of gene symbols/IDs (default var_names)")
    screen.add_argument("--allow-normalised", action="store_true", help="accept non-integer linear-scale X (TPM/CPM)")
    what = parser.add_argument_group("what to evaluate")
    what.add_argument("--checkpoint", default=None, help="TxFM model/checkpoint or run directory")
    what.add_argument("--corpus", default=None, help="corpus directory (pca_corpus baseline, reconstruction)")
    what.add_argument("--embedders", default=None,
                      help=f"comma-separated subset of {','.join(EMBEDDER_NAMES)} (default: liblog,hvg_pca, plus "
                           "txfm with --checkpoint and pca_corpus with --corpus)")
    what.add_argument("--no-gene-weights", action="store_true", help="skip recall on the checkpoint's gene weights")
    what.add_argument("--no-reconstruction", action="store_true", help="skip reconstruction of corpus val samples")
    what.add_argument("--out", required=True, help="output directory")
    knobs = parser.add_argument_group("settings")
    knobs.add_argument("--n-components", type=int, default=128,
                       help="post-processing PCA components (capped by embedding width and controls − 1; default 128)")
    knobs.add_argument("--hvg-genes", type=int, default=2000, help="highly variable genes for hvg_pca (default 2000)")
    knobs.add_argument("--hvg-components", type=int, default=50, help="PCs of hvg_pca (default 50)")
    knobs.add_argument("--corpus-components", type=int, default=50, help="PCs of pca_corpus (default 50)")
    knobs.add_argument("--corpus-max-samples", type=int, default=20000,
                       help="corpus samples used to fit pca_corpus (row groups spread evenly; default 20000)")
    knobs.add_argument("--relationships", default=None,
                       help="directory of <database>.txt CSVs entity1,entity2 (default resources/gene_relationships)")
    knobs.add_argument("--databases", default=None,
                       help="comma-separated database names (default CORUM,HuMAP,Reactome,SIGNOR,StringDB, or every "
                            "*.txt of --relationships)")
    knobs.add_argument("--n-null-pairs", type=int, default=5000, help="random pairs in the recall null (default 5000)")
    knobs.add_argument("--n-null-sets", type=int, default=1000,
                       help="random cell sets per set size in the consistency null (>= 1000; default 1000)")
    knobs.add_argument("--p-threshold", type=float, default=0.01, help="consistency p-value threshold (default 0.01)")
    knobs.add_argument("--reservoir", type=int, default=20000, help="cells kept as the consistency null pool")
    knobs.add_argument("--probe-max-cells", type=int, default=20000, help="cells subsampled for the probes")
    knobs.add_argument("--probe-folds", type=int, default=5, help="GroupKFold splits over batches (default 5)")
    knobs.add_argument("--knn-k", type=int, default=10, help="neighbours of the kNN probe (default 10)")
    knobs.add_argument("--reconstruction-max-batches", type=int, default=None,
                       help="cap on validation micro-batches (default: the whole val split)")
    knobs.add_argument("--batch-size", type=int, default=256, help="cells per TxFM forward pass")
    knobs.add_argument("--n-input-genes", type=int, default=None, help="TxFM input genes K (default: training K)")
    knobs.add_argument("--device", default=None, help="torch device (default cuda if available, else cpu)")
    knobs.add_argument("--seed", type=int, default=0, help="seed of every random choice (nulls, subsamples)")
    knobs.add_argument("--scratch-dir", default=None, help="where processed embeddings are spilled (default --out)")
    knobs.add_argument("--no-progress", action="store_true", help="no progress bars")
    knobs.add_argument("--verbose", action="store_true", help="log per-embedder results")
    parser.set_defaults(func=_run)
    return parser
