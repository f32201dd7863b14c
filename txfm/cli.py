"""The ``txfm`` command: ``train``, ``embed``, ``export-gene-weights`` and ``evaluate``.

Every subcommand's ``func(args) -> int`` returns the exit status; bad input (ValueError, which includes
CurationError) and a diverged run (NonFiniteLossError) end with a one-line ``txfm: error: …`` and status 1.
Multi-GPU training: ``torchrun --nproc_per_node N -m txfm.cli train …``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from txfm import __version__


def _run_train(args: argparse.Namespace) -> int:
    """``txfm train``: build the TrainConfig (defaults ← --config ← key=value ← flags) and train."""
    from txfm.config import load_config, read_config_file
    from txfm.train import RUN_CONFIG_FILE, train

    config_path = args.config
    # `txfm train --out RUN --resume` alone continues a run with the settings it was started with.
    saved = Path(args.out) / RUN_CONFIG_FILE if args.out else None
    if args.resume and config_path is None and saved is not None and saved.is_file():
        config_path = saved
        read_config_file(saved)  # fail early, naming the file, if it was edited into something invalid
    cfg = load_config(config_path, args.overrides, corpus=args.corpus, out=args.out, preset=args.preset)
    if cfg.corpus is None or cfg.out is None:
        raise ValueError("train: --corpus and --out are required (or corpus:/out: in the --config file)")
    result = train(cfg, resume=args.resume, stop_at_step=args.stop_at)
    if result.val_loss is not None:
        print(f"step {result.step}/{result.total_steps}: val loss {result.val_loss:.5g} "
              f"(predict-the-mean baseline {result.baseline_val_loss:.5g}); checkpoint {result.checkpoint}")
    else:
        print(f"step {result.step}/{result.total_steps}: checkpoint {result.checkpoint}")
    return 0


def _add_train(subparsers: argparse._SubParsersAction) -> None:
    from txfm.config import PRESET_NAMES, config_help

    parser = subparsers.add_parser(
        "train", help="train TxFM on a corpus", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train TxFM on a DiverseRNA corpus. Settings: defaults <- --config YAML <- key=value "
                    "overrides <- --corpus/--out/--preset.",
        epilog="configuration keys (key  type  default  description), set in --config YAML or as key=value:\n"
               + config_help())
    parser.add_argument("--corpus", default=None, help="corpus directory")
    parser.add_argument("--out", default=None, help="run directory (metrics, checkpoints)")
    parser.add_argument("--config", default=None, type=Path, help="YAML file of configuration keys")
    parser.add_argument("--preset", default=None, choices=PRESET_NAMES, help="model size preset")
    parser.add_argument("--resume", action="store_true", help="continue from <out>/checkpoints/last exactly")
    parser.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                        help="stop after this step (checkpointed); continue later with --resume")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="configuration overrides, e.g. lr=3e-4")
    parser.set_defaults(func=_run_train)


def build_parser() -> argparse.ArgumentParser:
    """The ``txfm`` argument parser with every available subcommand."""
    from txfm import embed, evaluate, export

    parser = argparse.ArgumentParser(prog="txfm", description="TxFM: train, embed with and evaluate the "
                                                             "transcriptomics foundation model.")
    parser.add_argument("--version", action="version", version=f"txfm {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(subparsers)
    embed.register(subparsers)
    export.register(subparsers)
    evaluate.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``txfm`` console script; returns the exit status."""
    from txfm.train import NonFiniteLossError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, NonFiniteLossError) as exc:
        message = "; ".join(line for line in str(exc).splitlines() if line.strip())  # always one line
        print(f"txfm: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
