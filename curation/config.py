"""Load, validate and complete a curation config (the YAML described in docs/ARCHITECTURE.md).

``load_config`` returns a plain dict in which every dataset entry carries every key (defaults filled in by
modality), every input path is absolute (``files``, ``metadata.file`` and ``reader.sample_sheet`` resolve
against ``raw_dir``; ``raw_dir``, ``work_dir`` and ``corpus_dir`` resolve against the config file's
directory), and which has passed the JSON schema in ``curation/dataset.schema.yaml``. Downstream code can
therefore index keys directly instead of repeating defaults.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import jsonschema
import yaml

from curation.io import CurationError, one_line

DATASET_SCHEMA_FILE = Path(__file__).with_name("dataset.schema.yaml")

#: Dataset names become hive partition values (``dataset=<name>``) and sample-id prefixes.
DATASET_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"

#: QC thresholds by modality (single-cell numbers from the paper's curation section).
QC_DEFAULTS: dict[str, dict[str, float]] = {
    "single_cell": {"min_cells_per_gene": 1000, "min_genes_per_cell": 2000, "min_library_size": 0},
    "bulk": {"min_cells_per_gene": 0, "min_genes_per_cell": 0, "min_library_size": 0},
}
PHENOPRINT_DEFAULTS: dict[str, Any] = {"enabled": False, "p_threshold": 0.1, "n_null": 1000, "n_components": 50}
COLUMN_KEYS = ("batch", "perturbation", "cell_type", "tissue", "source_accession")
TOP_LEVEL_DEFAULTS: dict[str, Any] = {"raw_dir": "raw", "work_dir": "work", "corpus_dir": "corpus", "seed": 0,
                                      "chunk_size": 10000}
DATASET_DEFAULTS: dict[str, Any] = {"reader": {}, "metadata": None, "control_label": None,
                                    "allow_normalised": False, "val_fraction": 0.1, "priority": 100,
                                    "source": None, "licence": None}


@lru_cache(maxsize=1)
def dataset_schema() -> dict:
    """The JSON schema of one ``datasets:`` entry (package data ``curation/dataset.schema.yaml``)."""
    with open(DATASET_SCHEMA_FILE, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def config_schema() -> dict:
    """JSON schema of the curation part of a config; unknown top-level keys (workflow sections) are allowed."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "required": ["datasets"],
        "properties": {
            "raw_dir": {"type": "string", "minLength": 1},
            "work_dir": {"type": "string", "minLength": 1},
            "corpus_dir": {"type": "string", "minLength": 1},
            "seed": {"type": "integer", "minimum": 0},
            "chunk_size": {"type": "integer", "minimum": 1},
            "datasets": {
                "type": "object",
                "minProperties": 1,
                "propertyNames": {"pattern": DATASET_NAME_PATTERN},
                "additionalProperties": dataset_schema(),
            },
        },
    }


def load_config(path_or_dict: str | os.PathLike | Mapping[str, Any],
                overrides: Mapping[str, Any] | None = None) -> dict:
    """Read (if a path), merge ``overrides`` into, validate and complete a curation config.

    ``overrides`` is merged recursively (nested dicts merge, other values replace), e.g.
    ``{"work_dir": "/scratch/w", "datasets": {"foo": {"qc": {"min_genes_per_cell": 500}}}}``.
    A dict config has no file, so its relative directories resolve against the current directory.
    Raises ``CurationError`` with a one-line message such as
    ``config.yaml: datasets.foo.modality: 'sc' is not one of ['single_cell', 'bulk']``.
    """
    if isinstance(path_or_dict, Mapping):
        where, base_dir, raw = "config", Path.cwd(), copy.deepcopy(dict(path_or_dict))
    else:
        where, base_dir, raw = str(path_or_dict), Path(path_or_dict).resolve().parent, _read_yaml(path_or_dict)
    if overrides:
        raw = _deep_merge(raw, overrides)
    _validate(raw, config_schema(), where)

    config = {**TOP_LEVEL_DEFAULTS, **raw}
    for key in ("raw_dir", "work_dir", "corpus_dir"):
        config[key] = str(_resolve(config[key], base_dir))
    raw_dir = Path(config["raw_dir"])
    config["datasets"] = {name: _complete_entry(entry, config, raw_dir)
                          for name, entry in raw["datasets"].items()}
    return config


