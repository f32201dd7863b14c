"""The TxFM encoder–decoder (a masked autoencoder over gene-expression tokens).

A sample is a *set* of K input genes (no positions). Each token is the concatenation of a learned
(d−1)-dim gene embedding with the gene's scalar log1p-normalised value → d. A learned CLS token is
prepended; pre-norm transformer blocks (scaled-dot-product attention with a key-padding mask, LayerScale,
stochastic depth) and a final LayerNorm give the CLS embedding ``[B, d]``. A residual-MLP decoder maps it
to logits for all G vocabulary genes and an output activation φ (:data:`txfm.losses.ACTIVATIONS`,
default rectified tanh) turns them into predicted log1p expression ``x̂ [B, G]``.

Presets and parameter counts at the paper's vocabulary (G = 44,349), from :func:`parameter_table`;
``decoder_dim`` is the multiple of 64 that brings the total closest to the paper's count::

    preset  dim  depth heads decoder   parameters   paper   rel. error
    S       384    6     6   4×576     56.11 M       57 M    −1.6 %
    B       768   12    12   4×768    157.93 M      159 M    −0.7 %
    L      1024   24    16   4×1024   401.60 M      403 M    −0.3 %

(B and L land closest with decoder width = encoder width, i.e. no d → w projection.)
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from txfm.losses import ACTIVATIONS

#: Parameter counts reported in the paper for G = 44,349 genes.
PAPER_PARAMETERS: dict[str, float] = {"S": 57e6, "B": 159e6, "L": 403e6}
PAPER_N_GENES = 44_349

#: Preset name → TxFMConfig field overrides. tiny is for CPU tests and the demo.
PRESETS: dict[str, dict] = {
    "tiny": dict(dim=64, depth=2, heads=4, drop_path=0.0, decoder_depth=1, decoder_dim=64),
    "S": dict(dim=384, depth=6, heads=6, drop_path=0.1, decoder_depth=4, decoder_dim=576),
    "B": dict(dim=768, depth=12, heads=12, drop_path=0.1, decoder_depth=4, decoder_dim=768),
    "L": dict(dim=1024, depth=24, heads=16, drop_path=0.3, decoder_depth=4, decoder_dim=1024),
}

TRUNC_NORMAL_STD = 0.02


@dataclass
class TxFMConfig:
    """Architecture hyper-parameters; JSON-serialisable (``dataclasses.asdict``)."""

    n_genes: int
    dim: int = 384
    depth: int = 6
    heads: int = 6
    mlp_ratio: float = 4.0
    drop_path: float = 0.1  # stochastic-depth rate of the last block (linear ramp from 0)
    layerscale_init: float = 1e-5
    decoder_depth: int = 4  # residual MLP blocks; 0 = a single Linear from the CLS embedding
    decoder_dim: int | None = None  # width of the decoder blocks; None = dim
    activation: str = "rectified_tanh"
    library_size: float = 1e5  # L of log1p(count / library · L); bounds rectified tanh / clamped ReLU
    dropout: float = 0.0  # attention / MLP / decoder dropout

    def __post_init__(self) -> None:
        if self.n_genes < 1:
            raise ValueError(f"TxFMConfig: n_genes must be >= 1, got {self.n_genes}")
        if self.dim < 2 or self.dim % self.heads:
            raise ValueError(f"TxFMConfig: dim {self.dim} must be >= 2 and divisible by heads {self.heads}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"TxFMConfig: unknown activation {self.activation!r}; expected one of "
                             f"{sorted(ACTIVATIONS)}")
        if self.decoder_depth < 0 or self.depth < 0:
            raise ValueError("TxFMConfig: depth and decoder_depth must be >= 0")
        if not 0.0 <= self.drop_path < 1.0 or not 0.0 <= self.dropout < 1.0:
            raise ValueError("TxFMConfig: drop_path and dropout must be in [0, 1)")
        if self.library_size <= 0:
            raise ValueError(f"TxFMConfig: library_size must be > 0, got {self.library_size}")

    @property
    def decoder_width(self) -> int:
        """Resolved decoder width (``decoder_dim`` or ``dim``)."""
        return self.decoder_dim if self.decoder_dim is not None else self.dim

    @classmethod
    def preset(cls, name: str, n_genes: int, **overrides) -> "TxFMConfig":
        """Config of preset ``name`` (tiny | S | B | L) for a vocabulary of ``n_genes``, with overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; expected one of {list(PRESETS)}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"TxFMConfig.preset: unknown field(s) {', '.join(unknown)}")
        return cls(n_genes=n_genes, **{**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, values: dict) -> "TxFMConfig":
        """Inverse of ``dataclasses.asdict``; unknown keys are an error (a config from another version)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"TxFMConfig: unknown field(s) {', '.join(unknown)}")
        return cls(**values)


class DropPath(nn.Module):
    """Stochastic depth: zero a whole residual branch per sample with probability p (train only). [B, ...]"""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep  # rescale so the expectation matches eval


class LayerScale(nn.Module):
    """Per-channel learned scale of a residual branch, initialised small. [..., d] → [..., d]"""

    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Attention(nn.Module):
    """Multi-head self-attention over a padded token set. [B, N, d], keep [B, N] → [B, N, d]

    Uses ``F.scaled_dot_product_attention``; with a key-padding mask CUDA dispatches to the fused
    memory-efficient / cuDNN kernels (FlashAttention-2 itself takes no mask), never materialising [N, N].
    ``keep=None`` means no padding: no mask is passed, which unlocks the flash kernels (CUDA FlashAttention-2
    and the CPU flash kernel; on CPU a boolean mask forces the [B, h, N, N] math path).
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attn_dropout = dropout
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, keep: Tensor | None) -> Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        # keep[b, j] False ⇒ no query attends to key j (padding); broadcast over heads and queries.
        attn_mask = None if keep is None else keep[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                             dropout_p=self.attn_dropout if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(batch, tokens, dim)))


