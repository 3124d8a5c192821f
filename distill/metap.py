"""MetaP-style hyper-parameter transfer: per-parameter learning-rate and initialisation-scale
multipliers by width and depth, relative to a base model, so that a learning rate tuned on the
base carries over to a wider or deeper one.

Llama 4's MetaP is unpublished beyond "per-layer learning rates and initialization scales"; this
is muP for Adam (Yang et al., Tensor Programs V, arXiv:2203.03466, Table 3) with base shapes as in
the `mup` package: each parameter's fan-in and fan-out are read from its logical axes (the
`embed` axis is the input when it comes first, the output when it comes last; an `experts` axis
is neither), and compared with the same parameter of the base model (m = fan / base fan):

| kind | fan-in | fan-out | init std | Adam learning rate |
|---|---|---|---|---|
| hidden (attention, MLP, experts) | grows | grows | x m_in^-1/2 | x 1 / m_in |
| output-like (LM head, router) | grows | fixed | x 1 / m_in | x 1 / m_in |
| input-like (embedding), vectors (norms), fixed | fixed | any | x 1 | x 1 |

Depth (d = layers / base layers): the projections that write into the residual stream (attention
`o`, MLP and expert `down`) start d^-1/2 smaller, as in GPT-2's residual scaling. The forward
pass is unchanged (the model stays equal to transformers' Llama 4); at the base shapes every
multiplier is 1.
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from distill.configtools import from_dict
from distill.errors import ConfigError
from distill.model import ModelConfig, build_model
from distill.model.layout import param_path

RESIDUAL_OUTPUTS = ("o", "down")


def base_config(cfg: ModelConfig, fields: dict | None, where: str) -> ModelConfig | None:
    """The base model: `cfg` with `fields` (`optim.metap_base`) changed; None when not set."""
    if not fields:
        return None
    return from_dict(ModelConfig, {**cfg.to_dict(), **fields}, where)


def _fans(shape: tuple[int, ...], axes: tuple) -> tuple[int, int] | None:
    """(fan-in, fan-out) of a matrix-like parameter, None for a vector (norm scale)."""
    kept = [(size, name) for size, name in zip(shape, axes) if name != "experts"]
    if len(kept) < 2:
        return None
    sizes, names = [s for s, _ in kept], [n for _, n in kept]
    if names[-1] == "embed":
        return math.prod(sizes[:-1]), sizes[-1]
    return sizes[0], math.prod(sizes[1:])


def _shapes_and_axes(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple]]:
    """{parameter path: (shape, logical axes)} of a model built from `cfg` (shapes only)."""
    state = nnx.state(nnx.eval_shape(lambda: build_model(cfg)), nnx.Param)
    specs = nnx.get_partition_spec(state)
    shapes = {param_path(path): tuple(value.shape) for path, value in jax.tree_util.tree_leaves_with_path(state)}
    axes = {param_path(path): tuple(spec) for path, spec in jax.tree_util.tree_leaves_with_path(
        specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))}
    return {path: (shape, axes[path]) for path, shape in shapes.items()}


def _role(path: str, axes: tuple) -> tuple[str, tuple]:
    """A parameter's place in the layer plan, whatever layer it is in (for depth: layers differ in count)."""
    return re.sub(r"/\d+/", "/#/", path), axes


def multipliers(cfg: ModelConfig, base: ModelConfig) -> dict[str, tuple[float, float]]:
    """{parameter path: (init std multiplier, learning-rate multiplier)} of `cfg` against `base`."""
    ours = _shapes_and_axes(cfg)
    theirs = {_role(path, axes): shape for path, (shape, axes) in _shapes_and_axes(base).items()}
    unmatched = [path for path, (_, axes) in ours.items() if _role(path, axes) not in theirs]
    if unmatched:
        raise ConfigError(f"optim.metap_base: the base model has no parameter like {unmatched[0]}; the base may "
                          "differ in widths and layer count only (same layer plan, experts and vocabulary)")
    depth = cfg.num_hidden_layers / base.num_hidden_layers
    out = {}
    for path, (shape, axes) in ours.items():
        fans, base_fans = _fans(shape, axes), _fans(theirs[_role(path, axes)], axes)
        init, lr = 1.0, 1.0
        if fans is not None:
            m_in, m_out = fans[0] / base_fans[0], fans[1] / base_fans[1]
            if m_in != 1 and m_out != 1:  # hidden
                init, lr = m_in ** -0.5, 1 / m_in
            elif m_in != 1:  # output-like: its fan-out (vocabulary, experts) stays
                init, lr = 1 / m_in, 1 / m_in
            if path.split("/")[-1] in RESIDUAL_OUTPUTS:
                init *= depth ** -0.5
        out[path] = (init, lr)
    return out


def _by_path(params, values: dict[str, float]):
    """A tree like `params` holding `values[path]` per leaf."""
    return jax.tree_util.tree_map_with_path(lambda path, _: values[param_path(path)], params)


def scale_init(model, base: ModelConfig) -> None:
    """Multiply `model`'s freshly initialised parameters by their init multipliers, in place."""
    params = nnx.state(model, nnx.Param)
    scales = _by_path(params, {k: init for k, (init, _) in multipliers(model.cfg, base).items()})
    nnx.update(model, jax.tree.map(lambda p, s: p * jnp.asarray(s, p.dtype), params, scales))


def scale_learning_rates(cfg: ModelConfig, base: ModelConfig) -> optax.GradientTransformation:
    """An optax stage after the optimizer: each parameter's update times its learning-rate multiplier."""
    lrs = {k: lr for k, (_, lr) in multipliers(cfg, base).items()}

    def update(updates, state, params=None):
        return jax.tree.map(lambda u, m: u * jnp.asarray(m, u.dtype), updates, _by_path(updates, lrs)), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)
