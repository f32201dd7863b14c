"""Offline curation demo: simulate every source format, then run each curation step and validate the corpus."""

from __future__ import annotations

import logging
from pathlib import Path

import yaml

from curation.io import CurationError, atomic_path, one_line
from simulation.sources import simulate_sources

log = logging.getLogger("simulation")


def write_demo_config(demo_dir: Path, datasets: dict, seed: int) -> Path:
    """``<demo>/config.yaml`` over the simulated sources in ``<demo>/raw``; returns its path."""
    config = {"raw_dir": "raw", "work_dir": "work", "corpus_dir": "corpus", "seed": seed, "datasets": datasets}
    path = demo_dir / "config.yaml"
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def run_demo(demo_dir: Path, seed: int = 0, scale: float = 1.0, progress: bool = True) -> dict:
    """Simulate sources into ``<demo>/raw`` and run every curation step; returns the corpus manifest.

    Raises ``CurationError`` if the built corpus fails validation.
    """
    from curation.cli import curate_one, dedup_all, phenoprint_one
    from curation.config import load_config
    from curation.corpus import build_corpus, validate_corpus
    from curation.genes import GeneTable

    demo_dir = Path(demo_dir)
    raw_dir = demo_dir / "raw"
    log.info("demo: simulating sources into %s", raw_dir)
    simulate_sources(raw_dir, seed=seed, scale=scale, progress=progress)
    datasets_file = raw_dir / "datasets.yaml"
    try:
        datasets = yaml.safe_load(datasets_file.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise CurationError(datasets_file, f"unreadable ({one_line(exc)})") from None
    if isinstance(datasets, dict) and "datasets" in datasets:
        datasets = datasets["datasets"]
    config = load_config(write_demo_config(demo_dir, datasets, seed))

    gene_table = GeneTable.load()
    for name in config["datasets"]:
        log.info("demo: curating %s", name)
        curate_one(config, name, progress=progress, gene_table=gene_table)
    for name, spec in config["datasets"].items():
        if spec["phenoprint"]["enabled"]:
            log.info("demo: phenoprint %s", name)
            phenoprint_one(config, name, progress=progress)
    log.info("demo: dedup")
    dedup_all(config, progress=progress)
    log.info("demo: building the corpus")
    manifest = build_corpus(config, progress=progress, gene_table=gene_table)
    problems = validate_corpus(Path(config["corpus_dir"]))
    if problems:
        raise CurationError(config["corpus_dir"], f"{len(problems)} validation problem(s), first: {problems[0]}")
    return manifest
