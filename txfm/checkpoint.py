"""Model checkpoints: safetensors weights + JSON config + the gene vocabulary. Loading never unpickles.

A model directory holds::

    model.safetensors   the TxFM state dict (float tensors, CPU)
    config.json         {"format_version", "model": TxFMConfig fields, "extra": caller's JSON-able dict}
    genes.parquet       the vocabulary, one row per model gene in order (gene_idx, gene_id, symbol, ...)

Every file is written atomically, so a reader never sees a half-written file. Trainer state (optimizer,
RNG, loader position) lives next to these files and is handled by ``txfm.trainer_state``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from curation.io import atomic_path, one_line
from txfm.model import TxFM, TxFMConfig

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
GENES_FILE = "genes.parquet"
MODEL_FORMAT_VERSION = 1


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare module inside DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def save_model(directory: str | os.PathLike, model: TxFM, cfg: TxFMConfig, genes: pd.DataFrame,
               extra: dict | None = None) -> None:
    """Write ``directory/{model.safetensors, config.json, genes.parquet}``, each atomically.

    ``genes`` must have a ``gene_id`` column and one row per model gene (cfg.n_genes); ``extra`` must be
    JSON-serialisable (e.g. training config, step, the loader's n_input_genes).
    """
    directory = Path(directory)
    if "gene_id" not in genes.columns:
        raise ValueError(f"{directory}: genes table has no gene_id column")
    if len(genes) != cfg.n_genes:
        raise ValueError(f"{directory}: genes table has {len(genes)} rows, model has n_genes={cfg.n_genes}")
    state = {name: tensor.detach().to("cpu").contiguous() for name, tensor in unwrap_model(model).state_dict().items()}
    config = {"format_version": MODEL_FORMAT_VERSION, "model": dataclasses.asdict(cfg), "extra": extra or {}}
    try:
        config_text = json.dumps(config, indent=2, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{directory}: extra is not JSON-serialisable ({exc})") from None
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / MODEL_FILE) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "txfm_format_version": str(MODEL_FORMAT_VERSION)})
    with atomic_path(directory / GENES_FILE) as tmp:
        genes.reset_index(drop=True).to_parquet(tmp, index=False)
    with atomic_path(directory / CONFIG_FILE) as tmp:  # written last: its presence marks a complete model
        tmp.write_text(config_text + "\n")


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A model directory from a model/checkpoint dir, or a run dir (follows ``<run>/checkpoints/last``)."""
    path = Path(path)
    if (path / CONFIG_FILE).is_file():
        return path
    for pointer in (path / "checkpoints" / "last", path / "last"):
        if pointer.exists():
            name = os.readlink(pointer) if pointer.is_symlink() else pointer.read_text().strip()
            target = pointer.parent / Path(name).name
            if (target / CONFIG_FILE).is_file():
                return target
    raise ValueError(f"{path}: not a TxFM checkpoint (no {CONFIG_FILE}, no checkpoints/last)")


def read_model_config(directory: str | os.PathLike) -> tuple[TxFMConfig, dict[str, Any]]:
    """``(TxFMConfig, extra)`` from ``directory/config.json``."""
    path = Path(directory) / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: missing (not a TxFM model directory)") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise ValueError(f"{path}: no 'model' section")
    if config.get("format_version") != MODEL_FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {config.get('format_version')!r}, expected {MODEL_FORMAT_VERSION}")
    try:
        cfg = TxFMConfig.from_dict(config["model"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: bad model config ({exc})") from None
    return cfg, config.get("extra") or {}


def load_model(directory: str | os.PathLike, map_location: str | torch.device = "cpu"
               ) -> tuple[TxFM, TxFMConfig, pd.DataFrame]:
    """Rebuild the model saved by :func:`save_model` (eval mode) with its config and vocabulary."""
    directory = Path(directory)
    cfg, _ = read_model_config(directory)
    weights_path, genes_path = directory / MODEL_FILE, directory / GENES_FILE
    try:
        state = load_file(str(weights_path), device=str(map_location))
    except FileNotFoundError:
        raise ValueError(f"{weights_path}: missing") from None
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{weights_path}: cannot read safetensors ({exc})") from None
    with torch.device("meta"):  # no throw-away random init; the loaded tensors become the parameters
        model = TxFM(cfg)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        detail = one_line(exc)[:300]  # bounded
        raise ValueError(f"{weights_path}: weights do not match config.json ({detail})") from None
    model.eval()
    try:
        genes = pd.read_parquet(genes_path)
    except FileNotFoundError:
        raise ValueError(f"{genes_path}: missing") from None
    if len(genes) != cfg.n_genes or "gene_id" not in genes.columns:
        raise ValueError(f"{genes_path}: expected {cfg.n_genes} rows with a gene_id column, got {len(genes)} rows")
    return model, cfg, genes
