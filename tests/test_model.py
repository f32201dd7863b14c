"""TxFM model, presets/parameter counts, init, weight-decay groups and model checkpoints."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from txfm.checkpoint import (CONFIG_FILE, GENES_FILE, MODEL_CARD_FILE, MODEL_FILE, load_model, resolve_checkpoint,
                             save_model)
from txfm.losses import ACTIVATIONS
from txfm.model import (PAPER_PARAMETERS, PRESETS, DropPath, LayerScale, TxFM, TxFMConfig, fit_decoder_dim,
                        param_groups, parameter_table)

N_GENES = 50


def make_batch(batch: int = 4, k: int = 12, n_real: int = 8, seed: int = 0):
    """gene_idx [B, K] (distinct genes), values [B, K], pad_mask [B, K] with the last K − n_real padded."""
    generator = torch.Generator().manual_seed(seed)
    gene_idx = torch.stack([torch.randperm(N_GENES, generator=generator)[:k] for _ in range(batch)])
    values = torch.rand(batch, k, generator=generator) * 5
    pad_mask = torch.zeros(batch, k, dtype=torch.bool)
    pad_mask[:, n_real:] = True
    return gene_idx, values, pad_mask


def tiny(**overrides) -> TxFM:
    torch.manual_seed(0)
    return TxFM(TxFMConfig.preset("tiny", N_GENES, **overrides)).eval()


def trained_like(**overrides) -> TxFM:
    """A tiny model whose every parameter (biases, norms, LayerScale too) is random and O(0.1–1), so that
    behaviour hidden by the initialisation (zero biases, 1e-5 LayerScale) shows up in the outputs."""
    model = tiny(**overrides)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.2)
    return model


@pytest.mark.parametrize("decoder_depth", [0, 1, 4])
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_forward_and_embed_shapes(decoder_depth: int, activation: str) -> None:
    model = tiny(decoder_depth=decoder_depth, decoder_dim=48, activation=activation)
    gene_idx, values, pad_mask = make_batch()
    assert model.embed(gene_idx, values, pad_mask).shape == (4, 64)
    out = model(gene_idx, values, pad_mask)
    assert out.shape == (4, N_GENES) and out.dtype == torch.float32 and torch.isfinite(out).all()
    expected_width = 64 if decoder_depth == 0 else 48
    assert model.decoder_gene_weights().shape == (N_GENES, expected_width)
    assert model.gene_codebook().shape == (N_GENES, 63)


def test_padding_tokens_do_not_matter() -> None:
    model = trained_like()
    gene_idx, values, pad_mask = make_batch()
    reference = model(gene_idx, values, pad_mask)
    changed_idx, changed_values = gene_idx.clone(), values.clone()
    changed_idx[pad_mask] = torch.randint(0, N_GENES, (int(pad_mask.sum()),))
    changed_values[pad_mask] = torch.tensor([float("inf"), -3.0, 1e6, float("nan")]).repeat(100)[: int(pad_mask.sum())]
    torch.testing.assert_close(model(changed_idx, changed_values, pad_mask), reference, rtol=0, atol=0)
    # Dropping the padding entirely gives the same answer (up to float summation order).
    n_real = int((~pad_mask[0]).sum())
    unpadded = model(gene_idx[:, :n_real], values[:, :n_real], pad_mask[:, :n_real])
    torch.testing.assert_close(unpadded, reference, rtol=1e-5, atol=1e-5)


def test_real_tokens_matter_and_order_does_not() -> None:
    model = trained_like()
    gene_idx, values, pad_mask = make_batch(n_real=12)
    reference = model.embed(gene_idx, values, pad_mask)
    permutation = torch.randperm(gene_idx.shape[1])
    permuted = model.embed(gene_idx[:, permutation], values[:, permutation], pad_mask[:, permutation])
    torch.testing.assert_close(permuted, reference, rtol=1e-5, atol=1e-5)  # a set: no positions
    changed = values.clone()
    changed[:, 0] += 3.0
    assert not torch.allclose(model.embed(gene_idx, changed, pad_mask), reference)


def test_drop_path_is_identity_in_eval_and_random_per_sample_in_train() -> None:
    x = torch.ones(200, 3, 5)
    drop = DropPath(0.5)
    assert torch.equal(drop.eval()(x), x)
    out = drop.train()(x)
    per_sample = out.flatten(1)
    assert set(per_sample.unique().tolist()) <= {0.0, 2.0}  # whole sample dropped or rescaled by 1/keep
    assert torch.all(per_sample.min(1).values == per_sample.max(1).values)
    assert 0.3 < (per_sample[:, 0] == 0).float().mean() < 0.7


def test_model_eval_is_deterministic_and_ignores_drop_path() -> None:
    model = trained_like(drop_path=0.5)
    same = tiny(drop_path=0.0)
    same.load_state_dict(model.state_dict())
    batch = make_batch()
    torch.testing.assert_close(model(*batch), same(*batch), rtol=0, atol=0)
    model.train()
    torch.manual_seed(1)
    first = model.embed(*batch)
    assert not torch.allclose(first, model.embed(*batch))  # stochastic depth active in training


def test_layerscale_init_and_zero_scale_makes_blocks_identity() -> None:
    layer = LayerScale(8, 1e-5)
    assert torch.all(layer.gamma == 1e-5)
    model = tiny(layerscale_init=0.0)
    embeddings = model.embed(*make_batch())
    # With every residual branch scaled by 0 the CLS embedding is norm(CLS) for every input.
    expected = model.norm(model.cls_token[0, 0]).expand_as(embeddings)
    torch.testing.assert_close(embeddings, expected)


def test_initialisation() -> None:
    model = TxFM(TxFMConfig.preset("tiny", 2000))
    weight = model.decoder.head.weight
    assert abs(weight.std().item() - 0.02) < 0.004 * 2 and weight.abs().max() <= 0.04 + 1e-7
    assert model.gene_embed.weight.abs().max() <= 0.04 + 1e-7
    for name, param in model.named_parameters():
        if name.endswith(".bias") and "norm" not in name:
            assert torch.all(param == 0), name


def test_param_groups_exclude_norms_biases_layerscale_and_cls() -> None:
    model = tiny()
    decay, no_decay = param_groups(model, weight_decay=0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    ids = lambda group: {id(p) for p in group["params"]}  # noqa: E731
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[i] for i in ids(no_decay)}
    assert "cls_token" in no_decay_names
    assert any(n.endswith("ls1.gamma") for n in no_decay_names)
    assert all(n.endswith((".bias", ".gamma", "cls_token")) or "norm" in n for n in no_decay_names)
    assert {names[i] for i in ids(decay)} >= {"gene_embed.weight", "decoder.head.weight", "blocks.0.attn.qkv.weight"}
    assert ids(decay).isdisjoint(ids(no_decay)) and len(ids(decay) | ids(no_decay)) == len(names)


def test_parameter_counts_match_the_paper() -> None:
    table = parameter_table(44_349)
    print("\n" + table.to_string(index=False))
    for preset, paper in PAPER_PARAMETERS.items():
        row = table.set_index("preset").loc[preset]
        assert abs(row["parameters"] - paper) / paper < 0.10, preset
    assert fit_decoder_dim("S", PAPER_PARAMETERS["S"]) == PRESETS["S"]["decoder_dim"]


def test_config_validation_and_presets() -> None:
    cfg = TxFMConfig.preset("B", 1000, drop_path=0.2)
    assert (cfg.dim, cfg.depth, cfg.heads, cfg.drop_path) == (768, 12, 12, 0.2)
    assert TxFMConfig.preset("L", 10).drop_path == 0.3
    with pytest.raises(ValueError, match="unknown preset"):
        TxFMConfig.preset("XL", 10)
    with pytest.raises(ValueError, match="unknown field"):
        TxFMConfig.preset("tiny", 10, width=3)
    with pytest.raises(ValueError, match="divisible"):
        TxFMConfig(n_genes=10, dim=30, heads=4)
    with pytest.raises(ValueError, match="activation"):
        TxFMConfig(n_genes=10, activation="sigmoid")
    with pytest.raises(ValueError, match="must all be"):
        tiny()(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4), torch.zeros(2, 3, dtype=torch.bool))


def vocabulary(n: int = N_GENES) -> pd.DataFrame:
    return pd.DataFrame({"gene_idx": range(n), "gene_id": [f"ENSG{i:011d}" for i in range(n)],
                         "symbol": [f"G{i}" for i in range(n)]})


def test_save_load_round_trip(tmp_path) -> None:
    model = trained_like(decoder_depth=2, decoder_dim=32)
    cfg = model.cfg
    save_model(tmp_path / "ckpt", model, cfg, vocabulary(), extra={"n_input_genes": 12, "step": 7})
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == sorted([MODEL_FILE, CONFIG_FILE, GENES_FILE,
                                                                           MODEL_CARD_FILE])
    # safetensors only: the weights file is plain tensors, readable without pickle.
    assert set(load_file(tmp_path / "ckpt" / MODEL_FILE)) == set(model.state_dict())
    assert json.loads((tmp_path / "ckpt" / CONFIG_FILE).read_text())["extra"] == {"n_input_genes": 12, "step": 7}
    loaded, loaded_cfg, genes = load_model(tmp_path / "ckpt")
    assert loaded_cfg == cfg and not loaded.training
    pd.testing.assert_frame_equal(genes, vocabulary())
    batch = make_batch()
    torch.testing.assert_close(loaded(*batch), model(*batch), rtol=0, atol=0)
    # A run directory resolves through checkpoints/last.
    run = tmp_path / "run" / "checkpoints"
    save_model(run / "step-000007", model, cfg, vocabulary())
    (run / "last").write_text("step-000007\n")
    assert resolve_checkpoint(tmp_path / "run") == run / "step-000007"


def test_save_and_load_reject_bad_input(tmp_path) -> None:
    model = tiny()
    with pytest.raises(ValueError, match="rows"):
        save_model(tmp_path / "a", model, model.cfg, vocabulary(10))
    with pytest.raises(ValueError, match="JSON"):
        save_model(tmp_path / "a", model, model.cfg, vocabulary(), extra={"bad": object()})
    save_model(tmp_path / "b", model, model.cfg, vocabulary())
    config = json.loads((tmp_path / "b" / CONFIG_FILE).read_text())
    config["model"]["dim"] = 128
    (tmp_path / "b" / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="do not match"):
        load_model(tmp_path / "b")
    with pytest.raises(ValueError, match="not a TxFM"):
        load_model(tmp_path / "missing")


def test_save_model_unwraps_compiled_module(tmp_path) -> None:
    model = tiny()
    wrapper = torch.nn.Module()
    wrapper._orig_mod = model  # what torch.compile's OptimizedModule looks like
    save_model(tmp_path, wrapper, model.cfg, vocabulary())
    loaded, _, _ = load_model(tmp_path)
    assert math.isclose(loaded.num_parameters(), model.num_parameters())
    torch.testing.assert_close(loaded(*make_batch()), model(*make_batch()), rtol=0, atol=0)
