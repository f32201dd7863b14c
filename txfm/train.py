"""The TxFM training loop (one readable function, nanoGPT-style): AdamW, one-cycle cosine, accumulation, DDP.

Batch arithmetic. With ``W`` processes (torchrun) and ``A = global_batch / (micro_batch · W)`` accumulation
steps, the train split is dealt into ``W·A`` loader streams and rank ``r`` reads streams ``[r + a·W for a < A]``.
One optimizer step consumes one micro-batch from every stream, so 1 process × A=2 sees exactly the samples of
2 processes × A=1, and an epoch is ``microbatches_per_stream`` steps. Each micro-batch loss is divided by ``A``
and DDP averages gradients over ranks, so the gradient is that of the mean over all ``W·A`` micro-batch losses.

Host syncs (``.item()``, all-reduce of the loss) happen only at *sync steps*: multiples of log_every,
val_every, ckpt_every and the last step. A non-finite loss or gradient norm is recorded on the device (the
first offending step) and raised at the next sync step, before any checkpoint could be written, so the last
checkpoint is always finite.

Resume. Checkpoints (txfm.trainer_state) hold model, optimizer, scheduler, per-rank RNG states and the step;
the loader position follows from the step (epoch = step // steps_per_epoch, start_microbatch =
(step % steps_per_epoch) · A) because every stream has the same number of micro-batches per epoch. Sync steps
include checkpoint steps, so no partially accumulated log interval is ever lost — a resumed run writes the
same metrics.jsonl records as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from curation.io import atomic_path
from curation.schema import list_shards
from txfm.checkpoint import training_data_summary
from txfm.config import TrainConfig, resume_mismatches, save_config
from txfm.data import (TARGET_KEYS, CorpusInfo, LoaderConfig, as_corpus_info, densify_target, make_loader,
                       microbatches_per_stream)
from txfm.losses import activation_logits_for, expression_loss
from txfm.model import TxFM, TxFMConfig, param_groups
from txfm.trainer_state import (capture_rng_state, checkpoint_name, checkpoints_root, latest_checkpoint,
                                load_trainer_state, restore_rng_state, save_checkpoint)

METRICS_FILE = "metrics.jsonl"
LOSS_CURVE_FILE = "loss_curve.png"
RUN_CONFIG_FILE = "train_config.yaml"
METRIC_KEYS = ("step", "epoch", "loss", "val_loss", "baseline_val_loss", "saturated_val_loss",
               "val_deviance_explained_pct", "lr", "grad_norm", "samples_per_s")


def deviance_explained_pct(val_loss: float, baseline_loss: float, saturated_loss: float) -> float:
    """Share (%) of the predict-the-mean baseline's deviance that the model removes:
    ``100 · (baseline − val) / (baseline − saturated)``. For the Poisson loss, loss − saturated loss is half
    the Poisson deviance, so this is the classic "% deviance explained" against the per-gene-mean model
    (0 % = the baseline, 100 % = a perfect prediction, < 0 = worse than the baseline). NaN when undefined."""
    gap = baseline_loss - saturated_loss
    if not all(map(math.isfinite, (val_loss, baseline_loss, saturated_loss))) or gap <= 0:
        return math.nan
    return 100.0 * (baseline_loss - val_loss) / gap
#: Keyword arguments of ``torch.compile`` when ``compile=true`` (inductor, default mode). Tests may swap the
#: backend for ``aot_eager`` (same captured graphs, no code generation) to keep CPU compile time low.
COMPILE_KWARGS: dict[str, Any] = {}
#: Losses whose best constant prediction is log(mean(e^x)) (a mean on the rate scale) rather than mean(x).
_RATE_SCALE_LOSSES = ("poisson", "negative_binomial")


class NonFiniteLossError(RuntimeError):
    """The loss (or gradient norm) became NaN/inf; the run stopped without writing a checkpoint."""

    def __init__(self, step: int, last_checkpoint: Path | None):
        self.step = step
        self.last_checkpoint = last_checkpoint
        super().__init__(f"non-finite loss at step {step}; last good checkpoint: "
                         f"{last_checkpoint if last_checkpoint is not None else 'none (no checkpoint written yet)'}")


@dataclass
class TrainResult:
    """What a finished (or stopped) ``train`` call reached."""

    run_dir: Path
    step: int
    total_steps: int
    loss: float | None  # mean train loss of the last logged interval
    val_loss: float | None
    baseline_val_loss: float | None
    checkpoint: Path | None


# ----------------------------------------------------------------------------------------------------------
# distributed setup


@dataclass
class DistContext:
    """This process's place in the job: rank, world size, device; world_size 1 means no process group."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_process_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, tensor: Tensor, op: str = "sum") -> Tensor:
        """In-place all-reduce (sum | min) across ranks; a no-op for a single process. Returns ``tensor``."""
        if self.world_size > 1:
            dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN}[op])
        return tensor

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()


