"""Shared fixtures for the model tests: tiny configs, parameter plumbing, and an independent
numpy float64 reference of the Llama 4 text decoder (written from the architecture notes in
shared/design/LLAMA4.md, not from distill's code).

Fixtures (helpers are exposed as fixtures so that test modules need not import this file):
- `tiny`: `tiny(**overrides) -> ModelConfig`, a CPU-sized config (hidden 32, vocab 64).
- `ref`: the numpy reference (`ref.forward`, `ref.moe`, `ref.swiglu`, ...).
- `helpers`: read and write parameters (`pure`, `load`, `layer`), differentiate (`value_and_grads`),
  run jitted (`forward`), compare (`assert_close`, `assert_trees_close`).
"""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from distill.model import ModelConfig

TINY = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=32,
    intermediate_size_mlp=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    num_local_experts=4,
    num_experts_per_tok=2,
    attention_chunk_size=8,
    floor_scale=4,
    attn_scale=0.5,
    rope_theta=100.0,
    initializer_range=0.1,
)


def tiny_config(**overrides) -> ModelConfig:
    return ModelConfig(**{**TINY, **overrides})


@pytest.fixture
def tiny():
    return tiny_config


# --------------------------------------------------------------------------- parameters


def pure(model_or_state) -> dict:
    """Parameters as a nested dict of float64 numpy arrays (nnx.List indices become int keys)."""
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state, nnx.Param)
    return jax.tree.map(lambda a: np.asarray(a, np.float64), nnx.to_pure_dict(state))


def load(model, values: dict) -> None:
    """Write a nested dict of arrays (same structure as `pure(model)`) into the model's params."""
    state = nnx.state(model, nnx.Param)
    current = nnx.to_pure_dict(state)
    new = jax.tree.map(lambda old, v: jnp.asarray(v, old.dtype).reshape(old.shape), current, values)
    nnx.replace_by_pure_dict(state, new)
    nnx.update(model, state)


def value_and_grads(model, loss_fn, *args, jit: bool = True, **kwargs):
    """(loss, output, grads as a float64 dict) of `loss_fn(model(*args, **kwargs))` w.r.t. every Param.

    Differentiates the split state (graphdef static, params differentiated, the rest closed over),
    under `jax.jit` by default (one compile is much cheaper than hundreds of eager op compiles).
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def f(p):
        out = nnx.merge(graphdef, p, rest)(*args, **kwargs)
        return loss_fn(out), out

    run = jax.value_and_grad(f, has_aux=True)
    (loss, out), grads = (jax.jit(run) if jit else run)(params)
    return loss, out, pure(grads)


def assert_close(actual, expected, tol: float, what: str = "") -> None:
    """max |actual - expected| <= tol * max |expected| (a scale-free, per-array tolerance)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    scale = max(np.max(np.abs(expected)), 1e-30)
    err = np.max(np.abs(actual - expected)) / scale
    assert err <= tol, f"{what}: max abs error {err:.3g} x max|expected| ({scale:.3g}) > {tol}"


def assert_trees_close(actual: dict, expected: dict, tol: float) -> None:
    flat_a = dict(jax.tree_util.tree_leaves_with_path(actual))
    flat_e = dict(jax.tree_util.tree_leaves_with_path(expected))
    assert flat_a.keys() == flat_e.keys()
    for path, e in flat_e.items():
        assert_close(flat_a[path], e, tol, jax.tree_util.keystr(path))


