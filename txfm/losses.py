"""Output activations and reconstruction losses of TxFM.

Every expression value here lives in *log1p space*: ``x = log1p(count / library_size · L)`` with ``L`` the
target library size (``TxFMConfig.library_size``, default 1e5). The model predicts ``x̂ = φ(z)`` from
decoder logits ``z`` with one of :data:`ACTIVATIONS`; :func:`expression_loss` compares ``x̂`` with ``x``
on the *measured* entries only (``mask`` True) and averages over them.

Shapes: ``pred``, ``target``, ``mask`` are ``[B, G]`` (samples × vocabulary genes).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

LOSS_KINDS = ("poisson", "mse", "smooth_l1", "negative_binomial")

#: Default inverse dispersion θ of the negative binomial loss (var = μ + μ²/θ).
DEFAULT_NB_THETA = 10.0


def max_log1p_value(library_size: float) -> float:
    """Largest possible log1p-normalised value, ``log(L + 1)`` (all counts on one gene)."""
    return math.log1p(library_size)


def rectified_tanh(logits: Tensor, library_size: float) -> Tensor:
    """φ(z) = log(L+1)·ReLU(tanh(z / 4e)): bounded in [0, log(L+1)], exactly 0 for z ≤ 0. [..] → [..]"""
    return max_log1p_value(library_size) * torch.relu(torch.tanh(logits / (4.0 * math.e)))


def relu(logits: Tensor, library_size: float) -> Tensor:
    """φ(z) = max(z, 0); unbounded above. [..] → [..]"""
    return torch.relu(logits)


def clamped_relu(logits: Tensor, library_size: float) -> Tensor:
    """φ(z) = clamp(z, 0, log(L+1)): ReLU bounded by the largest attainable value. [..] → [..]"""
    return logits.clamp(min=0.0, max=max_log1p_value(library_size))


def softmax_log1p(logits: Tensor, library_size: float) -> Tensor:
    """φ(z) = log1p(L · softmax(z)) over the last (gene) axis. [..., G] → [..., G]

    softmax gives each gene's *fraction* of the library; multiplying by L turns it into a normalised
    count, and log1p maps it into the same space as the targets.
    """
    return torch.log1p(library_size * torch.softmax(logits, dim=-1))


#: name → φ(logits, library_size); every φ maps decoder logits to predicted log1p-normalised expression.
ACTIVATIONS: dict[str, Callable[[Tensor, float], Tensor]] = {
    "rectified_tanh": rectified_tanh,
    "relu": relu,
    "clamped_relu": clamped_relu,
    "softmax": softmax_log1p,
}


def activation_logits_for(name: str, values: Tensor, library_size: float) -> Tensor:
    """Decoder logits ``z`` with ``φ(z) ≈ values`` (an inverse of :data:`ACTIVATIONS`). [G] → [G]

    Used to start the decoder's output bias at the per-gene mean expression, so that training begins at the
    predict-the-mean baseline instead of predicting 0 everywhere. Values are clamped inside φ's range (and
    slightly above 0, where the rectified activations have no gradient).
    """
    floor = 1e-3
    if name == "rectified_tanh":
        top = max_log1p_value(library_size)
        return 4.0 * math.e * torch.atanh((values / top).clamp(floor / top, 0.999))
    if name == "relu":
        return values.clamp(min=floor)
    if name == "clamped_relu":
        return values.clamp(floor, max_log1p_value(library_size))
    if name == "softmax":  # softmax is shift-invariant: log of the implied fractions, up to a constant
        return torch.log(torch.expm1(values.clamp(min=floor)) / library_size)
    raise ValueError(f"unknown activation {name!r}; expected one of {', '.join(ACTIVATIONS)}")


def _check_shapes(pred: Tensor, target: Tensor, mask: Tensor) -> None:
    if pred.shape != target.shape or pred.shape != mask.shape:
        raise ValueError(f"expression_loss: pred {tuple(pred.shape)}, target {tuple(target.shape)} and "
                         f"mask {tuple(mask.shape)} must have the same shape")
    if mask.dtype != torch.bool:
        raise ValueError(f"expression_loss: mask must be bool, got {mask.dtype}")


def poisson_elementwise(pred: Tensor, target: Tensor) -> Tensor:
    """Poisson NLL with log-rate x̂ and observation e^x, constant-free: e^x̂ − x̂·e^x. [..] → [..]"""
    return torch.exp(pred) - pred * torch.exp(target)


def negative_binomial_elementwise(pred: Tensor, target: Tensor, log_theta: Tensor,
                                  size_factor: Tensor | None = None, eps: float = 1e-8) -> Tensor:
    """Negative-binomial NLL on the count scale. [B, G] → [B, G]

    Parameterisation (mean μ, inverse dispersion θ > 0; Var = μ + μ²/θ)::

        y = expm1(x)·s,  μ = expm1(x̂)·s      (s = size_factor, default 1: normalised counts per L)
        NLL = lgamma(θ) + lgamma(y+1) − lgamma(y+θ) − θ·log(θ/(θ+μ)) − y·log(μ/(θ+μ))

    ``s = library_size / L`` turns normalised counts back into the sample's raw counts (integers).
    ``log_theta`` is a scalar or ``[G]`` tensor (log θ, one per gene or shared).
    """
    y = torch.expm1(target).clamp(min=0.0)
    mu = torch.expm1(pred).clamp(min=0.0)
    if size_factor is not None:
        y = y * size_factor[:, None]
        mu = mu * size_factor[:, None]
    theta = torch.exp(log_theta) if log_theta.dim() == 0 else torch.exp(log_theta)[None, :]  # broadcasts to [B, G]
    log_theta_mu = torch.log(theta + mu + eps)
    return (torch.lgamma(theta) + torch.lgamma(y + 1.0) - torch.lgamma(y + theta)
            - theta * (torch.log(theta + eps) - log_theta_mu) - y * (torch.log(mu + eps) - log_theta_mu))


def expression_loss(pred: Tensor, target: Tensor, mask: Tensor, kind: str = "poisson", *,
                    log_theta: Tensor | float | None = None, size_factor: Tensor | None = None,
                    smooth_l1_beta: float = 1.0) -> Tensor:
    """Reconstruction loss, a scalar: the MEAN over measured entries (``mask`` True) of the per-entry loss.

    pred, target: float [B, G] in log1p space; mask: bool [B, G]. Unmeasured entries contribute nothing —
    not even NaN/inf gradients: they are replaced by 0 *before* any exp/lgamma is taken.

    kinds: ``poisson`` (e^x̂ − x̂·e^x, equals ``F.poisson_nll_loss(pred[mask], target[mask].exp(),
    log_input=True)``), ``mse``, ``smooth_l1`` (Huber with ``smooth_l1_beta``), ``negative_binomial`` (see
    :func:`negative_binomial_elementwise`; ``log_theta`` = fixed float, or a scalar/[G] tensor; default θ = 10;
    ``size_factor`` [B] optional).
    """
    _check_shapes(pred, target, mask)
    pred = pred.masked_fill(~mask, 0.0)
    target = target.masked_fill(~mask, 0.0)
    if kind == "poisson":
        per_entry = poisson_elementwise(pred, target)
    elif kind == "mse":
        per_entry = (pred - target).square()
    elif kind == "smooth_l1":
        per_entry = F.smooth_l1_loss(pred, target, reduction="none", beta=smooth_l1_beta)
    elif kind == "negative_binomial":
        if log_theta is None:
            log_theta = math.log(DEFAULT_NB_THETA)
        if not isinstance(log_theta, Tensor):
            log_theta = torch.tensor(float(log_theta), dtype=pred.dtype, device=pred.device)
        if log_theta.dim() == 1 and log_theta.shape[0] != pred.shape[1]:
            raise ValueError(f"expression_loss: log_theta has {log_theta.shape[0]} genes, pred has {pred.shape[1]}")
        per_entry = negative_binomial_elementwise(pred.float(), target.float(), log_theta.float(), size_factor)
    else:
        raise ValueError(f"expression_loss: unknown kind {kind!r}; expected one of {LOSS_KINDS}")
    weights = mask.to(per_entry.dtype)
    # Division by a clamped count keeps an all-unmeasured batch at loss 0 instead of NaN.
    return (per_entry * weights).sum() / weights.sum().clamp(min=1.0)