def resolve_device(preference: str, local_rank: int = 0) -> torch.device:
    """``auto`` → ``cuda:<local_rank>`` when CUDA is available, else CPU; ``cuda`` → ``cuda:<local_rank>``."""
    if preference == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(preference)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {preference!r} requested but CUDA is not available")
        if device.index is None:
            device = torch.device(f"cuda:{local_rank}")
    return device


def init_distributed(device_preference: str) -> DistContext:
    """Join the torchrun job described by RANK / WORLD_SIZE / LOCAL_RANK (NCCL on CUDA, gloo on CPU).

    Without those variables (or WORLD_SIZE=1) this is a single process and no process group is created.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_preference, local_rank)
    owns = False
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", init_method="env://", device_id=device)
        else:
            dist.init_process_group("gloo", init_method="env://")
        owns = True
    return DistContext(rank, world_size, local_rank, device, owns)


# ----------------------------------------------------------------------------------------------------------
# schedule and batch arithmetic


def gradient_accumulation(global_batch: int, micro_batch: int, world_size: int) -> int:
    """A = global_batch / (micro_batch · world_size); raises ValueError unless it divides exactly."""
    per_pass = micro_batch * world_size
    if global_batch % per_pass:
        raise ValueError(f"global_batch {global_batch} is not divisible by micro_batch {micro_batch} × "
                         f"world size {world_size} = {per_pass}")
    return global_batch // per_pass


def one_cycle_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR multiplier for LambdaLR: linear warm-up to 1 over ``warmup_steps``, then cosine to ~0 at the end.

    ``step`` is the 0-based index of the optimizer step about to be taken.
    """
    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier


def resolve_weight_decay(cfg: TrainConfig, total_steps: int) -> float:
    """``auto`` → 1 / (lr · total_steps) (the paper's rule: total decoupled decay lr·wd·T = 1), else the number."""
    if cfg.weight_decay == "auto":
        return 1.0 / (cfg.lr * total_steps)
    return float(cfg.weight_decay)


