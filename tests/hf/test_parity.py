"""Parity with transformers' Llama4ForCausalLM: the definition of "Llama-4-style"."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import Llama4ForCausalLM, Llama4TextConfig

from distill import hf
from distill.model.attention import causal_query_blocks
from distill.model.layout import canonical_params

BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=32, intermediate_size_mlp=48, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
            attn_implementation="eager")

CASES = {
    # interleave step 1, QK norm on, GQA, temperature tuning with a small floor_scale, small chunks
    "step1_qknorm_gqa_tuning": dict(interleave_moe_layer_step=1, use_qk_norm=True, attention_chunk_size=8,
                                    attn_temperature_tuning=True, floor_scale=4, attn_scale=0.5,
                                    no_rope_layer_interval=2),
    # interleave step 2 (dense layers 0, 2), QK norm off, top-2, llama3 rope scaling
    "step2_no_qknorm_top2_llama3": dict(interleave_moe_layer_step=2, use_qk_norm=False, num_experts_per_tok=2,
                                        attention_chunk_size=16, floor_scale=8,
                                        rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0,
                                                             low_freq_factor=1.0, high_freq_factor=4.0,
                                                             original_max_position_embeddings=16)),
    # MHA (no GQA), explicit irregular plans, tied embeddings
    "mha_explicit_plan_tied": dict(num_key_value_heads=4, moe_layers=[0, 3], no_rope_layers=[1, 0, 1, 1],
                                   attention_chunk_size=4, floor_scale=3, tie_word_embeddings=True),
}


def torch_reference(case: str, seed: int = 0) -> Llama4ForCausalLM:
    torch.manual_seed(seed)
    config = Llama4TextConfig(**{**BASE, **CASES[case]})
    model = Llama4ForCausalLM(config).eval()
    with torch.no_grad():  # HF initialises norms to 1 and experts from N(0, 0.02); perturb everything
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def torch_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(tokens).long()).logits.float().numpy()


def tokens_for(vocab: int, batch: int = 3, seq: int = 40, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, seq))


def log_softmax(x):
    x = x.astype(np.float64)
    return x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))


def assert_logits_match(ours: np.ndarray, theirs: np.ndarray):
    assert ours.shape == theirs.shape
    assert np.max(np.abs(ours - theirs)) <= 1e-4
    # Second check: per-token KL(theirs || ours) is float32 noise.
    lp, lq = log_softmax(theirs), log_softmax(ours)
    kl = np.sum(np.exp(lp) * (lp - lq), axis=-1)
    assert np.max(kl) < 1e-8


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dispatch", ["sorted", "dense"])
def test_logits_match_transformers(case, dispatch):
    reference = torch_reference(case)
    tokens = tokens_for(BASE["vocab_size"])
    ours = hf.from_hf(reference, dispatch=dispatch)
    # Several chunks long and longer than floor_scale, so chunking and temperature tuning matter.
    assert tokens.shape[1] > 2 * ours.cfg.attention_chunk_size and tokens.shape[1] > ours.cfg.floor_scale
    assert_logits_match(np.asarray(ours(tokens).logits), torch_logits(reference, tokens))


def test_scanned_model_matches_transformers():
    reference = torch_reference("step1_qknorm_gqa_tuning")
    tokens = tokens_for(BASE["vocab_size"])
    ours = hf.from_hf(reference, scan_layers=True)
    assert ours.scanned is not None
    assert_logits_match(np.asarray(ours(tokens).logits), torch_logits(reference, tokens))


@pytest.mark.parametrize("case", sorted(CASES))
def test_gradients_match_transformers(case):
    """The gradient of every parameter (through attention in 4 query blocks at 64 tokens, the
    sorted dispatch's hand-written backward, the router) equals torch autograd's through
    transformers, after the export's name and layout mapping."""
    reference = torch_reference(case)
    tokens = tokens_for(BASE["vocab_size"], batch=2, seq=64)
    ours = hf.from_hf(reference, dispatch="sorted")
    assert causal_query_blocks(tokens.shape[1]) > 1
    weights = np.random.default_rng(2).normal(size=(*tokens.shape, BASE["vocab_size"])).astype(np.float32)
    logits = reference(torch.from_numpy(tokens).long()).logits
    (logits * torch.from_numpy(weights)).sum().backward()
    theirs = {name: p.grad.numpy() for name, p in reference.named_parameters()}
    graph, params = nnx.split(ours, nnx.Param)
    loss = lambda p: jnp.sum(nnx.merge(graph, p)(tokens).logits * weights)  # noqa: E731
    grads = nnx.merge(graph, jax.grad(loss)(params))  # a model holding the gradients as its weights
    ours_hf = hf.params_to_hf_state(ours.cfg, canonical_params(grads))
    assert set(theirs) <= set(ours_hf)
    for name, want in theirs.items():
        scale = max(np.abs(want).max(), 1e-6)
        assert np.abs(ours_hf[name] - want).max() / scale < 1e-4, name


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_through_hf_directory(case, tmp_path):
    reference = torch_reference(case)
    tokens = tokens_for(BASE["vocab_size"])
    ours = hf.from_hf(reference)
    hf.to_hf(ours, tmp_path / "export")
    reloaded = Llama4ForCausalLM.from_pretrained(tmp_path / "export", attn_implementation="eager").eval()
    assert_logits_match(np.asarray(ours(tokens).logits), torch_logits(reloaded, tokens))
    # ... and back: the directory imports to the same parameters.
    again = hf.from_hf(tmp_path / "export")
    np.testing.assert_array_equal(np.asarray(again(tokens).logits), np.asarray(ours(tokens).logits))


def test_conditional_generation_text_part(tmp_path):
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    text = {**BASE, **CASES["step1_qknorm_gqa_tuning"]}
    text.pop("attn_implementation")
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                  vision_output_dim=16, image_size=28, patch_size=14, projector_input_dim=16,
                  projector_output_dim=16)
    torch.manual_seed(0)
    full = Llama4ForConditionalGeneration(Llama4Config(text_config=text, vision_config=vision)).eval()
    full.save_pretrained(tmp_path / "mm")
    tokens = tokens_for(BASE["vocab_size"], batch=2, seq=24)
    with torch.no_grad():  # the text-only path of full(...); its forward fails on text-only input in
        # transformers 5.24 (it reads outputs.image_outputs from its own language_model's output)
        expected = full.language_model(input_ids=torch.from_numpy(tokens).long()).logits.numpy()
    for source in (full, tmp_path / "mm"):
        ours = hf.from_hf(source)
        assert_logits_match(np.asarray(ours(tokens).logits), expected)


