"""The TxFM training loop on a tiny synthetic corpus (CPU, tiny preset): learning, exact resume, DDP
equivalence, divergence handling, schedule/config helpers and checkpoint bookkeeping."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import txfm.train as train_module
from txfm.config import TrainConfig, build_config
from txfm.data import LoaderConfig
from txfm.losses import expression_loss
from txfm.model import TxFM
from simulation.corpus import write_synthetic_corpus
from txfm.train import (DistContext, NonFiniteLossError, estimate_mean_baseline, gradient_accumulation,
                        one_cycle_cosine, read_metrics, resolve_weight_decay, train)
from txfm.trainer_state import (latest_checkpoint, list_checkpoints, load_trainer_state, prune_checkpoints)

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """~380 train / ~130 val samples over 3 datasets with different panels, 64-row row groups."""
    path = tmp_path_factory.mktemp("train") / "corpus"
    return str(write_synthetic_corpus(path, n_samples=512, n_genes=200, n_datasets=3, seed=0, row_group_rows=64))


def tiny_config(corpus: str, out: Path, **overrides) -> TrainConfig:
    """A CPU-sized run: tiny preset, K=64 input genes, global batch 32 (2 micro-batches of 16)."""
    values = dict(corpus=corpus, out=str(out), preset="tiny", n_input_genes=64, global_batch=32, micro_batch=16,
                  max_steps=8, lr=3e-3, log_every=1, val_every=4, val_batches=4, baseline_batches=8,
                  ckpt_every=4, keep_checkpoints=2, progress=False, device="cpu", seed=0)
    values.update(overrides)
    return build_config(values)


def losses_by_step(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")}


def model_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(checkpoint / "model.safetensors"))


# ---------------------------------------------------------------------------------------------------------


def test_default_poisson_loss_beats_predict_the_mean(corpus, tmp_path):
    # The paper's loss and output activation (the defaults). The output bias starts at the per-gene mean
    # (init_output_bias="mean"), so the run starts at the baseline and must go below it.
    cfg = tiny_config(corpus, tmp_path / "run", lr=1e-2, n_input_genes=32, global_batch=32, micro_batch=32,
                      max_steps=400, log_every=40, val_every=400, ckpt_every=400)
    assert cfg.loss == "poisson" and cfg.activation is None  # None: the preset's, i.e. rectified tanh
    result = train(cfg)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    losses = [r["loss"] for r in records]
    assert np.mean(losses[-3:]) < np.mean(losses[:2]), losses
    assert result.val_loss < result.baseline_val_loss, (result.val_loss, result.baseline_val_loss)
    # deviance explained: the share of the baseline's gap to the saturated (perfect) loss that the model closes
    last = records[-1]
    assert last["saturated_val_loss"] < last["val_loss"]
    assert last["val_deviance_explained_pct"] == pytest.approx(
        100 * (last["baseline_val_loss"] - last["val_loss"]) / (last["baseline_val_loss"] - last["saturated_val_loss"]))
    assert 0 < last["val_deviance_explained_pct"] < 100


def test_loss_falls_and_beats_predict_the_mean(corpus, tmp_path):
    # Learning from a zero output bias (MSE in log1p space): the loss halves and the tiny model passes the
    # per-gene mean within a few hundred CPU steps.
    cfg = tiny_config(corpus, tmp_path / "run", loss="mse", lr=1e-2, init_output_bias="zero", n_input_genes=32,
                      global_batch=32, micro_batch=32, max_steps=400, log_every=20, val_every=200, ckpt_every=150)
    result = train(cfg)

    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == sorted(set(range(20, 401, 20)) | {150, 300})
    assert set(records[0]) == set(train_module.METRIC_KEYS)
    losses = [r["loss"] for r in records]
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:2]), losses
    assert all(r["samples_per_s"] > 0 and math.isfinite(r["grad_norm"]) for r in records)
    assert records[-1]["lr"] < 1e-3 * cfg.lr  # the cosine ends near 0

    val = [r for r in records if r["val_loss"] is not None]
    assert [r["step"] for r in val] == [200, 400]
    assert result.val_loss == val[-1]["val_loss"]
    assert result.val_loss < result.baseline_val_loss, (result.val_loss, result.baseline_val_loss)

    # checkpoints every 150 steps and at the end, keeping the newest 2; `last` names the final one
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [300, 400]
    assert latest_checkpoint(tmp_path / "run") == result.checkpoint == tmp_path / "run" / "checkpoints" / "step-000400"
    state = load_trainer_state(result.checkpoint)
    assert state["step"] == 400 and state["accum"] == 1 and state["world_size"] == 1
    assert (tmp_path / "run" / "loss_curve.png").stat().st_size > 0
    assert (tmp_path / "run" / "train_config.yaml").is_file()

    # The checkpoint is a hub-style model directory: from_pretrained loads it (from the run dir too) offline,
    # and its generated model card names the training data, the vocabulary and the last validation metrics.
    model = TxFM.from_pretrained(tmp_path / "run")
    assert list(model.vocabulary["gene_id"]) == list(pd.read_parquet(Path(corpus) / "genes.parquet")["gene_id"])
    assert model.extra["step"] == 400 and not model.training
    card = (result.checkpoint / "README.md").read_text()
    manifest = json.loads((Path(corpus) / "manifest.json").read_text())
    assert "library_name: txfm" in card and f"{manifest['n_samples']} samples" in card
    assert all(f"| {name} |" in card for name in manifest["datasets"])
    assert f"{model.cfg.n_genes} genes in `genes.parquet`" in card
    assert f"| val_loss | {val[-1]['val_loss']:.6g} |" in card


def test_resume_reproduces_the_uninterrupted_run_exactly(corpus, tmp_path):
    # drop_path > 0 makes the result depend on the restored torch RNG state, not only on the weights
    cfg = tiny_config(corpus, tmp_path / "full", max_steps=8, drop_path=0.2)
    train(cfg)
    split = cfg.replace(out=str(tmp_path / "split"))
    stopped = train(split, stop_at_step=3)  # 3 is not a multiple of ckpt_every: the stop checkpoints anyway
    assert stopped.step == 3 and latest_checkpoint(tmp_path / "split").name == "step-000003"
    train(split, resume=True)

    full, resumed = losses_by_step(tmp_path / "full"), losses_by_step(tmp_path / "split")
    assert list(full) == list(resumed) == list(range(1, 9))
    for step in full:
        assert resumed[step] == pytest.approx(full[step], rel=1e-6, abs=1e-7), step
    full_records = read_metrics(tmp_path / "full" / "metrics.jsonl")
    resumed_records = read_metrics(tmp_path / "split" / "metrics.jsonl")
    for a, b in zip(full_records, resumed_records):
        assert (a["val_loss"] is None) == (b["val_loss"] is None)
        if a["val_loss"] is not None:
            assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-6)
    weights_full = model_state(latest_checkpoint(tmp_path / "full"))
    weights_resumed = model_state(latest_checkpoint(tmp_path / "split"))
    for name, tensor in weights_full.items():
        torch.testing.assert_close(weights_resumed[name], tensor, rtol=1e-6, atol=1e-7)


def test_resume_refuses_changed_settings_and_fresh_run_refuses_existing_checkpoints(corpus, tmp_path):
    cfg = tiny_config(corpus, tmp_path / "run", max_steps=4)
    train(cfg, stop_at_step=2)
    with pytest.raises(ValueError, match=r"changed setting\(s\) lr"):
        train(cfg.replace(lr=1e-2), resume=True)
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train(cfg)
    with pytest.raises(ValueError, match="no checkpoint"):
        train(cfg.replace(out=str(tmp_path / "empty")), resume=True)


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_checkpoint(corpus, tmp_path, monkeypatch):
    calls = {"n": 0}

    def loss_that_diverges_at_step_5(pred, target, mask, kind="poisson", **kw):
        calls["n"] += 1  # 2 micro-batches per step: call 9 is the first micro-batch of step 5
        loss = expression_loss(pred, target, mask, kind, **kw)
        return loss * float("nan") if calls["n"] >= 9 else loss

    monkeypatch.setattr(train_module, "expression_loss", loss_that_diverges_at_step_5)
    run = tmp_path / "run"
    # log every 3 steps: the NaN of step 5 is only seen at the sync of step 6, which is also a checkpoint step
    cfg = tiny_config(corpus, run, max_steps=8, ckpt_every=2, log_every=3, val_every=100)
    with pytest.raises(NonFiniteLossError) as info:
        train(cfg)
    assert info.value.step == 5
    assert str(info.value) == f"non-finite loss at step 5; last good checkpoint: {run / 'checkpoints' / 'step-000004'}"
    assert latest_checkpoint(run).name == "step-000004"
    assert [s for s, _ in list_checkpoints(run)] == [2, 4]
    assert all(math.isfinite(v) for v in losses_by_step(run).values())
    assert all(torch.isfinite(t).all() for t in model_state(latest_checkpoint(run)).values())


@pytest.mark.slow
def test_two_processes_match_one_process_with_accumulation(corpus, tmp_path):
    """torchrun (gloo, 2 ranks × accum 1) against 1 process × accum 2 at the same global batch."""
    overrides = dict(max_steps=6, drop_path=0.0, val_every=3, ckpt_every=3)  # no drop path: its RNG is per rank
    single = tiny_config(corpus, tmp_path / "single", **overrides)
    train(single)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "txfm.cli", "train", "--corpus", corpus, "--out", str(tmp_path / "ddp"),
               *[f"{k}={v}" for k, v in single.to_dict().items() if k not in ("corpus", "out") and v is not None
                 and not isinstance(v, list)], "betas=0.9,0.999"]
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "world size 2, accum 1" in done.stdout

    one, two = losses_by_step(tmp_path / "single"), losses_by_step(tmp_path / "ddp")
    assert list(one) == list(two) == list(range(1, 7))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5), step
    val_one = [r["val_loss"] for r in read_metrics(tmp_path / "single" / "metrics.jsonl") if r["val_loss"]]
    val_two = [r["val_loss"] for r in read_metrics(tmp_path / "ddp" / "metrics.jsonl") if r["val_loss"]]
    assert val_two == pytest.approx(val_one, rel=1e-5)
    assert load_trainer_state(latest_checkpoint(tmp_path / "ddp"))["world_size"] == 2


# --------------------------------------------------------------------------------------------------------- helpers


def test_gradient_accumulation_must_divide():
    assert gradient_accumulation(1536, 48, 8) == 4
    assert gradient_accumulation(32, 16, 1) == 2
    with pytest.raises(ValueError, match="global_batch 100 is not divisible by micro_batch 16 × world size 2"):
        gradient_accumulation(100, 16, 2)


def test_one_cycle_cosine_warms_up_linearly_then_decays_to_zero():
    schedule = one_cycle_cosine(total_steps=100, warmup_steps=10)
    values = [schedule(s) for s in range(100)]
    assert values[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert values[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))  # monotone decay after the peak
    assert values[55] == pytest.approx(0.5, abs=0.02)  # half-way through the decay
    assert values[-1] < 1e-3
    assert one_cycle_cosine(10, 0)(0) == pytest.approx(1.0)


def test_auto_weight_decay_is_inverse_lr_times_steps(corpus, tmp_path):
    cfg = tiny_config(corpus, tmp_path, lr=1e-3)
    assert resolve_weight_decay(cfg, 5000) == pytest.approx(0.2)
    assert resolve_weight_decay(cfg.replace(weight_decay=0.05), 5000) == 0.05


@pytest.mark.parametrize("loss", ["poisson", "mse"])
def test_baseline_is_the_loss_optimal_constant(corpus, loss):
    """Shifting the estimated per-gene prediction either way raises the loss on the batches it came from."""
    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    loader_cfg = LoaderConfig(split="train", micro_batch=16, n_input_genes=64, seed=0)
    baseline = estimate_mean_baseline(corpus, loader_cfg, 6, 200, loss, ctx)
    assert baseline.shape == (200,) and torch.isfinite(baseline).all()
    batches = list(train_module.make_loader(corpus, loader_cfg, [0], 1, 0))[:6]
    target = torch.cat([b["target"] for b in batches])
    mask = torch.cat([b["target_mask"] for b in batches])

    def total(prediction):
        return expression_loss(prediction.expand_as(target), target, mask, loss).item()

    best = total(baseline)
    for shift in (-0.05, 0.05):
        assert total(baseline + shift) > best


def test_prune_keeps_newest_and_the_last_pointer(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4):
        (root / f"step-{step:06d}").mkdir(parents=True)
        (root / f"step-{step:06d}" / "trainer_state.pt").write_bytes(b"x")
    (root / ".step-000005.tmp-1").mkdir()  # an interrupted write is never listed nor pointed to
    (root / "last").write_text("step-000002\n")
    removed = prune_checkpoints(tmp_path, keep=1)
    assert sorted(p.name for p in removed) == ["step-000001", "step-000003"]
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 4]
    assert latest_checkpoint(tmp_path).name == "step-000002"
    (root / "last").write_text("step-000009\n")
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        latest_checkpoint(tmp_path)


def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    import random

    from txfm.trainer_state import capture_rng_state, restore_rng_state

    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    torch.save(capture_rng_state(), tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert [random.random() for _ in range(3)] == expected[2]


def test_metrics_are_json_lines_with_nulls_for_missing_values(corpus, tmp_path):
    train(tiny_config(corpus, tmp_path / "run", max_steps=2, val_every=100, ckpt_every=100))
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    # max_steps=2 is the last step, so validation runs there although val_every=100
    assert [(r["step"], r["val_loss"] is not None) for r in records] == [(1, False), (2, True)]
