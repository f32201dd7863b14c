"""``python -m simulation``: write simulated raw sources, or run the offline curation demo on them."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

from curation.io import CurationError, limit_heap_fragmentation, one_line


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; a ``CurationError`` prints ``error: <file>: <what>`` and exits with status 2."""
    parser = argparse.ArgumentParser(prog="python -m simulation",
                                     description="Simulated RNA-seq sources in every real input format.")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or info messages")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    sub = commands.add_parser("sources", help="write small simulated raw sources (+ datasets.yaml, truth.json)")
    sub.add_argument("--out", type=Path, required=True, help="directory for the raw files")
    sub.set_defaults(run=_sources)
    sub = commands.add_parser("demo", help="offline end to end: simulate, curate, phenoprint, dedup, build, validate")
    sub.add_argument("--out", type=Path, required=True, help="demo directory (raw/, work/, corpus/)")
    sub.set_defaults(run=_demo)
    for sub in commands.choices.values():
        sub.add_argument("--seed", type=int, default=0, help="random seed (same seed and scale: identical files)")
        sub.add_argument("--scale", type=float, default=1.0, help="size multiplier of the simulated studies")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    limit_heap_fragmentation()
    try:
        return args.run(args)
    except CurationError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2


def _sources(args: argparse.Namespace) -> int:
    from simulation.sources import simulate_sources

    simulate_sources(args.out, seed=args.seed, scale=args.scale, progress=not args.quiet)
    print(f"simulated sources in {args.out}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from curation.datacard import table1_markdown
    from simulation.demo import run_demo

    manifest = run_demo(args.out, seed=args.seed, scale=args.scale, progress=not args.quiet)
    print(table1_markdown(manifest["datasets"], manifest["n_genes"]))
    print(f"corpus: {args.out / 'corpus'} (valid; see DATACARD.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
