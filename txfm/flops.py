"""FLOP model of a TxFM training step and a measured matmul peak, for model-FLOP utilisation (MFU).

Counting convention (the usual one for MFU, e.g. PaLM appendix B): a multiply-add is 2 FLOPs; only matmuls
and the loss are counted (layer norms, GELU, softmax and other elementwise work are a few % at most and are
left out); a training step costs 3× the forward pass (backward = 2× forward: gradients with respect to
activations and to weights). Activation checkpointing *recomputes* the encoder forward; that is hardware
work, not model work, so :func:`train_step_flops` leaves it out unless ``recompute=True``.

Per sample, with sequence ``N = K + 1`` (the K input genes plus CLS), width ``d``, MLP hidden ``m``,
decoder width ``w`` and ``G`` vocabulary genes::

    encoder block   qkv 2·N·d·3d  + proj 2·N·d·d  + scores 2·N·N·d  + values 2·N·N·d  + mlp 2·N·d·m·2
    decoder         (2·d·w if w ≠ d) + depth · 2·(2·w·w)  + head 2·w·G
    loss            ~6·G   (φ, exp, multiply, mask, sum)

Attention is counted over all N tokens even when some are padding (the kernels compute them).
"""

from __future__ import annotations

import time

import torch

from txfm.model import TxFMConfig

#: Elementwise FLOPs per vocabulary gene in the output activation + Poisson loss (order of magnitude).
LOSS_FLOPS_PER_GENE = 6
#: Backward ≈ 2× forward, so fwd+bwd ≈ 3× forward.
TRAIN_MULTIPLIER = 3


def forward_flops_breakdown(cfg: TxFMConfig, n_input_genes: int) -> dict[str, float]:
    """Forward FLOPs of ONE sample by component (see the module docstring). → {name: FLOPs}"""
    n, d = n_input_genes + 1, cfg.dim
    hidden = int(d * cfg.mlp_ratio)
    width = cfg.dim if cfg.decoder_depth == 0 else cfg.decoder_width
    depth = cfg.depth
    return {
        "encoder_qkv": depth * 2.0 * n * d * 3 * d,
        "encoder_proj": depth * 2.0 * n * d * d,
        "attention_scores": depth * 2.0 * n * n * d,
        "attention_values": depth * 2.0 * n * n * d,
        "encoder_mlp": depth * 2.0 * n * d * hidden * 2,
        "decoder": (2.0 * d * width if width != d else 0.0) + cfg.decoder_depth * 2 * (2.0 * width * width),
        "output_head": 2.0 * width * cfg.n_genes,
        "loss": float(LOSS_FLOPS_PER_GENE * cfg.n_genes),
    }


def train_step_flops(cfg: TxFMConfig, batch: int, n_input_genes: int, recompute: bool = False) -> float:
    """Model FLOPs of one optimizer-step's worth of ``batch`` samples (fwd + bwd = 3 × forward).

    ``recompute=True`` adds the encoder forward that activation checkpointing runs a second time (hardware
    FLOPs rather than model FLOPs).
    """
    if batch < 1 or n_input_genes < 1:
        raise ValueError(f"train_step_flops: batch and n_input_genes must be >= 1, got {batch}, {n_input_genes}")
    parts = forward_flops_breakdown(cfg, n_input_genes)
    total = TRAIN_MULTIPLIER * sum(parts.values())
    if recompute:
        total += sum(v for k, v in parts.items() if k.startswith(("encoder", "attention")))
    return batch * total


def measure_peak_flops(device: str | torch.device = "cpu", dtype: torch.dtype | None = None, size: int | None = None,
                       repeats: int = 5) -> float:
    """Achievable dense-matmul throughput (FLOP/s) of ``device``: best of ``repeats`` ``size``³ matmuls.

    Defaults: fp32 and size 2048 on CPU, bf16 and size 8192 on CUDA (the dtypes the training step runs in).
    Measured in the same process as the benchmark it normalises, so MFU compares like with like (same
    threads, same load on a shared machine).
    """
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if size is None:
        size = 8192 if device.type == "cuda" else 2048
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    torch.matmul(a, b, out=out)  # warm-up (BLAS thread pool, cuBLAS handle and heuristics)
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b, out=out)
        sync()
        best = min(best, time.perf_counter() - start)
    return 2.0 * size ** 3 / best
