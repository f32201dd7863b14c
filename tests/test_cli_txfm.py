"""The ``txfm`` command line: help texts, one-line errors and exit codes, train → stop → resume via the CLI."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import txfm.train as train_module
from txfm.cli import main
from txfm.config import TrainConfig, load_config
from simulation.corpus import write_synthetic_corpus
from txfm.train import read_metrics
from txfm.trainer_state import latest_checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY_RUN = ["--preset", "tiny", "n_input_genes=32", "global_batch=16", "micro_batch=8", "max_steps=4",
            "log_every=1", "val_every=2", "val_batches=2", "baseline_batches=2", "ckpt_every=2", "progress=false",
            "device=cpu"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("cli") / "corpus"
    return str(write_synthetic_corpus(path, n_samples=256, n_genes=120, n_datasets=2, seed=1, row_group_rows=32))


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "txfm.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_top_level_help_lists_the_subcommands():
    done = run_cli("--help")
    assert done.returncode == 0, done.stderr
    for command in ("train", "embed", "export-gene-weights"):
        assert command in done.stdout


def test_train_help_documents_every_key_with_its_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    rows = {line.split()[0]: line for line in text.splitlines() if line.startswith("  ") and line.split()}
    for field in dataclasses.fields(TrainConfig):
        assert field.name in rows, field.name
        assert field.metadata["help"][:30] in rows[field.name]
    assert "1536" in rows["global_batch"] and "0.001" in rows["lr"] and "0.9,0.999" in rows["betas"]
    assert "auto" in rows["weight_decay"] and "2048" in rows["n_input_genes"]


def test_bad_override_is_a_one_line_error_with_exit_status_1(tmp_path):
    done = run_cli("train", "--corpus", str(tmp_path), "--out", str(tmp_path / "run"), "lr=fast")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == ["txfm: error: config: lr: expected a number, got 'fast'"]


@pytest.mark.parametrize("args, message", [
    (["no_such_key=1"], "unknown config key(s) no_such_key"),
    (["lr"], "override 'lr' is not of the form key=value"),
    (["global_batch=20", "micro_batch=8"], "global_batch 20 is not divisible by micro_batch 8"),
    (["loss=huber"], "loss must be one of poisson, mse, smooth_l1, negative_binomial; got 'huber'"),
])
def test_bad_settings_fail_before_training(corpus, tmp_path, capsys, args, message):
    assert main(["train", "--corpus", corpus, "--out", str(tmp_path / "run"), *TINY_RUN, *args]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("txfm: error: ") and message in err[0], err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_config_file_errors_name_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 0.001\nbatchsize: 64\n")
    assert main(["train", "--corpus", str(tmp_path), "--out", str(tmp_path / "run"), "--config", str(bad)]) == 1
    assert capsys.readouterr().err.strip() == (f"txfm: error: {bad}: unknown config key(s) batchsize "
                                               "(see `txfm train --help` for the list)")


def test_shipped_train_configs_are_valid():
    for name in ("tiny", "S", "B"):
        cfg = load_config(REPO / "config" / "train" / f"{name}.yaml")
        assert cfg.preset == name


def test_train_stop_and_resume_through_the_cli(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--corpus", corpus, "--out", str(run), *TINY_RUN, "--stop-at", "2"]) == 0
    assert latest_checkpoint(run).name == "step-000002"
    # the run directory remembers its settings: --resume needs nothing else
    assert main(["train", "--out", str(run), "--resume"]) == 0
    out = capsys.readouterr().out
    assert "resuming from" in out and "step 4/4: val loss" in out
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3, 4]
    assert latest_checkpoint(run).name == "step-000004"
    assert (run / "loss_curve.png").is_file()


def test_diverging_run_exits_1_naming_the_step(corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train_module, "expression_loss", lambda *a, **k: torch.tensor(float("inf"), requires_grad=True))
    assert main(["train", "--corpus", corpus, "--out", str(tmp_path / "run"), *TINY_RUN]) == 1
    assert capsys.readouterr().err.strip() == ("txfm: error: non-finite loss at step 1; last good checkpoint: "
                                               "none (no checkpoint written yet)")
    assert latest_checkpoint(tmp_path / "run") is None
