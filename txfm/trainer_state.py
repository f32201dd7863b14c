"""Trainer checkpoints: directory layout, atomic saves, the ``last`` pointer, pruning, RNG capture.

Layout of a run directory::

    <run>/checkpoints/step-000100/   model.safetensors, config.json, genes.parquet  (txfm.checkpoint.save_model)
                                     trainer_state.pt  (optimizer, scheduler, RNG states, epoch, step, loader position)
    <run>/checkpoints/last           text file naming the newest complete checkpoint, e.g. "step-000100"

A checkpoint directory is written under a temporary name and renamed into place, and ``last`` is replaced
atomically afterwards, so a crash at any moment leaves ``last`` naming a complete checkpoint.
``trainer_state.pt`` holds only tensors and primitives (``torch.save``) and is read with ``weights_only=True``:
loading a checkpoint never unpickles arbitrary objects.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from curation.io import atomic_path

CHECKPOINTS_DIR = "checkpoints"
LAST_POINTER = "last"
TRAINER_STATE_FILE = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step-(\d{6,})$")


def checkpoint_name(step: int) -> str:
    """Directory name of the checkpoint taken after ``step`` optimizer steps: ``step-000100``."""
    return f"step-{step:06d}"


def checkpoints_root(run_dir: str | os.PathLike) -> Path:
    """``<run>/checkpoints``."""
    return Path(run_dir) / CHECKPOINTS_DIR


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoint directories of a run as ``(step, path)``, oldest first (temp dirs excluded)."""
    root = checkpoints_root(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint ``<run>/checkpoints/last`` names, or None when the run has none yet.

    Raises ValueError when ``last`` names a checkpoint that is missing or lacks its trainer state.
    """
    pointer = checkpoints_root(run_dir) / LAST_POINTER
    if not pointer.exists():
        return None
    name = pointer.read_text().strip() if not pointer.is_symlink() else os.readlink(pointer)
    target = checkpoints_root(run_dir) / Path(name).name
    if not (target / TRAINER_STATE_FILE).is_file():
        raise ValueError(f"{pointer}: names {name!r}, which is not a complete checkpoint")
    return target


def capture_rng_state() -> dict[str, Any]:
    """The torch (CPU and every CUDA device), numpy and python RNG states as tensors and primitives."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": int(py_version), "internal": list(py_internal), "gauss_next": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["key"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: str | os.PathLike, step: int, model: torch.nn.Module, model_cfg: Any,
                    genes: Any, trainer_state: dict[str, Any], extra: dict[str, Any] | None = None,
                    keep: int = 3) -> Path:
    """Write ``<run>/checkpoints/step-NNNNNN`` atomically, point ``last`` at it, keep the newest ``keep``.

    ``model`` is the bare TxFM (not a DDP/compiled wrapper); ``trainer_state`` a dict of tensors/primitives.
    Returns the checkpoint directory.
    """
    from txfm.checkpoint import save_model

    root = checkpoints_root(run_dir)
    final = root / checkpoint_name(step)
    with atomic_path(final) as tmp:
        tmp.mkdir(parents=True)
        save_model(tmp, model, model_cfg, genes, extra=extra)
        torch.save(trainer_state, tmp / TRAINER_STATE_FILE)
        if final.exists():  # left by an interrupted run that is now being redone from an older checkpoint
            shutil.rmtree(final)
    with atomic_path(root / LAST_POINTER) as tmp:
        tmp.write_text(final.name + "\n")
    prune_checkpoints(run_dir, keep)
    return final


def prune_checkpoints(run_dir: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints (never the one ``last`` names); returns those deleted."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    current = latest_checkpoint(run_dir)
    removed = []
    for _, path in list_checkpoints(run_dir)[:-keep]:
        if current is not None and path.resolve() == current.resolve():
            continue
        shutil.rmtree(path)
        removed.append(path)
    return removed


def load_trainer_state(checkpoint_dir: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """``trainer_state.pt`` of a checkpoint, loaded with ``weights_only=True`` (no arbitrary unpickling)."""
    path = Path(checkpoint_dir) / TRAINER_STATE_FILE
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"{path}: missing (not a trainer checkpoint)") from None
    except Exception as exc:  # noqa: BLE001 (any unpickling failure means a corrupt/foreign file)
        raise ValueError(f"{path}: cannot load trainer state ({type(exc).__name__}: {exc})") from None
