# Parse-time setup shared by all the rule files. It validates the config, merges the source manifest with the config's
# `sources:`, and define the paths and helper functions the rules use. Nothing here touches the network —
# resolution of remote files happens inside the download rule (curation.sources).

import copy
import json
import os
import re
import sys
from pathlib import Path

import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

# Rules run `python -m curation|simulation|txfm.cli …` and workflow/scripts from this repository. With it first on
# PYTHONPATH they also work inside the per-rule conda envs (workflow/envs/, --software-deployment-method conda),
# where the project itself is not installed, and always run the code of this checkout.
REPO = os.path.abspath(os.path.join(workflow.basedir, ".."))
shell.prefix(f'set -euo pipefail; export PYTHONPATH="{REPO}${{{{PYTHONPATH:+:$PYTHONPATH}}}}"; ')  # braces doubled twice: f-string, then Snakemake formats the prefix
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from curation.config import load_config as load_curation_config
from curation.io import CurationError, atomic_path
from curation.sources import check_fetch_spec, curation_entry, load_manifest

if not config:
    raise WorkflowError("no config: pass --configfile config/config.yaml (the real build) or config/demo.yaml "
                        "(the offline demo)")
validate(config, "../schemas/config.schema.yaml")

RESULTS = config["results_dir"]
RAW = config.get("raw_dir") or f"{RESULTS}/raw"
WORK = config.get("work_dir") or f"{RESULTS}/work"
CORPUS = config.get("corpus_dir") or f"{RESULTS}/corpus"
LOGS = f"{RESULTS}/logs"
BENCH = f"{RESULTS}/benchmarks"
PREBUILT = config["prebuilt_corpus"]
SIMULATED = config["simulate"]["out"] if "simulate" in config else None
QUIET = "" if config["progress"] else "--quiet"
TRAIN = config["train"]
TRAIN_DIR = f"{RESULTS}/train/{TRAIN['run_name']}"


