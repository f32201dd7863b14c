"""Launch one training run for the workflow's ``train_model`` rule; resume it when that is safe.

    python workflow/scripts/train_run.py --corpus C --out RUN --config Y.yaml --gpus N -- key=value …

* ``--gpus`` > 1 runs ``python -m torch.distributed.run --standalone --nproc_per_node=N -m txfm.cli train …``;
  otherwise ``python -m txfm.cli train …`` in this process's interpreter.
* A *fingerprint* (sha256 of the parsed training YAML, the overrides, the GPU count and the corpus manifest) is
  stored in ``<run>/workflow_fingerprint.json``. When the run directory already holds checkpoints with the same
  fingerprint — a job killed by a cluster time limit, rerun by Snakemake — training continues with
  ``--resume``; when the fingerprint differs the old run is moved to ``<run>.previous`` and training starts over.
* When training succeeds, ``<run>/train_result.json`` (final step, losses, checkpoint) is written atomically:
  it is the rule's output, so its existence means "trained to the end".
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import yaml

from curation.io import atomic_path
from txfm.train import METRICS_FILE
from txfm.trainer_state import latest_checkpoint

FINGERPRINT_FILE = "workflow_fingerprint.json"
RESULT_FILE = "train_result.json"


def fingerprint(config_path: Path, overrides: Sequence[str], gpus: int, corpus: Path) -> str:
    """sha256 over what determines a run: parsed training config, overrides, GPU count, corpus manifest bytes."""
    content = {"config": yaml.safe_load(config_path.read_text(encoding="utf-8")), "overrides": sorted(overrides),
               "gpus": gpus, "corpus_manifest": hashlib.sha256((corpus / "manifest.json").read_bytes()).hexdigest()}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def prepare_run_dir(run: Path, print_: str) -> bool:
    """Make ``run`` ready for a run with fingerprint ``print_``; True when it should be resumed."""
    stored = run / FINGERPRINT_FILE
    if run.exists():
        same = stored.is_file() and json.loads(stored.read_text(encoding="utf-8")).get("fingerprint") == print_
        if same and latest_checkpoint(run) is not None:
            return True
        if latest_checkpoint(run) is None:
            shutil.rmtree(run)  # nothing worth keeping (e.g. the empty directory Snakemake made for the output)
        else:
            previous = run.with_name(run.name + ".previous")
            shutil.rmtree(previous, ignore_errors=True)
            run.rename(previous)  # settings changed: keep the old run aside, start over
    run.mkdir(parents=True)
    with atomic_path(stored) as tmp:
        tmp.write_text(json.dumps({"fingerprint": print_}) + "\n", encoding="utf-8")
    return False


def train_command(corpus: Path, run: Path, config: Path, overrides: Sequence[str], gpus: int, resume: bool) -> list[str]:
    """The argv that trains (torchrun for several GPUs)."""
    launcher = [sys.executable, "-m", "txfm.cli"]
    if gpus > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
                    "-m", "txfm.cli"]
    return [*launcher, "train", "--corpus", str(corpus), "--out", str(run), "--config", str(config),
            *(["--resume"] if resume else []), *overrides]


def write_result(run: Path) -> dict:
    """``<run>/train_result.json`` from the last metrics record and the last checkpoint."""
    records = [json.loads(line) for line in (run / METRICS_FILE).read_text(encoding="utf-8").splitlines() if line]
    last = records[-1] if records else {}
    with_val = [r for r in records if r.get("val_loss") is not None]
    checkpoint = latest_checkpoint(run)
    result = {"step": last.get("step"), "train_loss": last.get("loss"),
              "val_loss": with_val[-1].get("val_loss") if with_val else None,
              "baseline_val_loss": with_val[-1].get("baseline_val_loss") if with_val else None,
              "checkpoint": str(checkpoint.relative_to(run)) if checkpoint else None,
              "n_metrics_records": len(records)}
    with atomic_path(run / RESULT_FILE) as tmp:
        tmp.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="run directory")
    parser.add_argument("--config", type=Path, required=True, help="training config YAML")
    parser.add_argument("--gpus", type=int, default=0)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    resume = prepare_run_dir(args.out, fingerprint(args.config, args.overrides, args.gpus, args.corpus))
    command = train_command(args.corpus, args.out, args.config, args.overrides, args.gpus, resume)
    print("train_run:", " ".join(command), flush=True)
    status = subprocess.run(command, check=False).returncode
    if status != 0:
        return status
    print("train_run:", json.dumps(write_result(args.out)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