def layer_params(p: dict, cfg: ModelConfig, i: int) -> dict:
    """Parameters of decoder layer i in an UNSCANNED model's pure dict."""
    period = cfg.layer_period
    groups = cfg.num_hidden_layers // period
    if i < groups * period:
        return p["groups"][i // period]["layers"][i % period]
    return p["tail"]["layers"][i - groups * period]


def scanned_values(unscanned: dict, groups: int) -> dict:
    """An unscanned model's params laid out as the scanned model's: groups stacked on a leading axis."""
    out = {k: v for k, v in unscanned.items() if k != "groups"}
    out["scanned"] = jax.tree.map(lambda *xs: np.stack(xs), *[unscanned["groups"][g] for g in range(groups)])
    return out


@nnx.jit
def jit_forward(model, tokens_bs, positions=None, segment_ids=None):
    """The model's forward pass under `nnx.jit` (one compile per config and shape)."""
    return model(tokens_bs, positions=positions, segment_ids=segment_ids)


@pytest.fixture
def helpers():
    return types.SimpleNamespace(
        pure=pure, load=load, value_and_grads=value_and_grads, layer=layer_params, forward=jit_forward,
        scanned_values=scanned_values,
        assert_close=assert_close, assert_trees_close=assert_trees_close,
    )  # fmt: skip


# --------------------------------------------------------------------------- numpy reference


def silu(x):
    return x / (1.0 + np.exp(-x))


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def softmax(x, axis=-1):
    x = x - np.max(x, axis=axis, keepdims=True)
    e = np.exp(x)
    return e / np.sum(e, axis=axis, keepdims=True)


def rms(x, eps, weight=None):
    y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return y if weight is None else y * weight


def swiglu(x, gate, up, down):
    return (silu(x @ gate) * (x @ up)) @ down


def rope(x_bshk, pos_bs, theta):
    """Rotate ADJACENT pairs as complex numbers x[0::2] + i x[1::2] (Llama 4 convention)."""
    hd = x_bshk.shape[-1]
    inv_freq = 1.0 / theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    angle = pos_bs[:, :, None, None].astype(np.float64) * inv_freq  # [B,S,1,hd/2]
    z = (x_bshk[..., 0::2] + 1j * x_bshk[..., 1::2]) * np.exp(1j * angle)
    out = np.empty_like(x_bshk)
    out[..., 0::2], out[..., 1::2] = z.real, z.imag
    return out


def attention(x_bsd, p, cfg: ModelConfig, uses_rope: bool, pos_bs, seg_bs=None):
    h, kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q = np.einsum("bsd,dhk->bshk", x_bsd, p["q"])
    k = np.einsum("bsd,dhk->bshk", x_bsd, p["k"])
    v = np.einsum("bsd,dhk->bshk", x_bsd, p["v"])
    if uses_rope:
        q, k = rope(q, pos_bs, cfg.rope_theta), rope(k, pos_bs, cfg.rope_theta)
        if cfg.use_qk_norm:
            q, k = rms(q, cfg.rms_norm_eps), rms(k, cfg.rms_norm_eps)
    elif cfg.attn_temperature_tuning:
        scale = np.log1p(np.floor((pos_bs + 1.0) / cfg.floor_scale)) * cfg.attn_scale + 1.0
        q = q * scale[:, :, None, None]
    k, v = np.repeat(k, h // kv, axis=2), np.repeat(v, h // kv, axis=2)  # HF repeat_kv
    logits = np.einsum("bqhk,bshk->bhqs", q, k) * hd**-0.5
    mask = pos_bs[:, None, :] <= pos_bs[:, :, None]  # [B, q, s]
    if uses_rope and cfg.attention_chunk_size is not None:
        c = cfg.attention_chunk_size
        mask &= (pos_bs[:, None, :] // c) == (pos_bs[:, :, None] // c)
    if seg_bs is not None:
        mask &= seg_bs[:, None, :] == seg_bs[:, :, None]
    probs = softmax(np.where(mask[:, None], logits, -np.inf))
    out = np.einsum("bhqs,bshk->bqhk", probs, v)
    return np.einsum("bqhk,hkd->bqd", out, p["o"])


def moe(x_nd, p, cfg: ModelConfig, capacity: int | None = None):
    """Llama4TextMoe (router 'llama4') or the softmax router, per token, in float64.

    Returns (out [N, d], experts [N, k], kept [N, k] bool). With `capacity`, an expert keeps its
    first `capacity` assignments in the order (choice 0 of every token in token order, then
    choice 1, ...); the dropped ones contribute nothing.
    """
    n = x_nd.shape[0]
    k = cfg.num_experts_per_tok
    logits = x_nd @ p["router"]
    experts = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
    top = np.take_along_axis(logits, experts, axis=-1)
    if cfg.router == "llama4":
        weights = sigmoid(top)
    else:
        weights = np.take_along_axis(softmax(logits), experts, axis=-1)
        if cfg.router_renormalize:
            weights = weights / weights.sum(-1, keepdims=True)
    kept = np.ones((n, k), bool)
    if capacity is not None:
        used = np.zeros(cfg.num_local_experts, int)
        for j in range(k):
            for t in range(n):
                e = experts[t, j]
                kept[t, j] = used[e] < capacity
                used[e] += 1
    se = p["shared_expert"]
    out = swiglu(x_nd, se["gate"], se["up"], se["down"])
    for t in range(n):
        for j in range(k):
            if not kept[t, j]:
                continue
            e, w = experts[t, j], weights[t, j]
            if cfg.router == "llama4":  # the score scales the expert's INPUT
                out[t] += swiglu(x_nd[t] * w, p["gate"][e], p["up"][e], p["down"][e])
            else:
                out[t] += w * swiglu(x_nd[t], p["gate"][e], p["up"][e], p["down"][e])
    return out, experts, kept


def forward(p: dict, cfg: ModelConfig, tokens_bs, positions_bs=None, segment_ids_bs=None):
    """Logits [B, S, V] of an UNSCANNED model's parameters `p` (float64 pure dict)."""
    tokens_bs = np.asarray(tokens_bs)
    b, s = tokens_bs.shape
    pos = np.broadcast_to(np.arange(s), (b, s)) if positions_bs is None else np.asarray(positions_bs)
    seg = None if segment_ids_bs is None else np.asarray(segment_ids_bs)
    eps = cfg.rms_norm_eps
    x = p["embed"][tokens_bs]
    for i in range(cfg.num_hidden_layers):
        lp = layer_params(p, cfg, i)
        x = x + attention(rms(x, eps, lp["input_norm"]["weight"]), lp["attention"], cfg,
                          cfg.layer_uses_rope[i], pos, seg)
        y = rms(x, eps, lp["post_attention_norm"]["weight"])
        ff = lp["feed_forward"]
        if cfg.layer_is_moe[i]:
            y = moe(y.reshape(b * s, -1), ff, cfg)[0].reshape(b, s, -1)
        else:
            y = swiglu(y, ff["gate"], ff["up"], ff["down"])
        x = x + y
    x = rms(x, eps, p["final_norm"]["weight"])
    head = p["embed"].T if cfg.tie_word_embeddings else p["lm_head"]
    return x @ head


@pytest.fixture
def ref():
    return types.SimpleNamespace(
        silu=silu, sigmoid=sigmoid, softmax=softmax, rms=rms, swiglu=swiglu, rope=rope,
        attention=attention, moe=moe, forward=forward,
    )  # fmt: skip
