"""Conversion to and from `transformers`' Llama 4 text model (`Llama4ForCausalLM`).

`from_hf` accepts an in-memory `Llama4ForCausalLM` / `Llama4ForConditionalGeneration` (its text
part) or a `save_pretrained` directory (safetensors; pickle files only with `allow_pickle=True`,
and then loaded with `weights_only=True`). `to_hf` writes a directory that
`Llama4ForCausalLM.from_pretrained` loads.

Weight layout (HF `nn.Linear` stores `[out, in]`; ours `[in, ...out]`):
    q_proj [H*D, d]            -> attention/q [d, H, D]
    k_proj, v_proj [K*D, d]    -> attention/k, v [d, K, D]
    o_proj [d, H*D]            -> attention/o [H, D, d]
    router [E, d]              -> feed_forward/router [d, E]
    experts.gate_up_proj [E, d, 2F] (gate first) -> feed_forward/gate, up [E, d, F]
    experts.down_proj [E, F, d]                  -> feed_forward/down [E, F, d]
    *_proj (dense, shared expert) [out, in]      -> transposed
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from distill.errors import ConfigError
from distill.model import ModelConfig, RopeScaling, Transformer, build_model
from distill.model.layout import assign_canonical_params, canonical_params


class HFConversionError(ConfigError):
    """A Hugging Face checkpoint or config cannot be converted; the message names what and why."""


# ---------------------------------------------------------------- config


def config_from_hf(hf_config, **overrides) -> ModelConfig:
    """Our `ModelConfig` from a `Llama4TextConfig`, a `Llama4Config` (its text part) or a dict."""
    c = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
    if c.get("model_type") == "llama4" or "text_config" in c:
        c = c["text_config"] if isinstance(c["text_config"], dict) else c["text_config"].to_dict()
    if c.get("model_type", "llama4_text") != "llama4_text":
        raise HFConversionError(f"model_type={c.get('model_type')!r}: expected a Llama 4 text model (llama4_text)")
    if c.get("hidden_act", "silu") != "silu":
        raise HFConversionError(f"hidden_act={c['hidden_act']!r}: only silu is supported")
    if c.get("attention_bias"):
        raise HFConversionError("attention_bias=True: attention projections with bias are not supported")
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    rope_theta = rope.get("rope_theta", c.get("rope_theta", 500000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "llama3":
        scaling = RopeScaling(
            factor=float(rope["factor"]), low_freq_factor=float(rope["low_freq_factor"]),
            high_freq_factor=float(rope["high_freq_factor"]),
            original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
        )  # fmt: skip
    elif rope_type == "default":
        scaling = None
    else:
        raise HFConversionError(f"rope_parameters.rope_type={rope_type!r}: supported are default and llama3")
    layer_types = c.get("layer_types")
    if layer_types and c.get("no_rope_layers"):
        implied = ["chunked_attention" if r else "full_attention" for r in c["no_rope_layers"]]
        if list(layer_types) != implied[: len(layer_types)]:
            raise HFConversionError("layer_types disagree with no_rope_layers; only the Llama 4 pairing is supported")
    fields = dict(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
        intermediate_size_mlp=c["intermediate_size_mlp"], num_hidden_layers=c["num_hidden_layers"],
        num_attention_heads=c["num_attention_heads"],
        num_key_value_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
        head_dim=c.get("head_dim"), max_position_embeddings=c.get("max_position_embeddings", 131072),
        num_local_experts=c["num_local_experts"], num_experts_per_tok=c["num_experts_per_tok"],
        moe_layers=tuple(c["moe_layers"]) if c.get("moe_layers") is not None else None,
        interleave_moe_layer_step=c.get("interleave_moe_layer_step", 1),
        no_rope_layers=tuple(c["no_rope_layers"]) if c.get("no_rope_layers") else None,
        no_rope_layer_interval=c.get("no_rope_layer_interval", 4),
        attention_chunk_size=c.get("attention_chunk_size"), use_qk_norm=c.get("use_qk_norm", True),
        attn_temperature_tuning=bool(c.get("attn_temperature_tuning", True)),
        floor_scale=int(c.get("floor_scale", 8192)), attn_scale=float(c.get("attn_scale", 0.1)),
        rope_theta=float(rope_theta), rope_scaling=scaling, rms_norm_eps=float(c.get("rms_norm_eps", 1e-5)),
        tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        initializer_range=float(c.get("initializer_range", 0.02)),
    )  # fmt: skip
    fields.update(overrides)
    return ModelConfig(**fields)


def config_to_hf(cfg: ModelConfig):
    """The `Llama4TextConfig` that computes what `cfg` computes."""
    from transformers import Llama4TextConfig

    if cfg.router != "llama4":
        raise HFConversionError(f"router={cfg.router!r}: transformers' Llama 4 only has the llama4 router")
    if cfg.vision is not None:
        raise HFConversionError("vision: our image encoder is not Llama 4's vision tower, so it has no "
                                "transformers form; export a text-only model (vision: null)")
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rope = {"rope_type": "llama3", "rope_theta": cfg.rope_theta, **dataclasses.asdict(cfg.rope_scaling)}
    return Llama4TextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        intermediate_size_mlp=cfg.intermediate_size_mlp, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.max_position_embeddings,
        num_local_experts=cfg.num_local_experts, num_experts_per_tok=cfg.num_experts_per_tok,
        moe_layers=[i for i, moe in enumerate(cfg.layer_is_moe) if moe],
        interleave_moe_layer_step=cfg.interleave_moe_layer_step,
        no_rope_layers=[int(r) for r in cfg.layer_uses_rope], no_rope_layer_interval=cfg.no_rope_layer_interval,
        attention_chunk_size=cfg.attention_chunk_size, use_qk_norm=cfg.use_qk_norm,
        attn_temperature_tuning=cfg.attn_temperature_tuning, floor_scale=cfg.floor_scale,
        attn_scale=cfg.attn_scale, rope_parameters=rope, rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings, initializer_range=cfg.initializer_range,
    )  # fmt: skip


# ---------------------------------------------------------------- weights


def _layer_prefix(i: int) -> str:
    return f"model.layers.{i}."


def params_from_hf_state(cfg: ModelConfig, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Our canonical parameter dict from HF tensor names (as numpy float32 arrays)."""
    d, h, k, hd, f = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, \
        cfg.intermediate_size
    used: set[str] = set()

    def take(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in state:
            raise HFConversionError(f"tensor {name} is missing from the checkpoint")
        value = np.asarray(state[name], np.float32)
        if value.shape != shape:
            raise HFConversionError(f"tensor {name} has shape {value.shape}, the config implies {shape}")
        used.add(name)
        return value

    out = {"embed": take("model.embed_tokens.weight", (cfg.vocab_size, d)),
           "final_norm/weight": take("model.norm.weight", (d,))}
    if not cfg.tie_word_embeddings:
        out["lm_head"] = take("lm_head.weight", (cfg.vocab_size, d)).T
    for i in range(cfg.num_hidden_layers):
        p, ours = _layer_prefix(i), f"layers/{i}/"
        attn = p + "self_attn."
        out[ours + "attention/q"] = take(attn + "q_proj.weight", (h * hd, d)).T.reshape(d, h, hd)
        out[ours + "attention/k"] = take(attn + "k_proj.weight", (k * hd, d)).T.reshape(d, k, hd)
        out[ours + "attention/v"] = take(attn + "v_proj.weight", (k * hd, d)).T.reshape(d, k, hd)
        out[ours + "attention/o"] = take(attn + "o_proj.weight", (d, h * hd)).T.reshape(h, hd, d)
        out[ours + "input_norm/weight"] = take(p + "input_layernorm.weight", (d,))
        out[ours + "post_attention_norm/weight"] = take(p + "post_attention_layernorm.weight", (d,))
        ff = p + "feed_forward."
        if cfg.layer_is_moe[i]:
            e = cfg.num_local_experts
            gate_up = take(ff + "experts.gate_up_proj", (e, d, 2 * f))
            out[ours + "feed_forward/gate"] = gate_up[..., :f]
            out[ours + "feed_forward/up"] = gate_up[..., f:]
            out[ours + "feed_forward/down"] = take(ff + "experts.down_proj", (e, f, d))
            out[ours + "feed_forward/router"] = take(ff + "router.weight", (e, d)).T
            mlp, width, ours_mlp = ff + "shared_expert.", f, ours + "feed_forward/shared_expert/"
        else:
            mlp, width, ours_mlp = ff, cfg.intermediate_size_mlp, ours + "feed_forward/"
        out[ours_mlp + "gate"] = take(mlp + "gate_proj.weight", (width, d)).T
        out[ours_mlp + "up"] = take(mlp + "up_proj.weight", (width, d)).T
        out[ours_mlp + "down"] = take(mlp + "down_proj.weight", (d, width)).T
    extra = sorted(set(state) - used - {"lm_head.weight"})
    if extra:
        raise HFConversionError(f"checkpoint has tensors the config does not explain, e.g. {extra[:5]}")
    return out


def params_to_hf_state(cfg: ModelConfig, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """HF tensor names and layouts from our canonical parameter dict (float32, contiguous)."""
    d = cfg.hidden_size
    state = {"model.embed_tokens.weight": params["embed"], "model.norm.weight": params["final_norm/weight"]}
    if not cfg.tie_word_embeddings:
        state["lm_head.weight"] = params["lm_head"].T
    for i in range(cfg.num_hidden_layers):
        p, ours = _layer_prefix(i), f"layers/{i}/"
        for name in ("q", "k", "v"):
            state[p + f"self_attn.{name}_proj.weight"] = params[ours + f"attention/{name}"].reshape(d, -1).T
        o = params[ours + "attention/o"]
        state[p + "self_attn.o_proj.weight"] = o.reshape(-1, d).T
        state[p + "input_layernorm.weight"] = params[ours + "input_norm/weight"]
        state[p + "post_attention_layernorm.weight"] = params[ours + "post_attention_norm/weight"]
        ff = p + "feed_forward."
        if cfg.layer_is_moe[i]:
            state[ff + "experts.gate_up_proj"] = np.concatenate(
                [params[ours + "feed_forward/gate"], params[ours + "feed_forward/up"]], axis=-1)
            state[ff + "experts.down_proj"] = params[ours + "feed_forward/down"]
            state[ff + "router.weight"] = params[ours + "feed_forward/router"].T
            mlp, ours_mlp = ff + "shared_expert.", ours + "feed_forward/shared_expert/"
        else:
            mlp, ours_mlp = ff, ours + "feed_forward/"
        for name in ("gate", "up", "down"):
            state[mlp + f"{name}_proj.weight"] = params[ours_mlp + name].T
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state.items()}


# ---------------------------------------------------------------- loading


def _text_state_of_torch_model(model) -> tuple[object, dict[str, np.ndarray]]:
    state = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    config = model.config
    if hasattr(config, "text_config"):  # Llama4ForConditionalGeneration: keep the language model
        config = config.text_config
        state = {k[len("language_model."):]: v for k, v in state.items() if k.startswith("language_model.")}
    return config, state


def _read_weight_files(path: Path, allow_pickle: bool) -> dict[str, np.ndarray]:
    safetensors = sorted(path.glob("*.safetensors"))
    if safetensors:
        state = {}
        for file in safetensors:
            state.update(load_file(str(file)))
        return state
    pickles = sorted(path.glob("*.bin")) + sorted(path.glob("*.pt"))
    if not pickles:
        raise HFConversionError(f"{path}: no *.safetensors (or *.bin) weight files found")
    if not allow_pickle:
        raise HFConversionError(
            f"{path}: only pickle weight files ({pickles[0].name}); they can run code when loaded. "
            "Convert them to safetensors, or, if you trust the source, pass --allow-pickle "
            "(allow_pickle=True in Python).")
    import torch

    state = {}
    for file in pickles:
        loaded = torch.load(file, map_location="cpu", weights_only=True)
        state.update({k: v.float().numpy() for k, v in loaded.items()})
    return state


def _bf16_safe(state: dict) -> dict[str, np.ndarray]:
    """safetensors' numpy loader gives bf16 as ml_dtypes arrays; make everything float32."""
    return {k: np.asarray(v).astype(np.float32) for k, v in state.items()}


def from_hf(path_or_model, *, allow_pickle: bool = False, **config_overrides) -> Transformer:
    """Our model with the weights of a transformers Llama 4 (in memory or a `save_pretrained` dir).

    `config_overrides` set our own fields (e.g. `dtype="bfloat16"`, `scan_layers=True`).
    """
    if isinstance(path_or_model, (str, os.PathLike)):
        path = Path(path_or_model)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise HFConversionError(f"{path}: no config.json; expected a save_pretrained directory")
        hf_config = json.loads(config_file.read_text())
        state = _read_weight_files(path, allow_pickle)
        if "text_config" in hf_config:
            state = {k[len("language_model."):]: v for k, v in state.items() if k.startswith("language_model.")}
    else:
        hf_config, state = _text_state_of_torch_model(path_or_model)
    cfg = config_from_hf(hf_config, **config_overrides)
    params = params_from_hf_state(cfg, _bf16_safe(state))
    model = build_model(cfg)
    assign_canonical_params(model, params)
    return model


def check_export_target(out_dir, overwrite: bool) -> Path:
    """`out_dir` as a Path; FileExistsError when it is a file, or a non-empty directory without
    `overwrite` (the CLI's --overwrite)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file, not a directory; choose a new directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty; choose a new directory, or pass --overwrite (overwrite=True "
                              "in Python) to write over its files")
    return out


def to_hf(model: Transformer, out_dir, *, overwrite: bool = False) -> Path:
    """Write `model` as a transformers `Llama4ForCausalLM` directory (config.json + safetensors).

    Refuses a non-empty `out_dir` unless `overwrite=True`.
    """
    out = check_export_target(out_dir, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    hf_config = config_to_hf(model.cfg)
    hf_config.architectures = ["Llama4ForCausalLM"]
    state = params_to_hf_state(model.cfg, canonical_params(model))
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    hf_config.save_pretrained(str(out))
    return out
