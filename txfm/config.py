"""Training configuration: the ``TrainConfig`` dataclass, YAML files and ``key=value`` overrides.

Precedence (lowest first): dataclass defaults ← YAML file (``--config``) ← ``key=value`` overrides. Every key is
a dataclass field whose ``metadata["help"]`` is the one source of the ``txfm train --help`` text, so the help can
never drift from the code. Unknown keys and values of the wrong type raise a one-line ``ValueError``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# The allowed values live with their owners (model presets, losses and activations, the input transform);
# the config only names them.
from txfm.data import DECODE_CACHE_AUTO
from txfm.losses import ACTIVATIONS, LOSS_KINDS
from txfm.model import PRESETS
from txfm.transform import LIBRARY_SIZE, N_INPUT_GENES, SAMPLING_KINDS

PRESET_NAMES = tuple(PRESETS)
LOSSES = LOSS_KINDS
ACTIVATION_NAMES = tuple(ACTIVATIONS)
SAMPLINGS = SAMPLING_KINDS
PRECISIONS = ("auto", "bf16", "fp32")

#: Keys that define what is trained and how; changing one of them makes ``--resume`` refuse to continue, because
#: the continued run would no longer be the run whose checkpoint it loads. Operational keys (paths, logging and
#: checkpoint cadence, workers, device, precision, compile and the other speed switches, progress bar) may change
#: between restarts.
RESUME_INVARIANT_KEYS = ("preset", "dim", "depth", "heads", "decoder_depth", "decoder_dim", "activation",
                         "drop_path", "loss", "n_input_genes", "sampling", "temperature", "library_size",
                         "global_batch", "micro_batch", "epochs", "max_steps", "lr", "betas", "eps",
                         "weight_decay", "warmup_fraction", "grad_clip", "seed")


def _key(default: Any, help: str, **kw: Any) -> Any:  # noqa: A002 (mirrors argparse's name)
    """A dataclass field with its help text (used for ``txfm train --help``)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class TrainConfig:
    """Every setting of one training run (see ``config_help()`` for the documented list)."""

    # data and run paths
    corpus: str | None = _key(None, "corpus directory (genes.parquet, datasets.parquet, shards/)")
    out: str | None = _key(None, "run directory: metrics.jsonl, loss_curve.png, checkpoints/")
    # model
    preset: str = _key("S", f"model size preset, one of {', '.join(PRESET_NAMES)}")
    dim: int | None = _key(None, "override: transformer width (null = preset's)")
    depth: int | None = _key(None, "override: number of transformer blocks (null = preset's)")
    heads: int | None = _key(None, "override: attention heads (null = preset's)")
    decoder_depth: int | None = _key(None, "override: residual MLP decoder blocks, 0 = linear (null = preset's)")
    decoder_dim: int | None = _key(None, "override: decoder width (null = preset's)")
    activation: str | None = _key(None, f"override: output activation, one of {', '.join(ACTIVATION_NAMES)}")
    drop_path: float | None = _key(None, "override: stochastic depth rate (null = preset's)")
    # objective and input sampling
    loss: str = _key("poisson", f"expression loss, one of {', '.join(LOSSES)}")
    n_input_genes: int = _key(N_INPUT_GENES, "K, input genes sampled per sample from its dataset panel")
    sampling: str = _key("uniform", f"input gene sampling, one of {', '.join(SAMPLINGS)}")
    temperature: float = _key(1.0, "tau for frequency sampling, p ~ freq^(1/tau)")
    library_size: float = _key(LIBRARY_SIZE, "L, counts are normalised to log1p(count / total * L)")
    # batch and schedule
    global_batch: int = _key(1536, "samples per optimizer step, over all processes and accumulation steps")
    micro_batch: int = _key(32, "samples per forward pass per process; accum = global_batch/(micro_batch*world)")
    epochs: int = _key(1, "passes over the train split (ignored when max_steps is set)")
    max_steps: int | None = _key(None, "optimizer steps in total; null = epochs * steps per epoch")
    lr: float = _key(1e-3, "peak learning rate (AdamW)")
    betas: tuple[float, float] = _key((0.9, 0.999), "AdamW betas, written 0.9,0.999")
    eps: float = _key(1e-6, "AdamW epsilon")
    weight_decay: float | str = _key("auto", "AdamW weight decay; auto = 1/(lr * total_steps)")
    warmup_fraction: float = _key(0.1, "share of steps of linear warm-up before the cosine decay to ~0")
    grad_clip: float = _key(1.0, "clip the global gradient norm to this (0 = no clipping)")
    # execution
    precision: str = _key("auto", "auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32")
    compile: bool = _key(False, "torch.compile the model (falls back to eager with one warning if it fails)")
    fused_adamw: bool = _key(True, "fused AdamW kernel on CUDA (one launch for all parameters); ignored on CPU")
    activation_checkpointing: bool = _key(False, "recompute encoder block activations in backward (less memory, "
                                                 "~+33% FLOPs)")
    sparse_target: bool = _key(True, "loader ships target entries; the dense [B, G] target is built on the device")
    prefetch: bool = _key(True, "copy the next batch to the GPU on a side stream while this step runs (CUDA)")
    attention_fast_path: bool = _key(True, "no attention mask for batches without padding (flash kernels)")
    init_output_bias: str = _key("mean", "start the decoder output bias at the per-gene mean (mean) or at 0 (zero); "
                                         "mean starts training at the predict-the-mean baseline")
    num_threads: int = _key(0, "torch intra-op CPU threads; 0 = torch's default")
    device: str = _key("auto", "auto (CUDA if available) | cpu | cuda | cuda:N")
    num_workers: int = _key(0, "loader worker processes per training process")
    decode_cache: str = _key(DECODE_CACHE_AUTO, "decoded row-group cache (memory-mapped Arrow IPC): auto = <corpus>/.decoded, "
                                     "none = decode Parquet each epoch, or a directory")
    seed: int = _key(0, "seed of model initialisation, data order and gene sampling")
    # logging, validation and checkpoints
    log_every: int = _key(10, "steps between metrics.jsonl records (the only host syncs of the loss)")
    val_every: int = _key(500, "steps between validation-loss evaluations (also at the end)")
    val_batches: int = _key(20, "validation micro-batches per evaluation (bounded)")
    baseline_batches: int = _key(20, "train micro-batches used once to estimate the predict-the-mean baseline")
    ckpt_every: int = _key(1000, "steps between checkpoints (also at the end)")
    keep_checkpoints: int = _key(3, "checkpoints kept in <out>/checkpoints (oldest deleted first)")
    progress: bool = _key(True, "show a tqdm progress bar")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise a one-line ValueError for the first setting outside its allowed range."""
        _choice("preset", self.preset, PRESET_NAMES)
        _choice("loss", self.loss, LOSSES)
        _choice("sampling", self.sampling, SAMPLINGS)
        _choice("precision", self.precision, PRECISIONS)
        _choice("init_output_bias", self.init_output_bias, ("mean", "zero"))
        if self.activation is not None:
            _choice("activation", self.activation, ACTIVATION_NAMES)
        for name in ("n_input_genes", "global_batch", "micro_batch", "epochs", "log_every", "val_every",
                     "ckpt_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("dim", "depth", "heads", "decoder_dim", "max_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("decoder_depth", "num_workers", "val_batches", "baseline_batches", "num_threads"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (self.lr > 0 and self.eps > 0 and self.temperature > 0 and self.library_size > 0):
            raise ValueError("lr, eps, temperature and library_size must be > 0")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must lie in [0, 1), got {self.betas}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must lie in [0, 1), got {self.warmup_fraction}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0, got {self.grad_clip}")
        if self.drop_path is not None and not 0.0 <= self.drop_path < 1.0:
            raise ValueError(f"drop_path must lie in [0, 1), got {self.drop_path}")
        if isinstance(self.weight_decay, str) and self.weight_decay != "auto":
            raise ValueError(f"weight_decay must be a number >= 0 or 'auto', got {self.weight_decay!r}")
        if not isinstance(self.weight_decay, str) and self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")

    def model_overrides(self) -> dict[str, Any]:
        """The model keys set explicitly (non-null), to pass to ``TxFMConfig.preset(name, n_genes, **overrides)``."""
        names = ("dim", "depth", "heads", "decoder_depth", "decoder_dim", "activation", "drop_path")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON-serialisable dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes: Any) -> "TrainConfig":
        """A copy with ``changes`` coerced and applied (same rules as overrides)."""
        return build_config(self.to_dict() | changes)


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def _field_types() -> dict[str, Any]:
    """Resolved annotations of TrainConfig (the module uses postponed annotations)."""
    return typing.get_type_hints(TrainConfig)


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Convert ``value`` (a YAML scalar/list or an override's string) to the field's type, or raise ValueError."""
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "~", "")):
            if type(None) in args:
                return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(key, value, option)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(errors[0] if len(errors) == 1 else f"{key}: cannot interpret {value!r} "
                         f"as {' or '.join(_type_name(a) for a in args)}")
    if origin is tuple:
        items = value
        if isinstance(value, str):
            items = [p for p in value.strip().strip("()[]").split(",") if p.strip()]
        if not isinstance(items, (list, tuple)) or len(items) != len(args):
            raise ValueError(f"{key}: expected {len(args)} comma-separated values, got {value!r}")
        return tuple(_coerce(key, item, a) for a, item in zip(args, items))
    if annotation is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "yes", "on", "1"):
            return True
        if text in ("false", "no", "off", "0"):
            return False
        raise ValueError(f"{key}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ValueError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            if isinstance(value, str):
                number = float(value)  # accepts "1e4"; must still be integral
                if not number.is_integer():
                    raise ValueError
                return int(number)
            if isinstance(value, int):
                return value
        except (ValueError, OverflowError):
            pass
        raise ValueError(f"{key}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, bool):
            raise ValueError(f"{key}: expected a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key}: expected a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ValueError(f"{key}: expected a finite number, got {value!r}")
        return number
    if annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError(f"{key}: expected a string, got {value!r}")
    raise TypeError(f"{key}: unsupported config type {annotation!r}")  # a programming error, not bad input


def _type_name(annotation: Any) -> str:
    if annotation is type(None):
        return "null"
    if typing.get_origin(annotation) is tuple:
        return ",".join(_type_name(a) for a in typing.get_args(annotation))
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(annotation))
    return getattr(annotation, "__name__", str(annotation))


def _check_keys(keys: typing.Iterable[str], where: str) -> None:
    known = set(_field_types())
    unknown = [k for k in keys if k not in known]
    if unknown:
        raise ValueError(f"{where}: unknown config key(s) {', '.join(sorted(unknown))} "
                         f"(see `txfm train --help` for the list)")


def build_config(values: dict[str, Any], where: str = "config") -> TrainConfig:
    """A validated TrainConfig from a dict of raw values (YAML scalars or strings); ``where`` names the source."""
    _check_keys(values, where)
    hints = _field_types()
    coerced = {}
    for key, value in values.items():
        try:
            coerced[key] = _coerce(key, value, hints[key])
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
    try:
        return TrainConfig(**coerced)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def parse_overrides(pairs: typing.Sequence[str]) -> dict[str, str]:
    """``["lr=3e-4", "betas=0.9,0.95"]`` → ``{"lr": "3e-4", "betas": "0.9,0.95"}`` (values coerced later)."""
    parsed: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ValueError(f"override {pair!r} is not of the form key=value")
        parsed[key] = value.strip()
    _check_keys(parsed, "overrides")
    return parsed


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping stored in a YAML config file (keys checked, values not yet coerced)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ValueError(f"{path}: cannot read config file ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a train config must be a mapping of key: value")
    _check_keys(data, str(path))
    return data


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = (),
                **explicit: Any) -> TrainConfig:
    """Defaults ← YAML file ``path`` ← ``key=value`` ``overrides`` ← non-None ``explicit`` keyword values."""
    values: dict[str, Any] = {}
    if path is not None:
        values.update(build_config(read_config_file(path), where=str(path)).to_dict())
    values.update(parse_overrides(overrides))
    values.update({k: v for k, v in explicit.items() if v is not None})
    return build_config(values, where="config")


def config_help() -> str:
    """One line per key: ``name  type  default  help`` — generated from the dataclass fields."""
    hints = _field_types()
    rows = []
    for f in dataclasses.fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if isinstance(default, tuple):
            default = ",".join(str(d) for d in default)
        rows.append((f.name, _type_name(hints[f.name]), "null" if default is None else str(default),
                     f.metadata.get("help", "")))
    width_name = max(len(r[0]) for r in rows)
    width_type = max(len(r[1]) for r in rows)
    width_default = max(len(r[2]) for r in rows)
    return "\n".join(f"  {n:<{width_name}}  {t:<{width_type}}  {d:<{width_default}}  {h}" for n, t, d, h in rows)


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write ``cfg`` as YAML, atomically (readable back with ``load_config(path)``)."""
    from curation.io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def resume_mismatches(saved: dict[str, Any], current: TrainConfig) -> list[str]:
    """Human-readable ``key: saved → current`` for RESUME_INVARIANT_KEYS that differ."""
    saved_cfg = build_config({k: v for k, v in saved.items() if k in _field_types()}, where="saved config")
    return [f"{k}: {getattr(saved_cfg, k)!r} -> {getattr(current, k)!r}" for k in RESUME_INVARIANT_KEYS
            if getattr(saved_cfg, k) != getattr(current, k)]
