"""Reconstruction of held-out expression: a checkpoint's predictions on a corpus's validation split.

Batches come from :func:`txfm.data.make_loader` (split ``val``, one stream, epoch 0, the checkpoint's K and
library size), so the model sees exactly what it would see in training validation. Every vocabulary gene
the sample's dataset measures is scored (``target_mask``), in log1p space ``x = log1p(count / library · L)``:

* **Poisson deviance** of the training objective's rate model — observation ``y = eˣ`` with rate ``λ = e^x̂``:
  ``2·(y·log(y/λ) − (y − λ)) = 2·(eˣ·(x − x̂) − eˣ + e^x̂)``, mean over measured entries (0 = perfect);
* **Pearson r** between ``x̂`` and ``x`` over a sample's measured genes, averaged over samples.

The baseline predicts each gene's training mean for every sample: ``log(mean eˣ)`` over the measured
entries of up to ``baseline_batches`` training micro-batches (the Poisson-optimal constant; genes never
seen get the pooled value). The loader drops the last incomplete micro-batch of the split (< micro_batch
samples).
"""

from __future__ import annotations

import os
from itertools import islice
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from curation import schema


def _split_rows(corpus: str | os.PathLike, split: str) -> int:
    return sum(pq.ParquetFile(path).metadata.num_rows for path in schema.list_shards(corpus, split))


def _loader(corpus: str | os.PathLike, split: str, micro_batch: int, n_input_genes: int, library_size: float,
            sampling: str, temperature: float, max_batches: int | None):
    from txfm.data import LoaderConfig, make_loader

    rows = _split_rows(corpus, split)
    if rows == 0:
        raise ValueError(f"{corpus}: no {split!r} shards for reconstruction")
    cfg = LoaderConfig(split=split, micro_batch=min(micro_batch, rows), n_input_genes=n_input_genes,
                       library_size=library_size, sampling=sampling, temperature=temperature, seed=0,
                       pin_memory=False)
    loader = make_loader(corpus, cfg, [0], 1, 0)
    return islice(loader, max_batches) if max_batches is not None else loader, len(loader)


def poisson_deviance(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Elementwise deviance of rate e^pred for observation e^target (log1p space tensors of equal shape)."""
    observed = target.exp()
    return 2.0 * (observed * (target - pred) - observed + pred.exp())


def per_sample_pearson(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Pearson r over each row's masked entries. [B, G] ×3 → [B] float64 (NaN for < 2 entries or no variance)."""
    mask = mask.to(torch.float64)
    pred, target = pred.to(torch.float64), target.to(torch.float64)
    n = mask.sum(dim=1)
    safe_n = n.clamp(min=1)
    dp = (pred - (pred * mask).sum(1, keepdim=True) / safe_n[:, None]) * mask
    dt = (target - (target * mask).sum(1, keepdim=True) / safe_n[:, None]) * mask
    denominator = (dp.square().sum(1) * dt.square().sum(1)).sqrt()
    r = (dp * dt).sum(1) / denominator
    return torch.where((n >= 2) & (denominator > 0), r, torch.full_like(r, float("nan")))


@torch.no_grad()
def mean_expression_baseline(corpus: str | os.PathLike, n_genes: int, micro_batch: int, n_input_genes: int,
                             library_size: float, max_batches: int) -> torch.Tensor:
    """Per-gene ``log(mean eˣ)`` [G] over the measured entries of up to ``max_batches`` train micro-batches."""
    loader, _ = _loader(corpus, "train", micro_batch, n_input_genes, library_size, "uniform", 1.0, max_batches)
    total, count = torch.zeros(n_genes, dtype=torch.float64), torch.zeros(n_genes, dtype=torch.float64)
    for batch in loader:
        mask = batch["target_mask"].to(torch.float64)
        total += (batch["target"].to(torch.float64).exp() * mask).sum(0)
        count += mask.sum(0)
    if count.sum() == 0:
        raise ValueError(f"{corpus}: no measured train entries for the mean-expression baseline")
    pooled = total.sum() / count.sum()
    return torch.where(count > 0, total / count.clamp(min=1), pooled).log().to(torch.float32)


@torch.no_grad()
def reconstruction_metrics(checkpoint: str | os.PathLike, corpus: str | os.PathLike, micro_batch: int = 64,
                           max_batches: int | None = None, baseline_batches: int = 64, device: str | None = None,
                           progress: bool = True) -> dict[str, Any]:
    """``{"model": {poisson_deviance, pearson}, "mean_expression": {...}, n_samples, n_entries}`` on split val."""
    from txfm.checkpoint import load_model, read_model_config, resolve_checkpoint
    from txfm.data import CorpusInfo
    from txfm.embed import default_n_input_genes

    model_dir = resolve_checkpoint(checkpoint)
    torch_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, cfg, vocabulary = load_model(model_dir, map_location=torch_device)
    _, extra = read_model_config(model_dir)
    info = CorpusInfo.open(corpus)
    if not np.array_equal(info.genes["gene_id"].astype(str).to_numpy(), vocabulary["gene_id"].astype(str).to_numpy()):
        raise ValueError(f"{corpus}: vocabulary differs from the checkpoint's {model_dir} (reconstruction needs "
                         "the corpus the model was trained on)")
    k = default_n_input_genes(extra)
    train_config = extra.get("train_config") if isinstance(extra.get("train_config"), dict) else {}
    sampling, temperature = train_config.get("sampling", "uniform"), float(train_config.get("temperature", 1.0))
    baseline = mean_expression_baseline(corpus, cfg.n_genes, micro_batch, k, cfg.library_size, baseline_batches)
    baseline = baseline.to(torch_device)
    loader, n_batches = _loader(corpus, "val", micro_batch, k, cfg.library_size, sampling, temperature, max_batches)
    sums = {name: 0.0 for name in ("model_deviance", "baseline_deviance", "model_r", "baseline_r")}
    n_entries, n_samples, n_r = 0, 0, {"model": 0, "baseline": 0}
    total = n_batches if max_batches is None else min(n_batches, max_batches)
    for batch in tqdm(loader, total=total, desc="reconstruction", unit="batch", disable=not progress, leave=False):
        batch = {name: tensor.to(torch_device) for name, tensor in batch.items()}
        pred = model(batch["gene_idx"], batch["values"], batch["pad_mask"]).float()
        target, mask = batch["target"], batch["target_mask"]
        base = baseline.expand_as(target)
        sums["model_deviance"] += float(poisson_deviance(pred, target)[mask].double().sum())
        sums["baseline_deviance"] += float(poisson_deviance(base, target)[mask].double().sum())
        for name, prediction in (("model", pred), ("baseline", base)):
            r = per_sample_pearson(prediction, target, mask)
            sums[f"{name}_r"] += float(r.nan_to_num(0.0).sum())
            n_r[name] += int((~r.isnan()).sum())
        n_entries += int(mask.sum())
        n_samples += int(target.shape[0])
    if n_entries == 0:
        raise ValueError(f"{corpus}: no measured validation entries")

    def mean_r(name: str) -> float:
        return sums[f"{name}_r"] / n_r[name] if n_r[name] else float("nan")

    return {"model": {"poisson_deviance": sums["model_deviance"] / n_entries, "pearson": mean_r("model")},
            "mean_expression": {"poisson_deviance": sums["baseline_deviance"] / n_entries,
                                "pearson": mean_r("baseline")},
            "n_samples": n_samples, "n_entries": n_entries, "n_input_genes": int(k)}