class Mlp(nn.Module):
    """Linear → GELU → Linear (transformer feed-forward). [..., d] → [..., d]"""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block with LayerScale and stochastic depth. [B, N, d], keep [B, N] → [B, N, d]"""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, drop_path: float, layerscale_init: float,
                 dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.ls1 = LayerScale(dim, layerscale_init)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dropout)
        self.ls2 = LayerScale(dim, layerscale_init)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, keep: Tensor | None) -> Tensor:
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x), keep)))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


class ResidualMLPBlock(nn.Module):
    """LN → Linear → GELU → Linear, added to the input. [B, w] → [B, w]"""

    def __init__(self, width: int, dropout: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(width, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.drop(self.fc2(self.act(self.fc1(self.norm(x)))))


class ResidualMLPDecoder(nn.Module):
    """CLS embedding → logits for every vocabulary gene. [B, d] → [B, G]

    depth 0: one Linear d → G. depth n: Linear d → w (skipped if w = d), n residual MLP blocks at width w,
    LayerNorm, Linear w → G (``head``; its weight row g is gene g's decoder vector).
    """

    def __init__(self, in_dim: int, width: int, depth: int, n_genes: int, dropout: float = 0.0):
        super().__init__()
        if depth == 0:
            width = in_dim
        self.proj = nn.Linear(in_dim, width) if width != in_dim else nn.Identity()
        self.blocks = nn.Sequential(*[ResidualMLPBlock(width, dropout) for _ in range(depth)])
        self.norm = nn.LayerNorm(width) if depth > 0 else nn.Identity()
        self.head = nn.Linear(width, n_genes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(self.blocks(self.proj(x))))


class TxFM(nn.Module):
    """TxFM: gene-token transformer encoder + residual-MLP decoder + output activation."""

    def __init__(self, cfg: TxFMConfig):
        super().__init__()
        self.cfg = cfg
        self.gene_embed = nn.Embedding(cfg.n_genes, cfg.dim - 1)  # the last channel carries the value
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]  # linear ramp 0 → drop_path
        self.blocks = nn.ModuleList([
            Block(cfg.dim, cfg.heads, cfg.mlp_ratio, rate, cfg.layerscale_init, cfg.dropout) for rate in rates])
        self.norm = nn.LayerNorm(cfg.dim)
        self.decoder = ResidualMLPDecoder(cfg.dim, cfg.decoder_width, cfg.decoder_depth, cfg.n_genes, cfg.dropout)
        self.activation = ACTIVATIONS[cfg.activation]
        # Runtime switch, not architecture (not in TxFMConfig, not saved): see set_activation_checkpointing.
        self.activation_checkpointing = False
        self.reset_parameters()

    def save_pretrained(self, directory: str | os.PathLike, genes: pd.DataFrame, extra: dict | None = None) -> Path:
        """Write a model directory (safetensors + config.json + genes.parquet + README.md model card).

        ``genes``: the vocabulary, one row per model gene in output order, with a ``gene_id`` column.
        """
        from txfm.checkpoint import save_model

        save_model(directory, self, self.cfg, genes, extra=extra)
        return Path(directory)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> "TxFM":
        """Load a model directory (or a training run directory: its last checkpoint) offline, in eval mode.

        The vocabulary (genes.parquet) is attached as ``model.vocabulary``; config.json's ``extra`` (training
        settings, step, metrics) as ``model.extra``.
        """
        from txfm.checkpoint import load_model, read_model_config, resolve_checkpoint

        directory = resolve_checkpoint(path)
        model, _, genes = load_model(directory, map_location=map_location)
        model.vocabulary = genes
        model.extra = read_model_config(directory)[1]
        return model

    def set_activation_checkpointing(self, enabled: bool) -> "TxFM":
        """Recompute each encoder block's activations in the backward pass instead of storing them.

        Trades one extra encoder forward (~+33 % step FLOPs) for activation memory that no longer grows with
        depth (only block inputs [B, K+1, d] are kept) — what lets TxFM-L train at the paper's per-GPU batch
        on one 80 GB GPU. Uses ``torch.utils.checkpoint`` with ``use_reentrant=False``; the RNG state is
        replayed, so drop path draws the same masks in the recomputation. Only active in training mode.
        """
        self.activation_checkpointing = bool(enabled)
        return self

    def reset_parameters(self) -> None:
        """Truncated normal (σ = 0.02, cut at ±2σ) for Linear/Embedding weights and CLS, zero biases."""
        def trunc_normal(weight: Tensor) -> None:
            nn.init.trunc_normal_(weight, std=TRUNC_NORMAL_STD, a=-2 * TRUNC_NORMAL_STD, b=2 * TRUNC_NORMAL_STD)

        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                trunc_normal(module.weight)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        trunc_normal(self.cls_token)

    def tokens(self, gene_idx: Tensor, values: Tensor, pad_mask: Tensor | None) -> Tensor:
        """Input tokens [gene embedding ; value], padding zeroed. [B, K] ×3 → [B, K, d]

        ``pad_mask=None`` declares that the batch has no padding (the caller checked on the host, where it
        costs no device sync); it gives the same result as an all-False mask.
        """
        if pad_mask is None:
            if gene_idx.shape != values.shape or gene_idx.dim() != 2:
                raise ValueError(f"TxFM: gene_idx {tuple(gene_idx.shape)} and values {tuple(values.shape)} "
                                 "must both be [B, K]")
            embedded = self.gene_embed(gene_idx)
            return torch.cat([embedded, values.to(embedded.dtype).unsqueeze(-1)], dim=-1)
        if gene_idx.shape != values.shape or gene_idx.shape != pad_mask.shape or gene_idx.dim() != 2:
            raise ValueError(f"TxFM: gene_idx {tuple(gene_idx.shape)}, values {tuple(values.shape)} and pad_mask "
                             f"{tuple(pad_mask.shape)} must all be [B, K]")
        # Padding may carry any index/value (even inf); neutralise it so nothing non-finite enters the matmuls.
        gene_idx = gene_idx.masked_fill(pad_mask, 0)
        values = values.masked_fill(pad_mask, 0.0)
        embedded = self.gene_embed(gene_idx)
        tokens = torch.cat([embedded, values.to(embedded.dtype).unsqueeze(-1)], dim=-1)
        return tokens.masked_fill(pad_mask.unsqueeze(-1), 0.0)

    def embed(self, gene_idx: Tensor, values: Tensor, pad_mask: Tensor | None) -> Tensor:
        """CLS embedding after the final norm. gene_idx int64 [B, K], values [B, K], pad_mask bool [B, K] → [B, d]

        ``pad_mask=None``: no padding in the batch (no attention mask; the fast flash-attention path).
        """
        x = self.tokens(gene_idx, values, pad_mask)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        keep = None
        if pad_mask is not None:  # CLS is never padding
            keep = torch.cat([pad_mask.new_ones(pad_mask.shape[0], 1), ~pad_mask], dim=1)
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if recompute:
                x = torch.utils.checkpoint.checkpoint(block, x, keep, use_reentrant=False)
            else:
                x = block(x, keep)
        return self.norm(x[:, 0])

    def forward(self, gene_idx: Tensor, values: Tensor, pad_mask: Tensor | None) -> Tensor:
        """Predicted log1p expression of every vocabulary gene, x̂ = φ(decoder(CLS)). [B, K] ×3 → [B, G] float32

        φ is applied in float32 even under autocast: the Poisson loss exponentiates x̂, where bf16 rounding
        (≈ 0.4 % relative) would be amplified.
        """
        logits = self.decoder(self.embed(gene_idx, values, pad_mask))
        return self.activation(logits.float(), self.cfg.library_size)

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Number of parameters (all, or only those with requires_grad)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def gene_codebook(self) -> Tensor:
        """Learned gene embeddings (input codebook). → [G, d−1]"""
        return self.gene_embed.weight

    def decoder_gene_weights(self) -> Tensor:
        """Decoder output weight row of every gene. → [G, decoder width]"""
        return self.decoder.head.weight


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Optimizer groups: weight decay on matrices (Linear, Embedding) only; none on norms, biases,
    LayerScale gammas and the CLS token (all the ≤ 1-dim tensors, plus cls_token by name)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.dim() <= 1 or name.endswith("cls_token") or name.endswith(".gamma"):
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def count_parameters(cfg: TxFMConfig) -> int:
    """Parameter count of ``TxFM(cfg)``, built on the meta device (no memory allocated)."""
    with torch.device("meta"):
        return TxFM(cfg).num_parameters()


def fit_decoder_dim(preset: str, target_parameters: float, n_genes: int = PAPER_N_GENES, multiple: int = 64,
                    max_dim: int = 16384) -> int:
    """Multiple of ``multiple`` for ``decoder_dim`` whose total parameter count is closest to the target.

    The count grows monotonically with the decoder width except at width = dim, where the d → w input
    projection disappears; so bisect over widths for the crossing and also consider width = dim.
    """
    def count(width: int) -> int:
        return count_parameters(TxFMConfig.preset(preset, n_genes, decoder_dim=width))

    lo, hi = 1, max_dim // multiple  # in units of ``multiple``
    while lo < hi:
        mid = (lo + hi) // 2
        if count(mid * multiple) < target_parameters:
            lo = mid + 1
        else:
            hi = mid
    dim = PRESETS[preset]["dim"]
    candidates = {max(lo - 1, 1) * multiple, lo * multiple} | ({dim} if dim % multiple == 0 else set())
    return min(candidates, key=lambda width: (abs(count(width) - target_parameters), width))


def parameter_table(n_genes: int = PAPER_N_GENES, fit: bool = False) -> pd.DataFrame:
    """Parameters per preset at ``n_genes`` vs the paper (S/B/L; tiny has no paper count).

    Columns: preset, dim, depth, heads, decoder_depth, decoder_dim, parameters, paper_parameters,
    relative_error. ``fit=True`` also adds ``fitted_decoder_dim`` (:func:`fit_decoder_dim`).
    """
    rows = []
    for name in PRESETS:
        cfg = TxFMConfig.preset(name, n_genes)
        params = count_parameters(cfg)
        paper = PAPER_PARAMETERS.get(name, math.nan)
        row = dict(preset=name, dim=cfg.dim, depth=cfg.depth, heads=cfg.heads, decoder_depth=cfg.decoder_depth,
                   decoder_dim=cfg.decoder_width, parameters=params, paper_parameters=paper,
                   relative_error=(params - paper) / paper)
        if fit:
            row["fitted_decoder_dim"] = fit_decoder_dim(name, paper, n_genes) if name in PAPER_PARAMETERS else None
        rows.append(row)
    return pd.DataFrame(rows)
