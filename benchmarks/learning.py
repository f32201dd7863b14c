"""Does TxFM learn? Train on a simulated corpus for N steps at several N, evaluate every checkpoint zero-shot.

    .venv/bin/python benchmarks/learning.py                        # full: N = 0, 100, 300, 1000 + diagnosis
    .venv/bin/python benchmarks/learning.py --steps 0 30 --no-diagnosis --n-samples 800   # a quick check

The corpus (simulation.corpus.write_synthetic_corpus) has co-expression modules that cell types switch on and off;
the evaluation screen (simulation.screen.plan_screen with the corpus's gene_modules) is held out from training
and knocks down genes whose knock-down lowers their whole corpus module, weakly and noisily — so a model that
learned the corpus's co-expression has something to transfer, and the count baselines do not saturate.

For each N: a fresh tiny-preset run of exactly N optimizer steps (its own one-cycle schedule; N = 0 is the
initialised model with the output bias at the per-gene mean, one step at lr 1e-12), then

* validation loss vs the predict-the-mean baseline, and the share (%) of the baseline's Poisson deviance
  that the model explains (txfm.train.deviance_explained_pct, also in metrics.jsonl);
* ``txfm evaluate`` (the paper protocol, txfm.evaluate.protocol) on the screen: bmdb (known-relationship recall
  at 5/95) and avg of the CLS embedding, and bmdb of the decoder / codebook gene vectors, next to the same
  numbers for Lib+Log, PCA fitted on the screen and PCA fitted on the corpus (computed once: they do not train).

``--diagnosis`` then reruns N = ``--diagnosis-steps`` (300) with one change each — LayerScale init 0.1 instead
of 1e-5, lr 1e-3 (the paper's) instead of 1e-2, a zero output bias, K = 64 input genes, a wider/deeper model,
and the default checkpoint embedded with all genes as input instead of K sampled ones — to say what limits
learning here (compare with the default row of the same N).
Everything runs on the CPU; the full setting took 16 min 41 s on an idle 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from simulation.corpus import corpus_gene_modules, write_synthetic_corpus  # noqa: E402
from simulation.screen import (BATCH_COLUMN, CONTROL_LABEL, PERTURBATION_COLUMN, plan_screen,  # noqa: E402
                               write_relationships, write_screen_h5ad)
from txfm import model as model_module  # noqa: E402
from txfm.config import build_config  # noqa: E402
from txfm.evaluate import EvaluationConfig, run_evaluation  # noqa: E402
from txfm.train import deviance_explained_pct, read_metrics, train  # noqa: E402

BASE_TRAIN = dict(preset="tiny", loss="poisson", n_input_genes=256, global_batch=64, micro_batch=32, lr=1e-2,
                  log_every=10, val_batches=8, baseline_batches=8, keep_checkpoints=1, progress=False, device="cpu",
                  seed=0)
DIAGNOSIS = {
    "layerscale_init=0.1": {"layerscale_init": 0.1},
    "lr=1e-3": {"lr": 1e-3},
    "init_output_bias=zero": {"init_output_bias": "zero"},
    "K=64": {"n_input_genes": 64},
    "dim=128,depth=4": {"dim": 128, "depth": 4, "heads": 4, "decoder_dim": 128},
    # no retraining: the default run's checkpoint, embedded with every gene as input instead of K sampled ones
    "embed with all genes": {"eval_all_genes": True},
}


def train_run(corpus: Path, out: Path, steps: int, overrides: dict) -> dict:
    """Train ``steps`` steps (0: save the initial model) and return val/baseline/saturated loss and the model dir."""
    overrides = dict(overrides)
    layerscale = overrides.pop("layerscale_init", None)
    values = {**BASE_TRAIN, **overrides, "corpus": str(corpus), "out": str(out), "max_steps": max(steps, 1),
              "val_every": max(steps, 1), "ckpt_every": max(steps, 1)}
    if steps == 0:  # the initial model: one step at lr 1e-12 (lr must be > 0; the code paths stay the same)
        values["lr"] = 1e-12
        values["weight_decay"] = 0.0
    original = dict(model_module.PRESETS["tiny"])
    if layerscale is not None:  # no trainer key for it: the preset carries it into TxFMConfig
        model_module.PRESETS["tiny"] = {**original, "layerscale_init": layerscale}
    try:
        started = time.perf_counter()
        result = train(build_config(values))
        seconds = time.perf_counter() - started
    finally:
        model_module.PRESETS["tiny"] = original
    last = [r for r in read_metrics(out / "metrics.jsonl") if r["val_loss"] is not None][-1]
    return {"val_loss": last["val_loss"], "baseline_val_loss": last["baseline_val_loss"],
            "saturated_val_loss": last["saturated_val_loss"],
            "deviance_explained_pct": deviance_explained_pct(last["val_loss"], last["baseline_val_loss"],
                                                             last["saturated_val_loss"]),
            "checkpoint": result.checkpoint, "train_s": seconds}


def evaluate(screen: Path, database: Path, out: Path, embedders: list[str], n_seeds: int,
             checkpoint: Path | None = None, corpus: Path | None = None,
             n_input_genes: int | None = None) -> pd.DataFrame:
    cfg = EvaluationConfig(input=screen, perturbation_column=PERTURBATION_COLUMN, control_labels=[CONTROL_LABEL],
                           batch_column=BATCH_COLUMN, out=out, checkpoint=str(checkpoint) if checkpoint else None,
                           corpus=str(corpus) if corpus else None, embedders=embedders,
                           relationships=str(database), n_components=32, n_seeds=n_seeds, n_null_pairs=2000,
                           reconstruction=False, device="cpu", progress=False, n_input_genes=n_input_genes)
    return run_evaluation(cfg).set_index("embedder")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[0, 100, 300, 1000])
    parser.add_argument("--n-samples", type=int, default=4000, help="corpus samples")
    parser.add_argument("--n-genes", type=int, default=500)
    parser.add_argument("--screen-cells", type=int, default=1500)
    parser.add_argument("--effect", type=float, default=0.4, help="log knock-down of the target's corpus module")
    parser.add_argument("--n-seeds", type=int, default=3, help="seeds of the paper protocol per evaluation")
    parser.add_argument("--diagnosis", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--diagnosis-steps", type=int, default=300, help="N of the diagnosis runs (default 300)")
    parser.add_argument("--json", type=Path, default=None, help="also write every row as JSON")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the runs here (default: a temp dir)")
    args = parser.parse_args(argv)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="txfm-learning-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        corpus = write_synthetic_corpus(work / "corpus", n_samples=args.n_samples, n_genes=args.n_genes,
                                        n_datasets=3, seed=0)
        plan = plan_screen(n_cells=args.screen_cells, n_genes=args.n_genes, n_modules=12, genes_per_module=4,
                           n_inert=12, n_batches=4, effect_size=args.effect, mean_library=3000.0, seed=1,
                           gene_modules=corpus_gene_modules(args.n_genes, seed=0), cell_state_sd=0.3)
        screen = write_screen_h5ad(work / "screen.h5ad", plan)
        (work / "db").mkdir(exist_ok=True)
        write_relationships(work / "db" / "PLANTED.txt", plan.relationships)
        print(f"corpus {args.n_samples} samples × {args.n_genes} genes; screen {plan.n_cells} cells, "
              f"{len(plan.relationships)} planted pairs; chance bmdb ≈ 0.10", flush=True)

        baselines = evaluate(screen, work / "db", work / "eval-baselines", ["liblog", "pca_screen", "pca_corpus",
                                                                            "random"], args.n_seeds, corpus=corpus)
        rows = []
        for name in ("liblog", "pca_screen", "pca_corpus", "random"):
            rows.append({"run": name, "steps": None, "bmdb_cls": baselines.loc[name, "bmdb"],
                         "avg_cls": baselines.loc[name, "avg"]})
        settings = [("default", n, {}) for n in args.steps]
        if args.diagnosis:
            settings += [(name, args.diagnosis_steps, change) for name, change in DIAGNOSIS.items()]
        trained_runs: dict[tuple[str, int], dict] = {}
        for name, steps, change in settings:
            n_input_genes = None
            if change.get("eval_all_genes"):
                if ("default", steps) not in trained_runs:
                    trained_runs[("default", steps)] = train_run(corpus, work / f"run-default-{steps}", steps, {})
                trained, n_input_genes = trained_runs[("default", steps)], args.n_genes
            else:
                trained = train_run(corpus, work / f"run-{name}-{steps}", steps, change)
                trained_runs[(name, steps)] = trained
            results = evaluate(screen, work / "db", work / f"eval-{name}-{steps}", ["txfm"], args.n_seeds,
                               checkpoint=trained["checkpoint"], n_input_genes=n_input_genes)
            row = {"run": name, "steps": steps, "val_loss": trained["val_loss"],
                   "baseline_val_loss": trained["baseline_val_loss"],
                   "deviance_explained_pct": trained["deviance_explained_pct"],
                   "bmdb_cls": results.loc["txfm", "bmdb"], "avg_cls": results.loc["txfm", "avg"],
                   "bmdb_decoder": results.loc["txfm_decoder", "bmdb"],
                   "bmdb_codebook": results.loc["txfm_codebook", "bmdb"],
                   "train_s": 0.0 if n_input_genes else trained["train_s"]}
            rows.append(row)
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    table = pd.DataFrame(rows)
    print()
    columns = [("N", "steps", "d"), ("val loss", "val_loss", ".3f"), ("mean base", "baseline_val_loss", ".3f"),
               ("dev. expl. %", "deviance_explained_pct", ".2f"), ("CLS bmdb", "bmdb_cls", ".3f"),
               ("CLS avg", "avg_cls", ".3f"), ("dec bmdb", "bmdb_decoder", ".3f"),
               ("code bmdb", "bmdb_codebook", ".3f"), ("train s", "train_s", ".0f")]

    def fmt(value, spec):
        if value is None or (isinstance(value, float) and np.isnan(value)):
            return "–"
        return format(int(value) if spec == "d" else value, spec)

    print(f"{'run':<22}" + "".join(f"{header:>13}" for header, _, _ in columns))
    for row in table.to_dict("records"):
        print(f"{row['run']:<22}" + "".join(f"{fmt(row.get(key), spec):>13}" for _, key, spec in columns))
    print(f"\nwall time {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(table.to_json(orient="records", indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
