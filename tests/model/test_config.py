"""ModelConfig: validation errors name the field, the layer plan, the scan period, parameter counts."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from distill.errors import ConfigError
from distill.model import ModelConfig, RopeScaling, build_model


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)
    with pytest.raises(ValueError):
        ModelConfig(num_hidden_layers=0)


@pytest.mark.parametrize(
    "overrides, field, also",
    [
        (dict(hidden_size=30, num_attention_heads=4), "num_attention_heads", ["hidden_size", "head_dim"]),
        (dict(num_attention_heads=4, num_key_value_heads=3), "num_key_value_heads", ["num_attention_heads"]),
        (dict(num_local_experts=4, num_experts_per_tok=5), "num_experts_per_tok", ["num_local_experts"]),
        (dict(router="topk"), "router", ["llama4", "softmax"]),
        (dict(dispatch="scatter"), "dispatch", ["auto", "sorted", "ragged", "dense", "capacity"]),
        (dict(dtype="fp8"), "dtype", ["float32", "bfloat16", "float16"]),
        (dict(param_dtype="float64"), "param_dtype", ["float32", "bfloat16", "float16"]),
        (dict(remat="some"), "remat", ["none", "full", "dots"]),
        (dict(num_hidden_layers=4, moe_layers=(1, 4)), "moe_layers", ["4"]),
        (dict(num_hidden_layers=4, moe_layers=(-1,)), "moe_layers", ["-1"]),
        (dict(num_hidden_layers=4, no_rope_layers=(1, 1, 0)), "no_rope_layers", ["4"]),
        (dict(num_hidden_layers=2, no_rope_layers=(1, 2)), "no_rope_layers", []),
        (dict(num_hidden_layers=0), "num_hidden_layers", []),
        (dict(hidden_size=32, num_attention_heads=4, head_dim=7), "head_dim", []),
        (dict(capacity_factor=0.0), "capacity_factor", []),
        (dict(dispatch_tile=0), "dispatch_tile", []),
        (dict(attention_chunk_size=0), "attention_chunk_size", []),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_invalid_field_is_named(overrides, field, also):
    with pytest.raises(ConfigError) as info:
        ModelConfig(**overrides)
    message = str(info.value)
    assert message.startswith(f"{field}="), message
    for word in also:
        assert word in message, (word, message)


def test_head_dim_makes_indivisible_heads_legal():
    cfg = ModelConfig(hidden_size=30, num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    assert cfg.head_dim == 8
    assert ModelConfig(hidden_size=32, num_attention_heads=4).head_dim == 8


def test_default_rope_plan_nope_every_fourth_layer():
    cfg = ModelConfig(num_hidden_layers=8)
    nope = [i for i, rope in enumerate(cfg.layer_uses_rope) if not rope]
    assert nope == [3, 7]
    cfg = ModelConfig(num_hidden_layers=6, no_rope_layer_interval=2)
    assert [i for i, rope in enumerate(cfg.layer_uses_rope) if not rope] == [1, 3, 5]


def test_explicit_rope_plan_one_means_rope():
    cfg = ModelConfig(num_hidden_layers=3, no_rope_layers=(1, 0, 1))
    assert cfg.layer_uses_rope == (True, False, True)


@pytest.mark.parametrize(
    "step, expected",
    [(1, list(range(8))), (2, [1, 3, 5, 7]), (3, [2, 5]), (8, [7]), (9, [])],
)
def test_moe_interleave_plan(step, expected):
    cfg = ModelConfig(num_hidden_layers=8, interleave_moe_layer_step=step)
    assert [i for i, moe in enumerate(cfg.layer_is_moe) if moe] == expected
    assert cfg.num_moe_layers == len(expected)


def test_explicit_moe_layers_override_step():
    cfg = ModelConfig(num_hidden_layers=8, interleave_moe_layer_step=2, moe_layers=(0, 5, 6))
    assert [i for i, moe in enumerate(cfg.layer_is_moe) if moe] == [0, 5, 6]
    assert ModelConfig(num_hidden_layers=4, moe_layers=()).num_moe_layers == 0


@pytest.mark.parametrize(
    "overrides, period",
    [
        (dict(num_hidden_layers=8), 4),  # NoPE every 4th, all MoE
        (dict(num_hidden_layers=8, interleave_moe_layer_step=2), 4),  # step 2 inside interval 4
        (dict(num_hidden_layers=8, interleave_moe_layer_step=2, no_rope_layer_interval=2), 2),
        (dict(num_hidden_layers=8, no_rope_layers=(1,) * 8), 1),  # all RoPE, all MoE
        (dict(num_hidden_layers=12, interleave_moe_layer_step=3), 12),  # lcm(3, 4)
        (dict(num_hidden_layers=8, moe_layers=(0, 1, 5)), 8),  # irregular: full length
        (dict(num_hidden_layers=5, interleave_moe_layer_step=2, no_rope_layer_interval=2), 2),  # tail of 1
        (dict(num_hidden_layers=3), 1),  # interval 4 longer than the model: all RoPE
        (dict(num_hidden_layers=3, no_rope_layer_interval=3), 3),  # one group, no repeat
    ],
)
def test_layer_period(overrides, period):
    cfg = ModelConfig(**overrides)
    assert cfg.layer_period == period
    plan = list(zip(cfg.layer_uses_rope, cfg.layer_is_moe))
    assert all(plan[i] == plan[i % period] for i in range(len(plan)))


def _count_params(model) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(tie_word_embeddings=True),
        dict(hidden_size=24, num_attention_heads=4, num_key_value_heads=1, head_dim=10),
        dict(num_hidden_layers=5, interleave_moe_layer_step=2, no_rope_layer_interval=2),
        dict(num_hidden_layers=5, interleave_moe_layer_step=2, no_rope_layer_interval=2, scan_layers=True),
        dict(num_hidden_layers=3, moe_layers=()),
        dict(num_local_experts=3, num_experts_per_tok=3),
    ],
    ids=["default", "tied", "head_dim", "interleaved", "scanned", "no_moe", "k_equals_e"],
)
def test_param_counts_match_built_model(tiny, overrides):
    cfg = tiny(**overrides)
    counts = cfg.param_counts()
    # nnx.eval_shape runs the real constructor without materialising (or compiling) the init.
    assert counts["total"] == _count_params(nnx.eval_shape(lambda: build_model(cfg)))
    # Independently: each MoE layer keeps E - k experts (3 * d * f weights each) idle per token.
    d, f = cfg.hidden_size, cfg.intermediate_size
    idle = cfg.num_moe_layers * (cfg.num_local_experts - cfg.num_experts_per_tok) * 3 * d * f
    assert counts["total"] - counts["active"] == idle


def test_active_below_total_when_experts_exceed_top_k(tiny):
    counts = tiny(num_local_experts=8, num_experts_per_tok=2).param_counts()
    assert 0 < counts["active"] < counts["total"]
    counts = tiny(num_local_experts=2, num_experts_per_tok=2).param_counts()
    assert counts["active"] == counts["total"]


def test_to_dict_round_trips(tiny):
    cfg = tiny(moe_layers=(1,), no_rope_layers=(1, 0), dispatch="sorted", rope_scaling=dict(factor=4.0))
    again = ModelConfig(**cfg.to_dict())
    assert again == cfg
    assert again.rope_scaling == RopeScaling(factor=4.0)
    assert again.layer_is_moe == cfg.layer_is_moe and again.layer_uses_rope == cfg.layer_uses_rope


def _xla_forward_flops(cfg: ModelConfig, seq_len: int) -> float:
    graph, state = nnx.split(build_model(cfg))
    compiled = jax.jit(lambda s, t: nnx.merge(graph, s)(t)).lower(state, jnp.zeros((1, seq_len), jnp.int32)).compile()
    analysis = compiled.cost_analysis()
    return (analysis[0] if isinstance(analysis, list) else analysis)["flops"]


def test_forward_flops_match_xla_cost_analysis(tiny):
    # One token, top-2 of 2 experts computed densely: XLA's count of the compiled forward is every matmul
    # plus the elementwise work (norms, RoPE, SiLU, softmax), which the formula leaves out;
    # d=128 keeps that share under 2%.
    cfg = tiny(num_local_experts=2, num_experts_per_tok=2, dispatch="dense", num_hidden_layers=4,
               interleave_moe_layer_step=2, hidden_size=128, intermediate_size=256, intermediate_size_mlp=384)
    xla = _xla_forward_flops(cfg, 1)
    assert 0.98 * xla < cfg.forward_flops_per_token(1) <= xla


def test_forward_flops_attention_counts_the_keys_each_position_sees(tiny):
    # Independently of the formula: build the causal (and chunked) masks and count their ones.
    seq_len, chunk = 20, 6
    cfg = tiny(num_hidden_layers=4, attention_chunk_size=chunk, no_rope_layer_interval=4)
    no_attention = cfg.forward_flops_per_token(seq_len) - 4 * cfg.num_attention_heads * cfg.head_dim * sum(
        _mask(seq_len, chunk if rope else None).sum() / seq_len for rope in cfg.layer_uses_rope)
    causal = np.tril(np.ones((seq_len, seq_len)))
    assert cfg.forward_flops_per_token(seq_len) > cfg.forward_flops_per_token(1)
    assert no_attention == pytest.approx(cfg.forward_flops_per_token(1) - 4 * cfg.num_attention_heads
                                         * cfg.head_dim * cfg.num_hidden_layers, rel=1e-12)
    assert causal.sum() / seq_len == (seq_len + 1) / 2


def _mask(seq_len: int, chunk: int | None) -> np.ndarray:
    rows, cols = np.indices((seq_len, seq_len))
    mask = cols <= rows
    if chunk:
        mask &= rows // chunk == cols // chunk
    return mask
