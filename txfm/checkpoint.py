"""Model checkpoints: safetensors weights + JSON config + the gene vocabulary. Loading never unpickles.

A model directory is laid out the way users of model hubs expect (``TxFM.save_pretrained`` /
``TxFM.from_pretrained``, both offline)::

    model.safetensors   the TxFM state dict (float tensors, CPU)
    config.json         {"format_version", "model": TxFMConfig fields, "extra": caller's JSON-able dict}
    genes.parquet       the vocabulary, one row per model gene in order (gene_idx, gene_id, symbol, ...)
    README.md           generated model card: architecture, input transform, training data, vocabulary, metrics

Every file is written atomically, so a reader never sees a half-written file; config.json is written last, so
its presence marks a complete model. Trainer state (optimizer, RNG, loader position) lives next to these files
and is handled by ``txfm.trainer_state``.
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
MODEL_CARD_FILE = "README.md"
PAPER = "Effective Biological Representation Learning by Masking Gene Expression (arXiv 2605.31562)"
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
    with atomic_path(directory / MODEL_CARD_FILE) as tmp:
        tmp.write_text(model_card(cfg, genes, extra or {}, n_parameters=sum(t.numel() for t in state.values())))
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


def model_card(cfg: TxFMConfig, genes: pd.DataFrame, extra: dict, n_parameters: int) -> str:
    """Markdown model card (with hub-style YAML front matter) of a saved model.

    Reads what ``extra`` carries, all optional: ``train_config`` (dict), ``step``, ``epoch``, ``n_input_genes``,
    ``library_size``, ``training_data`` (from :func:`training_data_summary`) and ``metrics`` (the latest
    metrics.jsonl record with a validation loss).
    """
    train = extra.get("train_config") or {}
    data = extra.get("training_data") or {}
    metrics = extra.get("metrics") or {}
    lines = ["---", "library_name: txfm", "tags: [transcriptomics, rna-seq, single-cell, foundation-model]",
             "---", "", f"# TxFM ({cfg.depth} blocks, width {cfg.dim}, {n_parameters / 1e6:.1f}M parameters)", "",
             f"A masked-expression transformer as in *{PAPER}*: K sampled genes of a sample become tokens "
             "[gene embedding ; value] plus a CLS token, a dense encoder, and a residual-MLP decoder from CLS to "
             "every gene.", "", "## Architecture", "",
             "| setting | value |", "|---|---|"]
    for name, value in dataclasses.asdict(cfg).items():
        lines.append(f"| {name} | {value} |")
    lines += ["", "## Input transform", "",
              f"Counts are library-size normalised to {extra.get('library_size', train.get('library_size', '?'))} "
              f"per sample, then log1p; {extra.get('n_input_genes', train.get('n_input_genes', '?'))} measured "
              f"genes are sampled as input tokens (sampling `{train.get('sampling', '?')}`, temperature "
              f"{train.get('temperature', '?')}). `txfm embed` applies the same transform.", "",
              "## Training data", ""]
    if data:
        lines.append(f"Corpus `{data.get('corpus', '?')}`: {data.get('n_samples', '?')} samples, "
                     f"{data.get('n_datasets', '?')} datasets"
                     + (f", manifest sha256 `{data['manifest_sha256']}`." if data.get("manifest_sha256") else "."))
        if data.get("datasets"):
            lines += ["", "| dataset | modality | samples | panel genes |", "|---|---|---|---|"]
            lines += [f"| {d['dataset']} | {d['modality']} | {d['n_samples']} | {d['n_genes']} |"
                      for d in data["datasets"]]
    else:
        lines.append("Not recorded.")
    ids = genes["gene_id"].astype(str).tolist()
    lines += ["", "## Vocabulary", "",
              f"{len(ids)} genes in `{GENES_FILE}` (model output order), e.g. {', '.join(ids[:5])}"
              f"{' …' if len(ids) > 5 else ''}. Genes outside it are ignored at embedding time.", "",
              "## Metrics", ""]
    if extra.get("step") is not None:
        lines.append(f"Saved at optimizer step {extra['step']} (epoch {extra.get('epoch', '?')}).")
    if metrics:
        lines += ["", "| metric | value |", "|---|---|"]
        lines += [f"| {key} | {value:.6g} |" if isinstance(value, float) else f"| {key} | {value} |"
                  for key, value in metrics.items() if value is not None]
    elif extra.get("step") is None:
        lines.append("Not recorded.")
    lines += ["", "## Use", "", "```python", "from txfm.model import TxFM", "",
              "model = TxFM.from_pretrained(\"path/to/this/directory\")  # offline; model.vocabulary: the genes",
              "```", "", "or `txfm embed --checkpoint <dir> --input cells.h5ad --output embedded.h5ad`.", ""]
    return "\n".join(lines)


def training_data_summary(corpus: str | os.PathLike, datasets: pd.DataFrame) -> dict:
    """JSON-ready summary of the training corpus for the model card: path, sizes, datasets, manifest digest."""
    from curation import schema
    from curation.io import file_digest

    corpus = Path(corpus)
    manifest = corpus / schema.MANIFEST_FILE
    rows = [{"dataset": str(r["dataset"]), "modality": str(r["modality"]), "n_samples": int(r["n_samples"]),
             "n_genes": int(r["n_genes"])} for _, r in datasets.iterrows()]
    return {"corpus": str(corpus), "n_datasets": len(rows), "n_samples": sum(r["n_samples"] for r in rows),
            "datasets": rows, "manifest_sha256": file_digest(manifest) if manifest.is_file() else None}
