"""``python -m curation``: help, one-line errors with exit status 2, build-corpus / validate / datacard."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from curation import schema
from curation.cli import build_parser, main
from curation.config import config_digest, dataset_spec, load_config
from curation.io import CurationError
from test_corpus import write_intermediates

SUBCOMMANDS = ("curate", "phenoprint", "dedup", "build-corpus", "validate", "datacard")
REPO = Path(__file__).resolve().parents[1]


def run_module(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "curation", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=120)


def test_help_lists_every_subcommand_with_a_one_line_help():
    result = run_module("--help")
    assert result.returncode == 0
    for name in SUBCOMMANDS:
        assert name in result.stdout
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {action.dest: action.help for action in subparsers._choices_actions}
    assert set(helps) == set(SUBCOMMANDS)
    assert all(text and "\n" not in text for text in helps.values())


def test_bad_config_gives_one_line_error_and_exit_2(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"datasets": {"foo": {"modality": "sc", "format": "h5ad",
                                                           "files": {"matrix": "x.h5ad"}}}}))
    result = run_module("build-corpus", "--config", str(config))
    assert result.returncode == 2
    assert result.stderr == (f"error: {config}: datasets.foo.modality: 'sc' is not one of "
                             "['single_cell', 'bulk']\n")
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.parametrize("argv, message", [
    (["dedup", "--config", "{missing}"], "config file not found"),
    (["curate", "--config", "{config}", "--dataset", "nope"], "no dataset 'nope'"),
    (["build-corpus", "--config", "{broken}"], "not valid YAML"),
    (["datacard", "{tmp}"], "manifest.json: unreadable"),
])
def test_errors_are_one_line_with_exit_2(tmp_path, capsys, argv, message):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(
        {"datasets": {"foo": {"modality": "bulk", "format": "gct", "files": {"matrix": "x.gct"}}}}))
    (tmp_path / "broken.yaml").write_text("datasets: [unclosed\n")
    paths = {"missing": tmp_path / "missing.yaml", "config": tmp_path / "config.yaml",
             "broken": tmp_path / "broken.yaml", "tmp": tmp_path}
    assert main([arg.format(**paths) for arg in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_build_validate_and_datacard_commands(tmp_path, capsys):
    config, _ = write_intermediates(tmp_path)
    config_path = str(tmp_path / "config.yaml")
    corpus = Path(config["corpus_dir"])
    assert main(["--quiet", "build-corpus", "--config", config_path]) == 0
    assert "corpus: 36 samples" in capsys.readouterr().out
    assert main(["validate", str(corpus), "--quiet"]) == 0

    card = (corpus / schema.DATACARD_FILE).read_text()
    (corpus / schema.DATACARD_FILE).unlink()
    assert main(["datacard", str(corpus)]) == 0
    assert (corpus / schema.DATACARD_FILE).read_text() == card

    manifest = json.loads((corpus / schema.MANIFEST_FILE).read_text())
    (corpus / manifest["shards"][0]["path"]).unlink()
    capsys.readouterr()
    assert main(["validate", str(corpus)]) == 1
    captured = capsys.readouterr()
    assert "INVALID" in captured.out and "listed in the manifest but missing" in captured.err

    other = tmp_path / "elsewhere"
    assert main(["--quiet", "build-corpus", "--config", config_path, "--out", str(other)]) == 0
    assert json.loads((other / schema.MANIFEST_FILE).read_text()) == manifest


# ------------------------------------------------------------------------------------------ config loading

def write_config(directory: Path, config: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


MINIMAL = {"raw_dir": "../raw", "datasets": {
    "cells": {"modality": "single_cell", "format": "10x_mtx", "files": {"matrix": "c/matrix.mtx.gz",
                                                                        "barcodes": ["c/a.tsv", "/abs/b.tsv"]},
              "metadata": {"file": "c/meta.csv", "key": "barcode"}, "phenoprint": {"enabled": True}},
    "tissue": {"modality": "bulk", "format": "gct", "files": {"matrix": "t.gct"},
               "reader": {"sample_sheet": "t_samples.tsv", "skip": 2}, "qc": {"min_library_size": 1e5},
               "columns": {"batch": "SMCENTER"}},
}}


def test_config_fills_defaults_by_modality_and_resolves_paths(tmp_path):
    config = load_config(write_config(tmp_path / "conf", MINIMAL))
    raw = tmp_path / "raw"
    assert config["raw_dir"] == str(raw)
    assert config["work_dir"] == str(tmp_path / "conf" / "work")
    cells, tissue = dataset_spec(config, "cells"), dataset_spec(config, "tissue")
    assert cells["qc"] == {"min_cells_per_gene": 1000, "min_genes_per_cell": 2000, "min_library_size": 0}
    assert tissue["qc"] == {"min_cells_per_gene": 0, "min_genes_per_cell": 0, "min_library_size": 1e5}
    assert cells["files"] == {"matrix": str(raw / "c/matrix.mtx.gz"), "barcodes": [str(raw / "c/a.tsv"), "/abs/b.tsv"]}
    assert cells["metadata"]["file"] == str(raw / "c/meta.csv")
    assert tissue["reader"] == {"sample_sheet": str(raw / "t_samples.tsv"), "skip": 2}
    assert tissue["columns"] == {"batch": "SMCENTER", "perturbation": None, "cell_type": None, "tissue": None,
                                 "source_accession": None}
    assert cells["phenoprint"] == {"enabled": True, "p_threshold": 0.1, "n_null": 1000, "n_components": 50}
    assert tissue["phenoprint"]["enabled"] is False
    for spec in (cells, tissue):
        assert (spec["val_fraction"], spec["priority"], spec["chunk_size"], spec["seed"]) == (0.1, 100, 10000, 0)
        assert (spec["control_label"], spec["allow_normalised"]) == (None, False)


def test_config_overrides_merge_and_digest_ignores_location(tmp_path):
    base = load_config(write_config(tmp_path / "a" / "conf", MINIMAL))
    moved = load_config(write_config(tmp_path / "b" / "conf", MINIMAL))
    assert config_digest(base) == config_digest(moved)
    tuned = load_config(tmp_path / "a" / "conf" / "config.yaml",
                        overrides={"seed": 3, "datasets": {"cells": {"qc": {"min_genes_per_cell": 500}}}})
    assert tuned["datasets"]["cells"]["qc"]["min_genes_per_cell"] == 500
    assert tuned["datasets"]["cells"]["qc"]["min_cells_per_gene"] == 1000
    assert tuned["datasets"]["cells"]["seed"] == 3
    assert config_digest(tuned) != config_digest(base)
    assert load_config(MINIMAL)["raw_dir"] == str((Path.cwd() / "../raw").resolve())


@pytest.mark.parametrize("change, message", [
    ({"modality": "sc"}, "datasets.cells.modality: 'sc' is not one of ['single_cell', 'bulk']"),
    ({"format": "xlsx"}, "datasets.cells.format: 'xlsx' is not one of"),
    ({"qc": {"min_genes": 5}}, "datasets.cells.qc: Additional properties are not allowed ('min_genes' was"),
    ({"val_fraction": 1.5}, "datasets.cells.val_fraction: 1.5 is greater than or equal to the maximum of 1"),
    ({"colums": {}}, "datasets.cells: Additional properties are not allowed ('colums' was unexpected)"),
    ({"files": {"matrix": 3}}, "datasets.cells.files.matrix: 3 is not valid under any of the given schemas"),
])
def test_config_schema_errors_name_the_key(tmp_path, change, message):
    bad = json.loads(json.dumps(MINIMAL))
    bad["datasets"]["cells"].update(change)
    path = write_config(tmp_path, bad)
    with pytest.raises(CurationError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: {message}")
    assert "\n" not in str(err.value)


def test_config_rejects_bad_dataset_names_and_missing_keys(tmp_path):
    with pytest.raises(CurationError, match="datasets: 'bad name' does not match"):
        load_config({"datasets": {"bad name": MINIMAL["datasets"]["tissue"]}})
    with pytest.raises(CurationError, match="datasets.x: 'files' is a required property"):
        load_config({"datasets": {"x": {"modality": "bulk", "format": "gct"}}})
    with pytest.raises(CurationError, match="no dataset 'zzz'"):
        dataset_spec(load_config(MINIMAL), "zzz")


def test_limit_heap_fragmentation_is_safe_to_call_repeatedly():
    from curation.io import limit_heap_fragmentation

    first = limit_heap_fragmentation()
    assert limit_heap_fragmentation() == first  # idempotent; True on glibc (Linux), False elsewhere
    import platform

    if platform.libc_ver()[0] == "glibc":
        assert first is True