def autocast_context(precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """Factory of the forward-pass context: bf16 autocast (``auto`` on CUDA, or ``bf16``) or nothing (fp32)."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16:
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def prepare_batch(batch: dict[str, Tensor], device: torch.device, panel_mask: Tensor,
                  attention_fast_path: bool = True) -> dict[str, Tensor | None]:
    """A loader batch (either target format) on ``device`` with a dense ``target`` / ``target_mask`` [B, G].

    ``panel_mask`` bool [D, G] should already live on ``device``. With ``attention_fast_path`` a batch without
    padding gets ``pad_mask=None`` (the model then passes no attention mask: flash kernels). That check runs on
    the host copy of the [B, K] mask, before the transfer, so it never synchronises with the device.
    """
    has_padding = bool(batch["pad_mask"].any()) if attention_fast_path else True
    target, target_mask = densify_target(batch, panel_mask, device)
    out = {k: v.to(device, non_blocking=True) for k, v in batch.items()
           if k not in TARGET_KEYS}
    out["target"], out["target_mask"] = target, target_mask
    if not has_padding:
        out["pad_mask"] = None
    return out


class DevicePrefetcher:
    """Iterator over ``(epoch, batch)`` pairs with each batch prepared (:func:`prepare_batch`) one step early.

    On CUDA the copy and densification of batch i+1 are issued on a side stream while step i runs on the
    default stream (the loader pins host memory, so the copies are asynchronous); before batch i+1 is used the
    default stream waits on the side stream, and ``record_stream`` tells the caching allocator the tensors are
    used on the default stream. On CPU, or with ``enabled=False``, batches are prepared when requested.
    """

    def __init__(self, batches: Iterator[tuple[int, dict[str, Tensor]]], device: torch.device, panel_mask: Tensor,
                 attention_fast_path: bool = True, enabled: bool = True):
        self.batches, self.device, self.panel_mask = batches, device, panel_mask
        self.fast_path = attention_fast_path
        self.stream = torch.cuda.Stream(device) if enabled and device.type == "cuda" else None
        self.pending: tuple[int, dict[str, Tensor | None]] | None = None

    def _prepare_next(self) -> tuple[int, dict[str, Tensor | None]]:
        epoch, batch = next(self.batches)
        if self.stream is None:
            return epoch, prepare_batch(batch, self.device, self.panel_mask, self.fast_path)
        with torch.cuda.stream(self.stream):
            return epoch, prepare_batch(batch, self.device, self.panel_mask, self.fast_path)

    def __iter__(self) -> "DevicePrefetcher":
        return self

    def __next__(self) -> tuple[int, dict[str, Tensor | None]]:
        if self.stream is None:
            return self._prepare_next()
        if self.pending is None:
            self.pending = self._prepare_next()
        epoch, batch = self.pending
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        for tensor in batch.values():
            if tensor is not None:
                tensor.record_stream(torch.cuda.current_stream(self.device))
        self.pending = self._prepare_next()  # endless iterator: the next batch always exists
        return epoch, batch


class CompileWithFallback(nn.Module):
    """``torch.compile(model)`` that falls back to the eager model, with one warning, if compiling fails.

    Compilation happens lazily at the first call (and again for a new input signature, e.g. ``pad_mask``
    None vs a tensor); an exception raised there switches this wrapper to eager for good. A genuine error in
    the model is then raised again by the eager call, so nothing is swallowed.
    """

    def __init__(self, model: nn.Module, **compile_kwargs: Any):
        super().__init__()
        self.model = model
        self.failed = False
        self.compiled: Callable[..., Tensor] = model
        try:
            self.compiled = torch.compile(model, **{**COMPILE_KWARGS, **compile_kwargs})
        except Exception as exc:  # noqa: BLE001 — e.g. an unknown backend: eager from the start
            self._fall_back(exc)

    def _fall_back(self, exc: Exception) -> None:
        self.failed = True
        warnings.warn(f"torch.compile failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                      "training continues with the eager model", RuntimeWarning, stacklevel=3)

    def forward(self, *args: Any) -> Tensor:
        if not self.failed:
            try:
                return self.compiled(*args)
            except Exception as exc:  # noqa: BLE001 — any compiler/backend failure means: run eagerly
                self._fall_back(exc)
        return self.model(*args)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rank_seed(seed: int, rank: int) -> int:
    """A distinct, reproducible seed per rank for training-time randomness (drop path)."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def rng_neutral(iterable: Iterable[Any]) -> Iterator[Any]:
    """Iterate ``iterable`` without advancing the global torch RNG.

    torch's DataLoader draws its base seed from the global RNG whenever an iterator is created; the training
    randomness (drop path) must not depend on when loaders are (re)created — e.g. once more after a resume.
    """
    iterator = None
    while True:
        with torch.random.fork_rng(devices=[]):
            if iterator is None:
                iterator = iter(iterable)
            try:
                item = next(iterator)
            except StopIteration:
                return
        yield item


def train_batches(corpus: str | CorpusInfo, loader_cfg: LoaderConfig, streams: list[int], num_streams: int,
                  steps_per_epoch: int, accum: int, start_step: int) -> Iterator[tuple[int, dict[str, Tensor]]]:
    """Endless ``(epoch, micro-batch)`` sequence of one rank starting after ``start_step`` optimizer steps.

    Each step takes ``accum`` micro-batches (one per stream of this rank); epochs advance every
    ``steps_per_epoch`` steps, so the position is a pure function of the step (exact resume).
    """
    corpus = as_corpus_info(corpus)  # opened once for every epoch's loader
    epoch, step_in_epoch = divmod(start_step, steps_per_epoch)
    skip = step_in_epoch * accum
    per_epoch = steps_per_epoch * accum
    while True:
        loader = rng_neutral(make_loader(corpus, loader_cfg, streams, num_streams, epoch, start_microbatch=skip))
        yielded = 0
        for batch in islice(loader, per_epoch - skip):
            yielded += 1
            yield epoch, batch
        if yielded < per_epoch - skip:
            raise RuntimeError(f"{corpus.path}: loader gave {skip + yielded} micro-batches in epoch {epoch}, "
                               f"expected {per_epoch} (microbatches_per_stream × streams)")
        epoch, skip = epoch + 1, 0


# ----------------------------------------------------------------------------------------------------------
# predict-the-mean baseline and validation


def _split_exists(corpus: str, split: str) -> bool:
    return bool(list_shards(corpus, split))


def _rank_share(loader: Iterator[dict[str, Tensor]], n_batches: int, ctx: DistContext, panel_mask: Tensor
                ) -> Iterator[dict]:
    """Micro-batches i < n_batches of one stream with i ≡ rank (mod world): ranks split the work, the union
    (and hence every all-reduced result) is independent of the world size. Prepared on the device."""
    panel_mask = panel_mask.to(ctx.device)
    for i, batch in enumerate(islice(rng_neutral(loader), n_batches)):
        if i % ctx.world_size == ctx.rank:
            yield prepare_batch(batch, ctx.device, panel_mask)


@torch.no_grad()
def estimate_mean_baseline(corpus: str | CorpusInfo, loader_cfg: LoaderConfig, n_batches: int, n_genes: int,
                           loss: str, ctx: DistContext, panel_mask: Tensor | None = None) -> Tensor:
    """Per-gene constant prediction [G] (log1p space) that minimises ``loss`` on the first ``n_batches``
    train micro-batches of one stream (epoch 0), over measured entries only.

    Poisson / negative binomial: log(mean e^x) (their optimum is the mean on the rate scale); MSE / smooth L1:
    mean x. Genes never measured in those batches get the pooled value over all genes.
    """
    sums = torch.zeros(3, n_genes, dtype=torch.float64, device=ctx.device)  # Σx, Σe^x, n over measured
    corpus = as_corpus_info(corpus)
    if panel_mask is None:
        panel_mask = corpus.panel_mask
    loader = make_loader(corpus, dataclasses.replace(loader_cfg, split="train", num_workers=0), [0], 1, 0)
    for batch in _rank_share(loader, n_batches, ctx, panel_mask):
        mask = batch["target_mask"].to(torch.float64)
        target = batch["target"].to(torch.float64)
        sums[0] += (target * mask).sum(0)
        sums[1] += (target.exp() * mask).sum(0)
        sums[2] += mask.sum(0)
    ctx.all_reduce(sums)
    if sums[2].sum() == 0:
        raise ValueError(f"{corpus.path}: no measured train entries in the first {n_batches} micro-batches")
    rate_scale = loss in _RATE_SCALE_LOSSES
    numerator = sums[1] if rate_scale else sums[0]
    pooled = numerator.sum() / sums[2].sum()
    mean = torch.where(sums[2] > 0, numerator / sums[2].clamp(min=1), pooled)
    return (mean.log() if rate_scale else mean).to(torch.float32)


@torch.no_grad()
def evaluate(model: nn.Module, corpus: str | CorpusInfo, val_cfg: LoaderConfig, n_batches: int, loss: str,
             baseline: Tensor, ctx: DistContext, autocast: Callable[[], contextlib.AbstractContextManager],
             panel_mask: Tensor | None = None) -> tuple[float, float, float]:
    """``(val_loss, baseline_val_loss, saturated_val_loss)``: means over the measured entries of the first
    ``n_batches`` val micro-batches (one stream, epoch 0: the same batches at every evaluation). The saturated
    loss predicts every target exactly (the floor of the loss; the reference of deviance explained)."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=ctx.device)  # Σ loss·n, Σ baseline loss·n, Σ n, Σ saturated·n
    corpus = as_corpus_info(corpus)
    if panel_mask is None:
        panel_mask = corpus.panel_mask
    loader = make_loader(corpus, val_cfg, [0], 1, 0)
    for batch in _rank_share(loader, n_batches, ctx, panel_mask):
        with autocast():
            pred = model(batch["gene_idx"], batch["values"], batch["pad_mask"])
        target, mask = batch["target"], batch["target_mask"]
        n_measured = mask.sum()
        sums[0] += expression_loss(pred.float(), target, mask, loss) * n_measured
        sums[1] += expression_loss(baseline.expand_as(target), target, mask, loss) * n_measured
        sums[2] += n_measured
        sums[3] += expression_loss(target, target, mask, loss) * n_measured
    ctx.all_reduce(sums)
    model.train(was_training)
    if sums[2] == 0:
        return math.nan, math.nan, math.nan
    return (sums[0] / sums[2]).item(), (sums[1] / sums[2]).item(), (sums[3] / sums[2]).item()


# ----------------------------------------------------------------------------------------------------------
# metrics


class MetricsLog:
    """``<run>/metrics.jsonl``: one JSON object per sync step with every METRIC_KEYS key (null if not computed).

    On resume the records after the resumed step are dropped first (they belong to the abandoned tail).
    """

    def __init__(self, path: Path, resume_step: int | None, enabled: bool):
        self.path = path
        self.enabled = enabled
        if not enabled:
            return
        kept = []
        if resume_step is not None and path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
        with atomic_path(path) as tmp:
            tmp.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as fh:
                fh.write(json.dumps({k: record.get(k) for k in METRIC_KEYS}) + "\n")


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl file, in order."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_loss_curve(metrics_path: str | os.PathLike, out_path: str | os.PathLike) -> None:
    """Train / val loss against step, with the predict-the-mean baseline, as a PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    fig, (ax, right) = plt.subplots(1, 2, figsize=(12, 4))
    train = [(r["step"], r["loss"]) for r in records if r["loss"] is not None]
    val = [(r["step"], r["val_loss"]) for r in records if r["val_loss"] is not None]
    baseline = [r["baseline_val_loss"] for r in records if r["baseline_val_loss"] is not None]
    explained = [(r["step"], r["val_deviance_explained_pct"]) for r in records
                 if r.get("val_deviance_explained_pct") is not None and math.isfinite(r["val_deviance_explained_pct"])]
    if train:
        ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", label="val loss")
    if baseline:
        ax.axhline(baseline[-1], color="grey", linestyle="--", label="val: predict the per-gene mean")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend()
    # The raw loss has an arbitrary offset (Poisson: −290 means nothing); deviance explained reads directly.
    if explained:
        right.plot(*zip(*explained), "o-", color="C1")
    right.axhline(0.0, color="grey", linestyle="--", label="predict the per-gene mean (0 %)")
    right.set_xlabel("optimizer step")
    right.set_ylabel("val deviance explained vs the mean baseline (%)")
    right.legend()
    fig.tight_layout()
    with atomic_path(out_path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------
# the loop


def train(cfg: TrainConfig, resume: bool = False, stop_at_step: int | None = None) -> TrainResult:
    """Train TxFM on ``cfg.corpus`` into the run directory ``cfg.out`` (single process or under torchrun).

    ``resume`` continues from ``<out>/checkpoints/last`` exactly. ``stop_at_step`` ends this invocation after
    that step (checkpointing it), e.g. to fit a cluster time limit; ``resume`` continues the same schedule.
    Raises ValueError for bad settings/inputs and NonFiniteLossError when the loss diverges.
    """
    if not cfg.corpus or not cfg.out:
        raise ValueError("train: both corpus and out must be set")
    ctx = init_distributed(cfg.device)
    try:
        return _train(cfg, ctx, resume, stop_at_step)
    finally:
        ctx.close()


def _train(cfg: TrainConfig, ctx: DistContext, resume: bool, stop_at_step: int | None) -> TrainResult:
    run_dir, device = Path(cfg.out), ctx.device
    info = CorpusInfo.open(cfg.corpus)
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls (outside autocast) on tensor cores
        torch.backends.cudnn.allow_tf32 = True

    # --- batch arithmetic and schedule -------------------------------------------------------------------
    accum = gradient_accumulation(cfg.global_batch, cfg.micro_batch, ctx.world_size)
    num_streams = ctx.world_size * accum
    streams = [ctx.rank + a * ctx.world_size for a in range(accum)]
    loader_cfg = LoaderConfig.from_settings(cfg, split="train", target_format="sparse" if cfg.sparse_target else "dense")
    val_cfg = dataclasses.replace(loader_cfg, split="val")
    if cfg.num_workers > 1 and accum % cfg.num_workers and ctx.is_main:
        warnings.warn(f"num_workers={cfg.num_workers} does not divide the {accum} loader streams per process: "
                      "workers will decode some row groups more than once (see txfm.data)", RuntimeWarning)
    steps_per_epoch = microbatches_per_stream(info, loader_cfg, num_streams)
    if steps_per_epoch < 1:
        raise ValueError(f"{cfg.corpus}: train split has fewer samples than one global batch ({cfg.global_batch})")
    total_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch
    warmup_steps = max(1, round(cfg.warmup_fraction * total_steps)) if cfg.warmup_fraction > 0 else 0
    weight_decay = resolve_weight_decay(cfg, total_steps)

    checkpoint = latest_checkpoint(run_dir)
    if resume and checkpoint is None:
        raise ValueError(f"{run_dir}: --resume given but the run has no checkpoint (checkpoints/last)")
    if not resume and checkpoint is not None:
        raise ValueError(f"{run_dir}: already holds checkpoints; pass --resume to continue or choose another --out")

    # --- model, optimizer, scheduler (identical initialisation on every rank) ------------------------------
    _seed_everything(cfg.seed)
    model_cfg = TxFMConfig.preset(cfg.preset, info.n_genes, library_size=cfg.library_size, **cfg.model_overrides())
    model = TxFM(model_cfg).to(device)
    model.set_activation_checkpointing(cfg.activation_checkpointing)
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                  fused=cfg.fused_adamw and device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, one_cycle_cosine(total_steps, warmup_steps))
    start_step = 0
    if checkpoint is not None:
        start_step = _restore(checkpoint, cfg, ctx, model, optimizer, scheduler, info)
    else:
        _seed_everything(_rank_seed(cfg.seed, ctx.rank))
    end_step = total_steps if stop_at_step is None else max(start_step, min(total_steps, stop_at_step))

    train_model: nn.Module = CompileWithFallback(model) if cfg.compile else model
    if ctx.world_size > 1:
        train_model = nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None)
    autocast = autocast_context(cfg.precision, device)

    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / RUN_CONFIG_FILE)
        print(f"txfm train: {model.num_parameters():,} parameters (preset {cfg.preset}), device {device}, "
              f"world size {ctx.world_size}, accum {accum} (micro_batch {cfg.micro_batch} × {ctx.world_size} "
              f"process(es) × {accum} = global_batch {cfg.global_batch}), {total_steps} steps "
              f"({steps_per_epoch} per epoch), warm-up {warmup_steps}, weight decay {weight_decay:.4g}"
              + (f"; resuming from {checkpoint} at step {start_step}" if checkpoint is not None else ""),
              flush=True)
    metrics = MetricsLog(run_dir / METRICS_FILE, start_step if checkpoint is not None else None, ctx.is_main)

    # --- baseline (once) ---------------------------------------------------------------------------------
    has_val = cfg.val_batches > 0 and _split_exists(cfg.corpus, "val")
    panel_mask = info.panel_mask.to(device)  # [D, G], densifies sparse targets on the device
    init_bias = checkpoint is None and cfg.init_output_bias == "mean"
    baseline = (estimate_mean_baseline(info, loader_cfg, max(1, cfg.baseline_batches), info.n_genes,
                                       cfg.loss, ctx, panel_mask) if has_val or init_bias else None)
    if init_bias:  # start at the predict-the-mean baseline; identical on every rank (the baseline is all-reduced)
        with torch.no_grad():
            model.decoder.head.bias.copy_(activation_logits_for(model_cfg.activation, baseline, cfg.library_size))
    if not has_val:
        baseline = None

    # --- training ------------------------------------------------------------------------------------------
    batches = DevicePrefetcher(
        train_batches(info, loader_cfg, streams, num_streams, steps_per_epoch, accum, start_step),
        device, panel_mask, cfg.attention_fast_path, enabled=cfg.prefetch)
    no_bad_step = torch.iinfo(torch.int64).max
    first_bad_step = torch.full((), no_bad_step, dtype=torch.int64, device=device)
    interval_loss = torch.zeros((), dtype=torch.float32, device=device)
    interval_steps, timer = 0, time.perf_counter()
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
    last: dict[str, Any] = {"loss": None, "val_loss": None, "baseline_val_loss": None}
    # Model-card facts for the checkpoints: the corpus summary (fixed for the run) and the latest validation
    # record (from metrics.jsonl when resuming, then kept up to date here), so a checkpoint re-reads nothing.
    card: dict[str, Any] = {"training_data": training_data_summary(info.path, info.datasets) if ctx.is_main else {},
                            "metrics": {}}
    if ctx.is_main and (run_dir / METRICS_FILE).exists():
        validated = [r for r in read_metrics(run_dir / METRICS_FILE) if r.get("val_loss") is not None]
        card["metrics"] = validated[-1] if validated else {}
    bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
               disable=not (cfg.progress and ctx.is_main), file=sys.stderr)
    train_model.train()
    for step in range(start_step + 1, end_step + 1):  # ``step`` = 1-based index of this optimizer step
        lr = scheduler.get_last_lr()[0]
        step_loss = torch.zeros((), dtype=torch.float32, device=device)
        for micro in range(accum):
            epoch, batch = next(batches)
            last_micro = micro == accum - 1
            sync = contextlib.nullcontext() if last_micro or ctx.world_size == 1 else train_model.no_sync()
            with sync:
                with autocast():
                    pred = train_model(batch["gene_idx"], batch["values"], batch["pad_mask"])
                loss = expression_loss(pred.float(), batch["target"], batch["target_mask"], cfg.loss) / accum
                loss.backward()
            step_loss += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        interval_loss += step_loss
        interval_steps += 1
        finite = torch.isfinite(step_loss) & torch.isfinite(grad_norm)
        first_bad_step = torch.minimum(first_bad_step, torch.where(finite, no_bad_step, step))
        bar.update(1)

        do_val = has_val and (step % cfg.val_every == 0 or step == total_steps)
        do_ckpt = step % cfg.ckpt_every == 0 or step == end_step
        if not (do_val or do_ckpt or step % cfg.log_every == 0 or step == end_step):
            continue
        # ---- sync step: check finiteness everywhere, then log / validate / checkpoint ----
        bad_step = int(ctx.all_reduce(first_bad_step.clone(), "min").item())
        if bad_step != no_bad_step:
            bar.close()
            raise NonFiniteLossError(bad_step, checkpoint)
        mean_loss = ctx.all_reduce(interval_loss.clone()).item() / (interval_steps * ctx.world_size)
        record = {"step": step, "epoch": (step - 1) // steps_per_epoch, "loss": mean_loss, "lr": lr,
                  "grad_norm": float(grad_norm.item()),
                  "samples_per_s": interval_steps * cfg.global_batch / max(time.perf_counter() - timer, 1e-9)}
        interval_loss.zero_()
        interval_steps = 0
        if do_val:
            record["val_loss"], record["baseline_val_loss"], record["saturated_val_loss"] = evaluate(
                model, info, val_cfg, cfg.val_batches, cfg.loss, baseline, ctx, autocast, panel_mask)
            record["val_deviance_explained_pct"] = deviance_explained_pct(
                record["val_loss"], record["baseline_val_loss"], record["saturated_val_loss"])
        metrics.write(record)
        if do_val:
            card["metrics"] = {k: record.get(k) for k in METRIC_KEYS}  # as metrics.jsonl holds it
        last.update({k: record[k] for k in last if k in record})
        bar.set_postfix({k: f"{v:.4g}" for k, v in (("loss", record["loss"]), ("val", record.get("val_loss")),
                                                      ("samples/s", record["samples_per_s"])) if v is not None})
        if do_ckpt:
            checkpoint = _save(run_dir, step, (step - 1) // steps_per_epoch, steps_per_epoch, accum, cfg, ctx,
                               model, model_cfg, info, optimizer, scheduler, card)
        timer = time.perf_counter()  # throughput excludes validation and checkpoint time
    bar.close()

    if ctx.is_main and (run_dir / METRICS_FILE).exists() and end_step > 0:
        plot_loss_curve(run_dir / METRICS_FILE, run_dir / LOSS_CURVE_FILE)
    return TrainResult(run_dir, end_step, total_steps, last["loss"], last["val_loss"], last["baseline_val_loss"],
                       checkpoint)


