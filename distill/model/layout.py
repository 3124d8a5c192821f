"""One flat, layout-independent view of a model's parameters.

Keys are `embed`, `lm_head`, `final_norm/weight` and `layers/<i>/<path>` with `i` the absolute
layer index, whether the model stores its layers scanned (stacked per group) or unrolled. HF
conversion and student initialisation from a teacher read and write models through this view.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from distill.model.transformer import Transformer


def param_path(path) -> str:
    """A parameter's tree path as "a/b/c" (the leaf's `value` left out)."""
    keys = [getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path]
    return "/".join(str(k) for k in keys if k != "value")


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, path + "/"))
        else:
            out[path] = value
    return out


def _layer_slots(model: Transformer):
    """(location, first layer index, stride over the stacked axis or None) for every layer group."""
    cfg = model.cfg
    period = cfg.layer_period
    slots = []
    if model.scanned is not None:
        slots.append((("scanned",), 0, period))
    for g in range(len(model.groups)):
        slots.append((("groups", g), g * period, None))
    if model.tail is not None:
        slots.append((("tail",), cfg.num_hidden_layers - len(model.tail.layers), None))
    return slots


def _get(tree: dict, path: tuple):
    for key in path:
        tree = tree[key] if key in tree else tree[str(key)]
    return tree


def canonical_params(model: Transformer) -> dict[str, np.ndarray]:
    """All parameters as numpy arrays under layout-independent keys."""
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    flat = {k: np.asarray(v) for k, v in _flatten({k: v for k, v in pure.items()
                                                   if k in ("embed", "lm_head", "final_norm")}).items()}
    for location, first, stride in _layer_slots(model):
        layers = _get(pure, location)["layers"]
        for j, layer in layers.items():
            for path, value in _flatten(layer).items():
                value = np.asarray(value)
                if stride is None:
                    flat[f"layers/{first + int(j)}/{path}"] = value
                else:
                    for g in range(value.shape[0]):
                        flat[f"layers/{first + g * stride + int(j)}/{path}"] = value[g]
    return flat


def assign_canonical_params(model: Transformer, params: dict[str, np.ndarray]) -> None:
    """Write `params` (keys as `canonical_params` returns them) into `model`, in place.

    Raises KeyError naming missing or unexpected keys and ValueError naming a shape mismatch.
    """
    expected = canonical_params(model)
    missing = sorted(set(expected) - set(params))
    unexpected = sorted(set(params) - set(expected))
    if missing or unexpected:
        raise KeyError(f"parameter keys do not match the model: missing {missing[:8]}, unexpected {unexpected[:8]}")
    for key, value in params.items():
        if tuple(np.shape(value)) != expected[key].shape:
            raise ValueError(f"parameter {key}: shape {tuple(np.shape(value))} does not match the model's "
                             f"{expected[key].shape}")
    state = nnx.state(model, nnx.Param)
    pure = nnx.to_pure_dict(state)
    dtype = jnp.dtype(model.cfg.param_dtype)
    for key in ("embed", "lm_head"):
        if key in pure:
            pure[key] = jnp.asarray(params[key], dtype)
    pure["final_norm"]["weight"] = jnp.asarray(params["final_norm/weight"], dtype)
    for location, first, stride in _layer_slots(model):
        layers = _get(pure, location)["layers"]
        for j, layer in layers.items():
            for path in _flatten(layer):
                *parents, leaf = path.split("/")
                node = _get(layer, tuple(parents))
                if stride is None:
                    value = params[f"layers/{first + int(j)}/{path}"]
                else:
                    groups = node[leaf].shape[0]
                    value = np.stack([params[f"layers/{first + g * stride + int(j)}/{path}"] for g in range(groups)])
                node[leaf] = jnp.asarray(value, dtype)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