def test_export_refuses_a_non_empty_directory(tmp_path):
    ours = hf.from_hf(torch_reference("mha_explicit_plan_tied"))
    (tmp_path / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not empty"):
        hf.to_hf(ours, tmp_path)
    assert (tmp_path / "keep.txt").read_text() == "user data"


def test_missing_and_misshapen_tensors_are_named(tmp_path):
    reference = torch_reference("step2_no_qknorm_top2_llama3")
    cfg = hf.config_from_hf(reference.config)
    state = {k: v.numpy() for k, v in reference.state_dict().items()}
    missing = dict(state)
    del missing["model.layers.1.feed_forward.router.weight"]
    with pytest.raises(hf.HFConversionError, match=r"model\.layers\.1\.feed_forward\.router\.weight is missing"):
        hf.params_from_hf_state(cfg, missing)
    bad = dict(state)
    bad["model.layers.0.self_attn.q_proj.weight"] = bad["model.layers.0.self_attn.q_proj.weight"][:-1]
    with pytest.raises(hf.HFConversionError, match=r"q_proj\.weight has shape"):
        hf.params_from_hf_state(cfg, bad)


def test_pickle_checkpoints_need_permission(tmp_path):
    reference = torch_reference("mha_explicit_plan_tied")
    reference.config.save_pretrained(tmp_path)
    torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(hf.HFConversionError, match="allow_pickle=True"):
        hf.from_hf(tmp_path)
    tokens = tokens_for(BASE["vocab_size"], batch=2, seq=16)
    ours = hf.from_hf(tmp_path, allow_pickle=True)
    assert_logits_match(np.asarray(ours(tokens).logits), torch_logits(reference, tokens))


def test_other_architectures_are_refused():
    with pytest.raises(hf.HFConversionError, match="model_type='llama'"):
        hf.config_from_hf({"model_type": "llama", "vocab_size": 8})


def test_softmax_router_cannot_be_exported(tmp_path):
    ours = hf.from_hf(torch_reference("mha_explicit_plan_tied"), router="softmax")
    with pytest.raises(hf.HFConversionError, match="router='softmax'"):
        hf.to_hf(ours, tmp_path / "out")


def test_config_round_trip():
    reference = torch_reference("step2_no_qknorm_top2_llama3")
    cfg = hf.config_from_hf(reference.config)
    again = hf.config_from_hf(hf.config_to_hf(cfg))
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)