def _save(run_dir: Path, step: int, epoch: int, steps_per_epoch: int, accum: int, cfg: TrainConfig,
          ctx: DistContext, model: TxFM, model_cfg: TxFMConfig, info: CorpusInfo,
          optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
          card: dict[str, Any]) -> Path:
    """Rank 0 writes checkpoint ``step`` (every rank's RNG state gathered into it); all ranks wait for it.
    ``card``: the model card's ``training_data`` and ``metrics`` (see the loop)."""
    rng = capture_rng_state()
    rng_per_rank = [rng]
    if ctx.world_size > 1:
        rng_per_rank = [None] * ctx.world_size
        dist.all_gather_object(rng_per_rank, rng)
    path = checkpoints_root(run_dir) / checkpoint_name(step)
    if ctx.is_main:
        state = {"step": step, "epoch": epoch, "start_microbatch": (step % steps_per_epoch) * accum,
                 "steps_per_epoch": steps_per_epoch, "world_size": ctx.world_size, "accum": accum,
                 "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_per_rank,
                 "train_config": cfg.to_dict()}
        path = save_checkpoint(run_dir, step, model, model_cfg, model_genes(cfg, info), state,
                               extra={"train_config": cfg.to_dict(), "step": step, "epoch": epoch,
                                      "n_input_genes": cfg.n_input_genes, "library_size": cfg.library_size,
                                      **card},
                               keep=cfg.keep_checkpoints)
    ctx.barrier()
    return path


