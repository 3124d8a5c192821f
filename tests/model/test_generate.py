"""Incremental decoding with a KV cache, and sampling: the cached logits are the numpy float64
reference's, token by token; greedy generation is the argmax loop of the full forward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill.model import build_model
from distill.model.generate import generate, next_token

REF_TOL = 1e-5

CASES = {
    # chunked RoPE (QK norm) / NoPE with temperature tuning / RoPE; chunk 8 < sequence, so chunks restart
    "irope_chunked": dict(num_hidden_layers=3, no_rope_layers=(1, 0, 1), moe_layers=(0, 1)),
    # two scanned groups of (RoPE MoE, NoPE dense) plus an unrolled tail layer
    "scanned_with_tail": dict(num_hidden_layers=5, no_rope_layer_interval=2, interleave_moe_layer_step=2,
                              scan_layers=True),
    "no_chunk_mha": dict(num_hidden_layers=2, no_rope_layer_interval=2, attention_chunk_size=None,
                         num_key_value_heads=4),
}


def _tokens(cfg, shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size, shape), jnp.int32)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("prompt", [1, 11])
def test_cached_decoding_matches_numpy_reference(tiny, helpers, ref, case, prompt):
    """Prefill `prompt` tokens, then one token per call: every position's logits are the float64
    reference's full-sequence logits; the cache index counts the tokens."""
    cfg = tiny(**CASES[case])
    values = helpers.pure(build_model(cfg.replace(scan_layers=False), seed=3))
    model = build_model(cfg)
    helpers.load(model, helpers.scanned_values(values, cfg.num_hidden_layers // 2) if cfg.scan_layers else values)
    tokens = _tokens(cfg, (2, 21), 4)
    call = jax.jit(lambda m, t, c: m(t, cache=c))
    out = call(model, tokens[:, :prompt], model.init_cache(2, 21))
    logits, cache = [out.logits], out.cache
    for t in range(prompt, 21):
        out = call(model, tokens[:, t:t + 1], cache)
        logits.append(out.logits)
        cache = out.cache
    assert int(cache.index) == 21
    want = ref.forward(values, cfg, tokens)
    helpers.assert_close(jnp.concatenate(logits, axis=1), want, REF_TOL, "cached logits")


def test_cache_refuses_positions_and_segments(tiny):
    cfg = tiny()
    model = build_model(cfg)
    tokens = _tokens(cfg, (1, 4))
    with pytest.raises(ValueError, match="positions follow the cache index"):
        model(tokens, positions=jnp.zeros((1, 4), jnp.int32), cache=model.init_cache(1, 8))


def test_greedy_generation_is_the_argmax_loop_of_the_full_forward(tiny, helpers):
    cfg = tiny(**CASES["irope_chunked"])
    model = build_model(cfg, seed=5)
    prompt = _tokens(cfg, (3, 6), 6)
    got = jax.jit(lambda p: generate(model, p, 20, jax.random.key(0), temperature=0.0))(prompt)
    want = jnp.zeros((3, 20), jnp.int32).at[:, :6].set(prompt)  # causal: the zeros after t never matter
    for t in range(6, 20):
        want = want.at[:, t].set(jnp.argmax(helpers.forward(model, want).logits[:, t - 1], axis=-1))
    np.testing.assert_array_equal(got, want)


def test_sampling_is_reproducible_by_key_and_varies_across_keys(tiny):
    cfg = tiny()
    model = build_model(cfg, seed=1)
    prompt = _tokens(cfg, (4, 3), 7)
    run = jax.jit(lambda p, k: generate(model, p, 24, k, temperature=1.0))
    a, b, c = run(prompt, jax.random.key(1)), run(prompt, jax.random.key(1)), run(prompt, jax.random.key(2))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a[:, :3], prompt)
    assert not np.array_equal(a, c)


def test_top_k_samples_only_among_the_k_most_probable(tiny):
    """Every sampled token ranks among the top 3 of the full forward's logits at its position."""
    cfg = tiny()
    model = build_model(cfg, seed=2)
    prompt = _tokens(cfg, (8, 2), 8)
    tokens = generate(model, prompt, 30, jax.random.key(3), temperature=2.0, top_k=3)
    logits = np.asarray(model(tokens[:, :-1]).logits)[:, 1:]  # predicting tokens 2..29
    sampled = np.asarray(tokens)[:, 2:]
    rank = (logits > np.take_along_axis(logits, sampled[..., None], -1)).sum(-1)
    assert rank.max() < 3
    assert (rank > 0).any()  # temperature 2 does not collapse to greedy


def test_next_token_temperature_sharpens_toward_argmax():
    """Sampling frequencies match softmax(logits / T) (float64 reference), for T = 0.5 and 1."""
    logits = jnp.asarray([[2.0, 1.0, 0.0, -1.0]])
    keys = jax.random.split(jax.random.key(0), 20000)
    for temperature in (0.5, 1.0):
        draws = np.asarray(jax.vmap(lambda k, t=temperature: next_token(logits, k, t, None))(keys))[:, 0]
        freq = np.bincount(draws, minlength=4) / len(draws)
        z = np.asarray(logits[0], np.float64) / temperature
        want = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        np.testing.assert_allclose(freq, want, atol=0.015)


def test_generate_rejects_a_prompt_as_long_as_the_output(tiny):
    cfg = tiny()
    model = build_model(cfg)
    with pytest.raises(ValueError, match="shorter than length"):
        generate(model, _tokens(cfg, (1, 8)), 8, jax.random.key(0))
