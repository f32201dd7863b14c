"""``python -m curation``: the command line that the Snakemake rules (and people) call.

Every subcommand is a thin wrapper over one library function. Bad input (a ``CurationError``) prints one
line ``error: <file>: <what is wrong>`` on stderr and exits with status 2; ``validate`` exits 1 when the
corpus has problems.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from curation.io import CurationError, limit_heap_fragmentation, one_line

log = logging.getLogger("curation")


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    limit_heap_fragmentation()  # streaming steps: keep peak memory independent of the number of chunks
    try:
        return args.run(args)
    except CurationError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m curation",
                                     description="Curate public RNA-seq into the DiverseRNA corpus.")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or info messages")
    # SUPPRESS: a subcommand's own --quiet must not reset a --quiet given before the subcommand.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    def command(name: str, run: Callable[[argparse.Namespace], int], help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, parents=[common], help=help_text, description=help_text)
        sub.set_defaults(run=run)
        return sub

    sub = command("curate", _curate, "QC and gene-harmonise one dataset into <work>/curated/<name>/")
    _config_args(sub, dataset=True)
    sub = command("phenoprint", _phenoprint, "prune perturbed cells without a phenotype in one dataset")
    _config_args(sub, dataset=True)
    sub = command("dedup", _dedup, "find duplicate samples across all curated datasets")
    _config_args(sub)
    sub = command("build-corpus", _build_corpus, "write the Parquet corpus from the curated datasets")
    _config_args(sub)
    sub.add_argument("--out", type=Path, help="corpus directory (default: the config's corpus_dir)")

    sub = command("validate", _validate, "check a built corpus (schema, genes, splits, checksums)")
    sub.add_argument("corpus", type=Path, metavar="CORPUS")
    sub = command("datacard", _datacard, "re-render DATACARD.md and its plot from a corpus's manifest")
    sub.add_argument("corpus", type=Path, metavar="CORPUS")

    return parser


def _config_args(sub: argparse.ArgumentParser, dataset: bool = False) -> None:
    sub.add_argument("--config", type=Path, required=True, help="curation config YAML")
    if dataset:
        sub.add_argument("--dataset", required=True, help="dataset name (a key of datasets:)")


def _progress(args: argparse.Namespace) -> bool:
    return not args.quiet


# ------------------------------------------------------------------------------------------ commands


def _curate(args: argparse.Namespace) -> int:
    from curation.config import load_config

    report = curate_one(load_config(args.config), args.dataset, progress=_progress(args))
    print(f"{args.dataset}: {report.get('n_samples')} of {report.get('n_input')} samples kept, "
          f"{len(report['panel'])} genes in the panel")
    return 0


def _phenoprint(args: argparse.Namespace) -> int:
    from curation.config import load_config

    config = load_config(args.config)
    phenoprint_one(config, args.dataset, progress=_progress(args))
    print(f"{args.dataset}: phenoprint done")
    return 0


def _dedup(args: argparse.Namespace) -> int:
    from curation.config import load_config

    report = dedup_all(load_config(args.config), progress=_progress(args))
    print(f"dedup: {report.get('n_removed')} samples removed {report.get('n_removed_by_reason', '')}")
    return 0


def _build_corpus(args: argparse.Namespace) -> int:
    from curation.config import load_config
    from curation.corpus import build_corpus

    manifest = build_corpus(load_config(args.config), out_dir=args.out, progress=_progress(args))
    print(f"corpus: {manifest['n_samples']} samples, {manifest['n_genes']} genes, {len(manifest['shards'])} shards")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from curation.corpus import validate_corpus

    problems = validate_corpus(args.corpus)
    for problem in problems:
        print(problem, file=sys.stderr)
    print(f"{args.corpus}: {'INVALID, ' + str(len(problems)) + ' problem(s)' if problems else 'valid'}")
    return 1 if problems else 0


def _datacard(args: argparse.Namespace) -> int:
    from curation import schema
    from curation.datacard import write_datacard

    manifest_path = args.corpus / schema.MANIFEST_FILE
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CurationError(manifest_path, f"unreadable ({exc})") from None
    write_datacard(args.corpus, manifest["datasets"])
    print(f"wrote {args.corpus / schema.DATACARD_FILE}")
    return 0


# ------------------------------------------------------------------------------------------ library steps


def curate_one(config: dict, name: str, progress: bool = True, gene_table: Any | None = None) -> dict:
    """Curate one configured dataset into ``<work_dir>/curated/<name>/``; returns its report."""
    from curation.config import dataset_spec
    from curation.curate import curate_dataset

    spec = dataset_spec(config, name)
    return curate_dataset(name, spec, Path(config["work_dir"]), gene_table=gene_table,
                          chunk_size=spec["chunk_size"], progress=progress)


def phenoprint_one(config: dict, name: str, progress: bool = True) -> Any:
    """Run phenotypic pruning on one curated dataset (``<work_dir>/curated/<name>/phenoprint.parquet``)."""
    from curation.config import dataset_spec
    from curation.phenoprint import run_phenoprint

    spec = dataset_spec(config, name)
    return run_phenoprint(name, spec, Path(config["work_dir"]), spec["seed"], progress=progress)


def dedup_all(config: dict, progress: bool = True) -> dict:
    """Deduplicate across every curated dataset (``<work_dir>/dedup/``); returns the dedup report."""
    from curation.dedup import run_dedup

    return run_dedup(Path(config["work_dir"]), {**config, "progress": progress})
