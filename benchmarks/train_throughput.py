"""Training-step throughput and MFU of TxFM, with one before/after row per speed switch.

    .venv/bin/python benchmarks/train_throughput.py                       # CPU: tiny and S at K=2048
    .venv/bin/python benchmarks/train_throughput.py --presets S B --micro-batch 64 32 --device cuda

Each row runs in a fresh child process (so its peak memory is its own and compile caches do not leak between
rows) and times the trainer's optimizer step exactly as ``txfm.train`` runs it — batch preparation on the
device (``prepare_batch``: sparse-target densification, attention fast path), forward under the trainer's
autocast, Poisson loss, backward, gradient clipping, AdamW step — on micro-batches read beforehand from a
synthetic corpus (the loader is benchmarked separately: loader_vs_step.py). The first ``--warmup`` steps are
not timed (allocator, compile); the median of the next ``--steps`` is reported.

MFU = model FLOPs per step (txfm.flops.train_step_flops: fwd+bwd = 3× forward, recomputation not counted) /
step time / peak, where peak is the dense matmul throughput measured in the same parent run
(txfm.flops.measure_peak_flops: fp32 on CPU, bf16 on CUDA). Peak memory: CUDA max allocated, or on CPU the
child's peak resident set size (interpreter and imports included).
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from txfm.data import CorpusInfo, LoaderConfig, make_loader  # noqa: E402
from txfm.flops import measure_peak_flops, train_step_flops  # noqa: E402
from simulation.corpus import write_synthetic_corpus  # noqa: E402

#: Switch → (value of the "before" row), compared against the trainer defaults ("after").
ABLATIONS_CPU = {"attention_fast_path": False, "sparse_target": False, "compile": True,
                 "activation_checkpointing": True, "precision": "bf16"}
ABLATIONS_CUDA = {"attention_fast_path": False, "sparse_target": False, "compile": True,
                  "activation_checkpointing": True, "precision": "fp32", "fused_adamw": False, "prefetch": False}
DEFAULTS = {"attention_fast_path": True, "sparse_target": True, "compile": False, "activation_checkpointing": False,
            "precision": "auto", "fused_adamw": True, "prefetch": True}


def run_row(spec: dict) -> dict:
    """Child process: time ``spec['steps']`` trainer steps of one configuration. → result dict"""
    from txfm.losses import expression_loss
    from txfm.model import TxFM, TxFMConfig, param_groups
    from txfm.train import CompileWithFallback, DevicePrefetcher, autocast_context, resolve_device

    if spec["threads"] > 0:
        torch.set_num_threads(spec["threads"])
    device = resolve_device(spec["device"])
    sw = spec["switches"]
    info = CorpusInfo.open(spec["corpus"])
    loader_cfg = LoaderConfig(micro_batch=spec["micro_batch"], n_input_genes=spec["k"], seed=0,
                              target_format="sparse" if sw["sparse_target"] else "dense")
    n_batches = spec["warmup"] + spec["steps"]
    host_batches = [b for _, b in zip(range(n_batches), make_loader(info, loader_cfg, [0], 1, 0))]
    if len(host_batches) < n_batches:
        raise SystemExit(f"corpus too small for {n_batches} micro-batches of {spec['micro_batch']}")
    torch.manual_seed(0)
    model_cfg = TxFMConfig.preset(spec["preset"], info.n_genes)
    model = TxFM(model_cfg).to(device).set_activation_checkpointing(sw["activation_checkpointing"])
    optimizer = torch.optim.AdamW(param_groups(model, 0.01), lr=1e-4,
                                  fused=sw["fused_adamw"] and device.type == "cuda")
    step_model = CompileWithFallback(model) if sw["compile"] else model
    autocast = autocast_context(sw["precision"], device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.cuda.reset_peak_memory_stats(device)
    # cycle: the CUDA prefetcher always reads one batch ahead of the step
    batches = DevicePrefetcher(((0, b) for b in itertools.cycle(host_batches)), device, info.panel_mask.to(device),
                               sw["attention_fast_path"], enabled=sw["prefetch"])
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    times = []
    model.train()
    for i in range(n_batches):
        sync()
        start = time.perf_counter()
        _, batch = next(batches)
        with autocast():
            pred = step_model(batch["gene_idx"], batch["values"], batch["pad_mask"])
        loss = expression_loss(pred.float(), batch["target"], batch["target_mask"], "poisson")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        if i >= spec["warmup"]:
            times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak_bytes = torch.cuda.max_memory_allocated(device)
    else:
        peak_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    step = statistics.median(times)
    return {"step_s": step, "peak_flops": measure_peak_flops(device), "samples_per_s": spec["micro_batch"] / step, "peak_gb": peak_bytes / 1e9,
            "flops": train_step_flops(model_cfg, spec["micro_batch"], spec["k"]),
            "compile_fell_back": bool(getattr(step_model, "failed", False)),
            "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
            "threads": torch.get_num_threads()}


def spawn_row(spec: dict) -> dict:
    """Run :func:`run_row` in a fresh interpreter; → its result dict (or {'error': ...})."""
    proc = subprocess.run([sys.executable, __file__, "--row", json.dumps(spec)], capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:160]}
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--row", help=argparse.SUPPRESS)
    parser.add_argument("--presets", nargs="+", default=["tiny", "S"])
    parser.add_argument("--micro-batch", type=int, nargs="+", default=[16, 4], help="one per preset")
    parser.add_argument("--k", type=int, default=2048)
    parser.add_argument("--genes", type=int, default=8000, help="vocabulary size G of the synthetic corpus")
    parser.add_argument("--samples", type=int, default=1200)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per row (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = default")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--ablate", nargs="*", default=None,
                        help="presets that also get one before/after row per switch (default: the last preset)")
    parser.add_argument("--dir", type=Path, default=None, help="work directory (default: a temporary one)")
    args = parser.parse_args(argv)
    if args.row:
        print(json.dumps(run_row(json.loads(args.row))))
        return
    if len(args.micro_batch) != len(args.presets):
        parser.error("--micro-batch needs one value per preset")
    work = args.dir or Path(tempfile.mkdtemp(prefix="txfm-train-bench-"))
    corpus = work / "corpus"
    try:
        if not corpus.exists():  # panels of ≥ 70 % of G ≥ K: no padding, as for real full-panel datasets
            write_synthetic_corpus(corpus, n_samples=args.samples, n_genes=args.genes, n_datasets=3,
                                   panel_fraction=(0.7, 1.0), mean_library_size=4000.0, val_fraction=0.1)
        device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                              ("cpu" if args.device == "auto" else args.device))
        if args.threads > 0:
            torch.set_num_threads(args.threads)
        peaks = [measure_peak_flops(device)]
        ablations = ABLATIONS_CUDA if device.type == "cuda" else ABLATIONS_CPU
        ablate = set(args.presets[-1:] if args.ablate is None else args.ablate)
        lines = []
        header = (f"{'preset':<7}{'K':>6}{'B':>4} {'device':<22}{'variant':<32}{'samples/s':>10}{'step s':>9}"
                  f"{'MFU':>7}{'peak GB':>9}")
        for preset, micro_batch in zip(args.presets, args.micro_batch):
            variants = [("trainer defaults", {})]
            if preset in ablate:
                variants += [(f"{name}={value}", {name: value}) for name, value in ablations.items()]
            for label, change in variants:
                spec = {"corpus": str(corpus), "preset": preset, "micro_batch": micro_batch, "k": args.k,
                        "steps": args.steps, "warmup": args.warmup, "threads": args.threads,
                        "device": args.device, "switches": {**DEFAULTS, **change}}
                row = spawn_row(spec)
                if "error" in row:
                    lines.append(lambda peak, preset=preset, label=label, micro_batch=micro_batch, row=row:
                                 f"{preset:<7}{args.k:>6}{micro_batch:>4} {'':<22}{label:<32} failed: {row['error']}")
                    continue
                peaks.append(row["peak_flops"])
                note = " (compile fell back)" if row["compile_fell_back"] else ""
                lines.append(lambda peak, preset=preset, micro_batch=micro_batch, row=row, label=label, note=note:
                             f"{preset:<7}{args.k:>6}{micro_batch:>4} {row['device'] + ' x' + str(row['threads']):<22}"
                             f"{label + note:<32}{row['samples_per_s']:>10.2f}{row['step_s']:>9.3f}"
                             f"{row['flops'] / row['step_s'] / peak:>7.1%}{row['peak_gb']:>9.2f}")
                print(f"  done: {preset} {label}", file=sys.stderr, flush=True)
        # A shared machine's matmul rate drops while others compute: the best rate seen in this run (parent
        # and every row's child) is the machine's capability, and every row's MFU is against that one peak.
        peak = max(peaks)
        print(f"peak dense matmul ({'bf16' if device.type == 'cuda' else 'fp32'}, best of {len(peaks)} "
              f"measurements in this run): {peak / 1e9:.1f} GFLOP/s; G={args.genes}, K={args.k}")
        print(header)
        for line in lines:
            print(line(peak))
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