def model_genes(cfg: TrainConfig, info: CorpusInfo) -> pd.DataFrame:
    """The vocabulary saved with a model; with frequency sampling plus the detection frequencies that
    ``txfm embed`` needs to sample input genes as training did (``txfm.embed.FREQUENCY_COLUMN``)."""
    if cfg.sampling != "frequency":
        return info.genes
    from txfm.embed import FREQUENCY_COLUMN

    return info.genes.assign(**{FREQUENCY_COLUMN: info.gene_frequency})


def _restore(checkpoint: Path, cfg: TrainConfig, ctx: DistContext, model: TxFM, optimizer: torch.optim.Optimizer,
             scheduler: torch.optim.lr_scheduler.LRScheduler, info: CorpusInfo) -> int:
    """Load model / optimizer / scheduler / RNG from ``checkpoint``; returns the step it was taken at."""
    from txfm.checkpoint import load_model

    state = load_trainer_state(checkpoint)
    changed = resume_mismatches(state["train_config"], cfg)
    if changed:
        raise ValueError(f"{checkpoint}: cannot resume with changed setting(s) {'; '.join(changed)}")
    saved_model, _, saved_genes = load_model(checkpoint, map_location=ctx.device)
    if list(saved_genes["gene_id"]) != list(info.genes["gene_id"]):
        raise ValueError(f"{checkpoint}: gene vocabulary differs from the corpus {cfg.corpus}")
    model.load_state_dict(saved_model.state_dict())
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng = state["rng"]
    if len(rng) == ctx.world_size:
        restore_rng_state(rng[ctx.rank])
    else:  # a different world size cannot continue each rank's stream of random numbers; start fresh ones
        _seed_everything(_rank_seed(cfg.seed + state["step"], ctx.rank))
    return int(state["step"])
