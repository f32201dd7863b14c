"""Zero-shot evaluation of cell embeddings on a perturbation screen: ``txfm evaluate``.

Embedders (``--embedders``): ``txfm`` (CLS embedding of ``--checkpoint``), ``liblog`` (library-size normalised
log1p of all genes), ``hvg_pca`` (Seurat-flavour highly variable genes + PCA), ``pca_screen`` (PCA fitted on
the screen itself, the paper's "fit on evaluation data" baseline), ``pca_corpus`` (PCA fitted on the
``--corpus`` training shards over the genes the screen measures) and ``random`` (Gaussian null).

``--protocol paper`` (the default) follows the TxFM paper's appendix B.1.1 (the Bendidi et al. 2024
benchmark; see :mod:`txfm.evaluate.protocol`): every embedding is post-processed three ways (centering on
the batch's controls, standardisation, TVN), and for each choice and each of 5 seeds six tasks are scored:
iLISI batch mixing (ilisi), a linear probe (lin) and kNN retrieval (knn) of the perturbation on unseen
batches (top-1/top-5), perturbation consistency (pcst: leave-one-out cosine vs a 10,000-random-cell null,
p < 0.01, after a PCA on the controls and per-batch standardisation), known-relationship recall at 5/95
(bmdb), and invertibility (inv: Spearman of linearly decoded expression + structural integrity); with
``--label-column`` (a cell type) also NMI / ARI / ASW. Seeds are averaged (mean ± std), the best choice per
task is kept, and ``avg`` is the mean of the six tasks — the columns of the paper's Tables 2 and 9–11.

``--protocol efaar`` keeps the earlier streamed pipeline: per batch, centre and scale on that batch's control
cells; PCA fitted on the controls, with whitening; mean per perturbation; then recall at 5/95 and 10/90,
consistency against random cell sets (>= 1,000 draws, p < 0.01) and kNN / linear probes of
``--label-column`` cross-validated by batch.

With a checkpoint both add recall on its exported gene weights (codebook, decoder), and with a corpus too,
the reconstruction of held-out validation samples (Poisson deviance, Pearson r) vs the mean-expression
baseline. The screen is read backed, chunk by chunk; the paper protocol holds its scored cells (at most
``--max-cells``) in memory, the EFAAR pipeline only per-batch statistics and reservoirs. Python API:
run_evaluation(EvaluationConfig(...)).
"""

from __future__ import annotations

import argparse
import sys

from txfm.evaluate.embedders import EMBEDDER_NAMES
from txfm.evaluate.pipeline import EvaluationConfig, run_evaluation

__all__ = ["EvaluationConfig", "run_evaluation", "register"]

_EPILOG = """\
outputs in --out:
  results.csv / results.md   one row per embedder. Paper protocol: ilisi, lin, knn, pcst, bmdb, inv (fractions;
                             the paper prints them ×100 except ilisi), each the best post-processing choice's
                             mean over seeds, with <task>_std and <task>_postprocess; avg (mean of the six);
                             lin_top1/top5, knn_top1/top5, inv_spearman, inv_structural_integrity; nmi/ari/asw
                             with --label-column. EFAAR protocol: recall_<database>_<lo>_<hi>,
                             consistency_fraction (p < --p-threshold), knn_accuracy, linear_probe_accuracy
                             (cross-validated by batch). Both: reconstruction_poisson_deviance,
                             reconstruction_pearson; rows txfm_codebook / txfm_decoder: recall on the
                             checkpoint's gene weights (bmdb); row mean_expression: the reconstruction baseline
  protocol.csv               paper protocol: every (embedder, postprocess, seed, metric) value
  protocol_summary.csv       paper protocol: mean and std over seeds per (embedder, postprocess, metric)
  recall.csv                 recall per embedder, database and threshold (with pair counts; per postprocess)
  consistency.csv            per perturbation: cells, consistency, null mean, p-value (per postprocess)
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
        protocol=args.protocol, n_seeds=args.n_seeds, n_null_cells=args.n_null_cells, max_cells=args.max_cells,
        inv_genes=args.inv_genes, screen_components=args.screen_components,
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
    screen.add_argument("--label-column", default=None,
                        help="obs column of a cell type: paper protocol: NMI/ARI/ASW clustering metrics; efaar "
                             "protocol: the label of its kNN / linear probes (cross-validated by batch)")
    screen.add_argument("--gene-column", default=None, help="var column of gene symbols/IDs (default var_names)")
    screen.add_argument("--allow-normalised", action="store_true", help="accept non-integer linear-scale X (TPM/CPM)")
    what = parser.add_argument_group("what to evaluate")
    what.add_argument("--checkpoint", default=None, help="TxFM model/checkpoint or run directory")
    what.add_argument("--corpus", default=None, help="corpus directory (pca_corpus baseline, reconstruction)")
    what.add_argument("--embedders", default=None,
                      help=f"comma-separated subset of {','.join(EMBEDDER_NAMES)} (default: liblog,hvg_pca,"
                           "pca_screen, plus txfm with --checkpoint and pca_corpus with --corpus)")
    what.add_argument("--protocol", choices=("paper", "efaar"), default="paper",
                      help="paper: the TxFM paper's appendix B.1.1 (three post-processings x 5 seeds, six tasks, "
                           "best choice per task; default); efaar: the streamed EFAAR pipeline")
    what.add_argument("--no-gene-weights", action="store_true", help="skip recall on the checkpoint's gene weights")
    what.add_argument("--no-reconstruction", action="store_true", help="skip reconstruction of corpus val samples")
    what.add_argument("--out", required=True, help="output directory")
    knobs = parser.add_argument_group("settings")
    knobs.add_argument("--n-components", type=int, default=128,
                       help="post-processing PCA components (capped by embedding width and controls − 1; default 128)")
    knobs.add_argument("--n-seeds", type=int, default=5, help="paper protocol: seeds averaged (default 5)")
    knobs.add_argument("--n-null-cells", type=int, default=10000,
                       help="paper protocol: random cells in the consistency null (default 10000)")
    knobs.add_argument("--max-cells", type=int, default=20000,
                       help="paper protocol: cells scored (uniform subsample of larger screens; default 20000)")
    knobs.add_argument("--inv-genes", type=int, default=1000,
                       help="paper protocol: most variable genes decoded by the invertibility task (default 1000)")
    knobs.add_argument("--screen-components", type=int, default=50, help="PCs of pca_screen (default 50)")
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
                       help="efaar protocol: random cell sets per set size in the consistency null (>= 1000)")
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