def _deep_merge(base, override):
    """``override`` merged into a copy of ``base`` (nested dicts merge, other values replace)."""
    merged = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _fill_placeholders(value):
    """Replace ``{simulated}`` in every string of a spec (fetch, evaluation args) with the simulated sources' path."""
    if isinstance(value, dict):
        return {k: _fill_placeholders(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill_placeholders(v) for v in value]
    if isinstance(value, str) and "{simulated}" in value:
        if SIMULATED is None:
            raise WorkflowError(f"fetch spec uses {{simulated}} but the config has no simulate: section ({value})")
        return value.replace("{simulated}", os.path.abspath(SIMULATED))
    return value


def _load_sources():
    """name -> merged source entry (manifest entry + config override), for the sources the config selects."""
    try:
        manifest = load_manifest(config["manifest"]) if config["manifest"] else {"sources": {}}
    except CurationError as exc:
        raise WorkflowError(str(exc)) from None
    known = manifest["sources"]
    merged = {}
    for name, override in config["sources"].items():
        if name not in known and not (override or {}).get("fetch"):
            raise WorkflowError(f"config sources.{name}: not in the manifest {config['manifest']} and no fetch: given "
                                f"(manifest sources: {', '.join(sorted(known))})")
        merged[name] = _fill_placeholders(_deep_merge(known.get(name, {}), override))
        try:
            check_fetch_spec(merged[name]["fetch"], f"sources.{name}.fetch")
        except CurationError as exc:
            raise WorkflowError(str(exc)) from None
    return manifest, merged


MANIFEST, SOURCES = _load_sources()
DATASETS = list(SOURCES)


def curation_config(names):
    """The curation config (docs/ARCHITECTURE.md) over datasets ``names``; directories are relative to the
    generated config file's directory (``<work>/configs``), so the tree can move without changing it."""
    base = os.path.join(WORK, "configs")
    return {
        "raw_dir": os.path.relpath(RAW, base),
        "work_dir": os.path.relpath(WORK, base),
        "corpus_dir": os.path.relpath(CORPUS, base),
        "seed": config["seed"],
        "chunk_size": config["chunk_size"],
        "datasets": {name: curation_entry(name, SOURCES[name]) for name in names},
    }


# A wrong dataset entry (unknown format, bad qc key…) fails here, while parsing, with a one-line message.
try:
    load_curation_config(curation_config(DATASETS))
except CurationError as exc:
    raise WorkflowError(f"config: {exc}") from None

PHENOPRINT_DATASETS = [n for n in DATASETS if (SOURCES[n].get("phenoprint") or {}).get("enabled")]


def write_yaml(data, path, log_path=None):
    """Write ``data`` as YAML to ``path`` atomically (and say so in ``log_path``)."""
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    if log_path:
        Path(log_path).write_text(f"wrote {path}\n", encoding="utf-8")


def _screens():
    """Evaluation screens: name -> {fetch_name, file, perturbation_column, batch_column, control_label, …}."""
    screens = {}
    catalogue = MANIFEST.get("evaluation_screens") or {}
    for name, settings in config["evaluate"]["screens"].items():
        if "source" in settings:
            if settings["source"] not in SOURCES:
                raise WorkflowError(f"config evaluate.screens.{name}.source: {settings['source']!r} is not a "
                                    "configured source")
            base = {"fetch_name": settings["source"]}
        elif "fetch" in settings:  # a screen outside the corpus with its own fetch spec (the demo's held-out screen)
            base = {"fetch_name": name}
            try:
                check_fetch_spec(_fill_placeholders(settings["fetch"]), f"evaluate.screens.{name}.fetch")
            except CurationError as exc:
                raise WorkflowError(str(exc)) from None
        elif name in catalogue:
            base = {k: v for k, v in catalogue[name].items() if k not in ("facts", "citation")}
            base["fetch_name"] = name
        else:
            raise WorkflowError(f"config evaluate.screens.{name}: not in the manifest's evaluation_screens and no "
                                "source: or fetch: given")
        screen = _deep_merge(base, settings)
        missing = [k for k in ("file", "perturbation_column", "batch_column", "control_label") if k not in screen]
        if missing:
            raise WorkflowError(f"config evaluate.screens.{name}: missing {', '.join(missing)}")
        screens[name] = screen
    return screens


SCREENS = _screens()
#: Everything fetch_source can download (corpus sources plus manifest-only evaluation screens).
#: With a prebuilt corpus only the sources that serve as evaluation screens are fetched.
_SCREEN_SOURCES = {s["fetch_name"] for s in SCREENS.values() if "fetch" not in s}
FETCH = {name: entry["fetch"] for name, entry in SOURCES.items() if not PREBUILT or name in _SCREEN_SOURCES}
FETCH.update({s["fetch_name"]: _fill_placeholders(s["fetch"]) for s in SCREENS.values() if "fetch" in s})


def _evaluate_available():
    import importlib.util

    return importlib.util.find_spec("txfm.evaluate") is not None


EVALUATE = config["evaluate"]["enabled"] and TRAIN["enabled"] and bool(SCREENS) and _evaluate_available()


# ------------------------------------------------------------------ helpers of the rule files


def train_resources():
    """Resources of the training job; on SLURM `gpu`/`gpu_model` become --gpus (executor-plugin-slurm)."""
    resources = {"mem_mb": TRAIN["mem_mb"], "runtime": TRAIN["runtime"]}
    if TRAIN["gpus"] > 0:
        resources["gpu"] = TRAIN["gpus"]
        if TRAIN["gpu_model"]:
            resources["gpu_model"] = TRAIN["gpu_model"]
    return resources


def screen_args(screen):
    """The `txfm evaluate` options of one screen, as a shell-quoted string."""
    import shlex

    s = SCREENS[screen]
    args = ["--input", f"{RAW}/{s['fetch_name']}/{s['file']}", "--perturbation-column", s["perturbation_column"],
            "--batch-column", s["batch_column"], "--control-label", s["control_label"]]
    if s.get("label_column"):
        args += ["--label-column", s["label_column"]]
    for key, value in _fill_placeholders(s.get("args") or {}).items():
        if value is True:
            args.append(f"--{key}")
        elif value is not False:
            args += [f"--{key}", str(value)]
    return " ".join(shlex.quote(a) for a in args)


def report_targets():
    """The HTML tables of whatever this config builds."""
    targets = [] if PREBUILT else [f"{RESULTS}/report/table1.html"]
    if TRAIN["enabled"]:
        targets.append(f"{RESULTS}/report/training.html")
    if EVALUATE:
        targets.append(f"{RESULTS}/report/evaluation.html")
    return targets


def final_targets():
    """What `all` builds: the corpus (unless prebuilt), the trained model, its evaluation, the report tables."""
    targets = [] if PREBUILT else [f"{CORPUS}/manifest.json"]
    if TRAIN["enabled"]:
        targets.append(f"{TRAIN_DIR}/train_result.json")
    if EVALUATE:
        targets += [f"{RESULTS}/evaluate/{screen}/results.csv" for screen in SCREENS]
    return targets + report_targets()


def train_overrides():
    """``key=value`` words of the training overrides (YAML spelling of booleans / nulls), shell-quoted."""
    import shlex

    words = []
    for key, value in TRAIN["overrides"].items():
        text = json.dumps(value) if isinstance(value, bool) or value is None else str(value)
        words.append(shlex.quote(f"{key}={text}"))
    return " ".join(words)