def dataset_spec(config: Mapping[str, Any], name: str) -> dict:
    """The completed entry of dataset ``name`` in a config returned by ``load_config``."""
    datasets = config.get("datasets", {})
    if name not in datasets:
        known = ", ".join(sorted(datasets)) or "none"
        raise CurationError(None, f"config: no dataset {name!r} (configured: {known})")
    return datasets[name]


def config_digest(config: Mapping[str, Any]) -> str:
    """sha256 of what in a config determines the corpus content: the seed and the dataset entries.

    Input paths are taken relative to ``raw_dir`` and output directories are left out, so the same
    sources curated in another directory give the same digest.
    """
    raw_dir = Path(config["raw_dir"])
    content = {"seed": config.get("seed"),
               "datasets": {name: _relative_inputs(spec, raw_dir) for name, spec in config["datasets"].items()}}
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _read_yaml(path: str | os.PathLike) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError:
        raise CurationError(path, "config file not found") from None
    except yaml.YAMLError as exc:
        problem = one_line(exc)
        raise CurationError(path, f"not valid YAML ({problem})") from None
    if not isinstance(data, dict):
        raise CurationError(path, "config must be a YAML mapping with a 'datasets' key")
    return data


def _validate(config: Mapping[str, Any], schema: dict, where: str) -> None:
    validator = jsonschema.Draft202012Validator(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(config))
    if error is not None:
        location = ".".join(str(part) for part in error.absolute_path)
        message = one_line(error.message)
        raise CurationError(where, f"{location}: {message}" if location else message)


def _deep_merge(base: dict, overrides: Mapping[str, Any]) -> dict:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _deep_merge(dict(merged[key]), value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _resolve(path: str, base_dir: Path) -> Path:
    expanded = Path(os.path.expanduser(path))
    return expanded if expanded.is_absolute() else (base_dir / expanded).resolve()


def _complete_entry(entry: Mapping[str, Any], config: Mapping[str, Any], raw_dir: Path) -> dict:
    """Fill every default into one validated dataset entry and make its input paths absolute."""
    spec = {**copy.deepcopy(DATASET_DEFAULTS), "chunk_size": config["chunk_size"], "seed": config["seed"]}
    spec.update(copy.deepcopy(dict(entry)))
    spec["columns"] = {key: None for key in COLUMN_KEYS} | dict(entry.get("columns") or {})
    spec["qc"] = QC_DEFAULTS[spec["modality"]] | dict(entry.get("qc") or {})
    spec["phenoprint"] = PHENOPRINT_DEFAULTS | dict(entry.get("phenoprint") or {})
    spec["files"] = {role: _map_paths(value, lambda path: str(_resolve(path, raw_dir)))
                     for role, value in entry["files"].items()}
    if spec["metadata"] is not None:
        spec["metadata"]["file"] = str(_resolve(spec["metadata"]["file"], raw_dir))
    if "sample_sheet" in spec["reader"]:
        spec["reader"]["sample_sheet"] = str(_resolve(spec["reader"]["sample_sheet"], raw_dir))
    return spec


def _map_paths(value: str | list[str], convert) -> str | list[str]:
    """Apply ``convert`` to a ``files`` value: one path or a list of paths."""
    return [convert(path) for path in value] if isinstance(value, list) else convert(value)


def _relative_inputs(spec: Mapping[str, Any], raw_dir: Path) -> dict:
    """A copy of a completed entry with its input paths relative to ``raw_dir`` (where possible)."""
    def rel(path: str) -> str:
        try:
            return Path(path).relative_to(raw_dir).as_posix()
        except ValueError:
            return path

    spec = copy.deepcopy(dict(spec))
    spec["files"] = {role: _map_paths(value, rel) for role, value in spec["files"].items()}
    if spec.get("metadata"):
        spec["metadata"]["file"] = rel(spec["metadata"]["file"])
    if "sample_sheet" in spec.get("reader", {}):
        spec["reader"]["sample_sheet"] = rel(spec["reader"]["sample_sheet"])
    return spec
