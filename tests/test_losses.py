"""Output activations and expression losses (txfm.losses)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from txfm.losses import ACTIVATIONS, LOSS_KINDS, expression_loss

L = 1e5


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """pred, target in log1p space and a mask with ~30 % unmeasured entries, [6, 20]."""
    generator = torch.Generator().manual_seed(0)
    pred = torch.rand(6, 20, generator=generator) * 8
    target = torch.log1p(torch.poisson(torch.rand(6, 20, generator=generator) * 50, generator=generator))
    mask = torch.rand(6, 20, generator=generator) > 0.3
    return pred, target, mask


def test_activations_match_their_formulas() -> None:
    z = torch.linspace(-40, 40, 101).reshape(1, -1)
    bound = math.log(L + 1)
    torch.testing.assert_close(ACTIVATIONS["rectified_tanh"](z, L),
                               bound * torch.clamp(torch.tanh(z / (4 * math.e)), min=0))
    torch.testing.assert_close(ACTIVATIONS["relu"](z, L), torch.where(z > 0, z, torch.zeros_like(z)))
    torch.testing.assert_close(ACTIVATIONS["clamped_relu"](z, L), torch.minimum(torch.relu(z), torch.tensor(bound)))
    probabilities = torch.exp(z) / torch.exp(z).sum(dim=-1, keepdim=True)
    torch.testing.assert_close(ACTIVATIONS["softmax"](z, L), torch.log1p(L * probabilities))


def test_bounded_activations_stay_in_range() -> None:
    z = torch.randn(4, 50) * 100
    for name in ("rectified_tanh", "clamped_relu", "softmax"):
        out = ACTIVATIONS[name](z, L)
        assert out.min() >= 0 and out.max() <= math.log(L + 1) + 1e-4, name
    assert torch.all(ACTIVATIONS["rectified_tanh"](-z.abs(), L) == 0)  # sparsity: exactly 0 for z <= 0


def test_poisson_equals_torch_poisson_nll(batch) -> None:
    pred, target, mask = batch
    expected = F.poisson_nll_loss(pred[mask], target[mask].exp(), log_input=True)
    torch.testing.assert_close(expression_loss(pred, target, mask, "poisson"), expected)


def test_mse_and_smooth_l1_equal_torch_on_measured_entries(batch) -> None:
    pred, target, mask = batch
    torch.testing.assert_close(expression_loss(pred, target, mask, "mse"), F.mse_loss(pred[mask], target[mask]))
    torch.testing.assert_close(expression_loss(pred, target, mask, "smooth_l1"),
                               F.smooth_l1_loss(pred[mask], target[mask]))


def test_negative_binomial_equals_torch_distribution(batch) -> None:
    pred, target, mask = batch
    theta = 3.0
    mu, counts = torch.expm1(pred[mask]), torch.expm1(target[mask]).round()
    # torch's NB(total_count=θ, probs=μ/(μ+θ)) has mean μ and variance μ + μ²/θ.
    distribution = torch.distributions.NegativeBinomial(total_count=torch.tensor(theta), probs=mu / (mu + theta))
    expected = -distribution.log_prob(counts).mean()
    got = expression_loss(pred, torch.log1p(torch.expm1(target).round()), mask, "negative_binomial",
                          log_theta=math.log(theta))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_negative_binomial_size_factor_rescales_to_raw_counts(batch) -> None:
    pred, target, mask = batch
    size_factor = torch.linspace(0.5, 3.0, pred.shape[0])
    raw_counts = torch.expm1(target) * size_factor[:, None]
    raw_mean = torch.expm1(pred) * size_factor[:, None]
    # Same loss as feeding the already-rescaled values with size factor 1.
    expected = expression_loss(torch.log1p(raw_mean), torch.log1p(raw_counts), mask, "negative_binomial")
    got = expression_loss(pred, target, mask, "negative_binomial", size_factor=size_factor)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_unmeasured_entries_do_not_change_loss_or_gradients(batch, kind) -> None:
    pred, target, mask = batch
    perturbed_pred, perturbed_target = pred.clone(), target.clone()
    perturbed_pred[~mask] = torch.tensor([float("inf"), 1e4, -7.0, float("nan")]).repeat(100)[: int((~mask).sum())]
    perturbed_target[~mask] = 123.0
    base = pred.clone().requires_grad_(True)
    perturbed = perturbed_pred.clone().requires_grad_(True)
    loss = expression_loss(base, target, mask, kind)
    perturbed_loss = expression_loss(perturbed, perturbed_target, mask, kind)
    assert torch.isfinite(loss)
    torch.testing.assert_close(perturbed_loss, loss, rtol=0, atol=0)
    loss.backward()
    perturbed_loss.backward()
    assert torch.isfinite(perturbed.grad).all()
    assert torch.all(perturbed.grad[~mask] == 0)
    torch.testing.assert_close(perturbed.grad, base.grad, rtol=0, atol=0)


def test_all_unmeasured_gives_zero_not_nan(batch) -> None:
    pred, target, mask = batch
    assert expression_loss(pred, target, torch.zeros_like(mask), "poisson").item() == 0.0


def test_bad_arguments_raise_value_error(batch) -> None:
    pred, target, mask = batch
    with pytest.raises(ValueError, match="unknown kind"):
        expression_loss(pred, target, mask, "cross_entropy")
    with pytest.raises(ValueError, match="same shape"):
        expression_loss(pred, target[:, :5], mask, "poisson")
    with pytest.raises(ValueError, match="bool"):
        expression_loss(pred, target, mask.float(), "poisson")


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_logits_for_inverts_each_activation(name):
    # the output-bias initialisation relies on φ(activation_logits_for(x)) == x inside φ's range
    from txfm.losses import activation_logits_for

    L = 1e5
    values = torch.tensor([0.5, 1.0, 3.0, 7.5])
    logits = activation_logits_for(name, values, L)
    if name == "softmax":  # only defined up to a constant over genes: compare over the full vector of G genes
        values = torch.cat([values, torch.full((200,), 0.01)])
        logits = activation_logits_for(name, values, L)
        # softmax renormalises over genes, so only the ratios of expm1(values) are recovered
        recovered = torch.expm1(ACTIVATIONS[name](logits, L))
        assert torch.allclose(recovered / recovered.sum(), torch.expm1(values) / torch.expm1(values).sum(), rtol=1e-4)
    else:
        assert torch.allclose(ACTIVATIONS[name](logits, L), values, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown activation"):
        activation_logits_for("gelu", values, L)
