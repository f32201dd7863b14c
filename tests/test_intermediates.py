"""curation.intermediates owns the curated layout and the one panel check every later step applies."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation import corpus, intermediates
from curation.dedup import load_curated
from curation.io import CurationError
from curation.phenoprint import run_phenoprint
from curation.schema import SAMPLE_SCHEMA, content_hash

BAD_PANELS = [
    ([], "'panel' is empty"),
    ([3, 1], "must be sorted and unique"),
    ([2, 2], "must be sorted and unique"),
    ([-1, 4], "outside the reference gene table"),
    ([0.5, 2.0], "integer reference gene indices"),
    ([[1, 2]], "flat list"),
]


def _write(work: Path, panel: list) -> intermediates.CuratedPaths:
    paths = intermediates.curated_paths(work, "ds")
    paths.directory.mkdir(parents=True)
    idx, counts = np.array([1], np.int32), np.array([2.0], np.float32)
    row = {"sample_id": "ds:a", "dataset": "ds", "batch": "b", "split": "", "modality": "single_cell",
           "perturbation": "ctrl", "cell_type": None, "tissue": None, "source_accession": "ds:a",
           "gene_idx": idx.tolist(), "counts": counts.tolist(), "library_size": 2.0, "n_genes_detected": 1,
           "content_hash": content_hash(idx, counts)}
    pq.write_table(pa.Table.from_pylist([row], schema=SAMPLE_SCHEMA), paths.samples)
    paths.report.write_text(json.dumps({"panel": panel}))
    return paths


def test_layout_is_the_documented_one(tmp_path):
    paths = intermediates.curated_paths(tmp_path, "x")
    assert paths.samples == tmp_path / "curated" / "x" / "samples.parquet"
    assert paths.report == tmp_path / "curated" / "x" / "report.json"
    assert paths.phenoprint == tmp_path / "curated" / "x" / "phenoprint.parquet"
    assert intermediates.dedup_dir(tmp_path) / intermediates.DEDUP_REMOVED_FILE == tmp_path / "dedup" / "removed.parquet"


@pytest.mark.parametrize("panel,message", BAD_PANELS)
def test_every_step_refuses_the_same_bad_panels(tmp_path, panel, message):
    """dedup, phenoprint and build-corpus all apply check_panel (dedup used to accept an empty panel)."""
    paths = _write(tmp_path, panel)
    with pytest.raises(CurationError, match=message):
        load_curated("ds", paths.directory)
    with pytest.raises(CurationError, match=message):
        run_phenoprint("ds", {"control_label": "ctrl", "phenoprint": {"enabled": True}}, tmp_path, progress=False)
    intermediates.dedup_dir(tmp_path).mkdir()
    pq.write_table(pa.table({"sample_id": pa.array([], pa.string()), "dataset": pa.array([], pa.string()),
                             "reason": pa.array([], pa.string())}),
                   intermediates.dedup_dir(tmp_path) / intermediates.DEDUP_REMOVED_FILE)
    with pytest.raises(CurationError, match=message):
        corpus._load_inputs({"datasets": {"ds": {}}}, tmp_path, n_reference=10)


def test_a_good_panel_loads_the_same_everywhere(tmp_path):
    paths = _write(tmp_path, [1, 4, 7])
    assert load_curated("ds", paths.directory).panel.tolist() == [1, 4, 7]
    assert intermediates.load_panel(paths.report, n_reference=8).tolist() == [1, 4, 7]
    with pytest.raises(CurationError, match=r"report\.json: 'panel' has indices outside .*\[0, 7\)"):
        intermediates.load_panel(paths.report, n_reference=7)
