"""`ModelConfig`: every knob of the Llama-4-style MoE decoder, validated on construction.

Field names follow `transformers.Llama4TextConfig` where one exists (see `distill.hf` for the
mapping); the rest (router kind, dispatch, dtypes, scan, remat) are ours.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from distill.errors import ConfigError

ROUTERS = ("llama4", "softmax")
DISPATCHES = ("auto", "sorted", "ragged", "dense", "capacity")
DTYPES = ("float32", "bfloat16", "float16")
REMATS = ("none", "full", "dots")


def _fail(field_name: str, value, why: str) -> None:
    raise ConfigError(f"{field_name}={value!r}: {why}")


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1-style RoPE frequency scaling (`rope_type: llama3` in transformers)."""

    factor: float = 8.0  # long wavelengths are divided by this
    low_freq_factor: float = 1.0  # wavelengths above original_max / low_freq_factor are scaled fully
    high_freq_factor: float = 4.0  # wavelengths below original_max / high_freq_factor are kept
    original_max_position_embeddings: int = 8192  # context length the base frequencies were trained at

    def __post_init__(self):
        if self.factor <= 0:
            _fail("rope_scaling.factor", self.factor, "must be > 0")
        if not 0 < self.low_freq_factor <= self.high_freq_factor:
            _fail(
                "rope_scaling.low_freq_factor",
                self.low_freq_factor,
                f"must satisfy 0 < low_freq_factor <= high_freq_factor ({self.high_freq_factor})",
            )
        if self.original_max_position_embeddings <= 0:
            _fail("rope_scaling.original_max_position_embeddings", self.original_max_position_embeddings, "must be > 0")


@dataclass(frozen=True)
class VisionConfig:
    """The image side of an early-fusion model (`distill.model.vision`): a small non-causal encoder
    over square patches and a bias-free projector to the text `hidden_size` (transformers'
    `Llama4MultiModalProjector`). Each image becomes `tokens_per_image` feature vectors, written
    over that many `image_token_id` placeholders of the token sequence before the first layer."""

    image_size: int = 8  # height and width of a (square) image, in pixels
    patch_size: int = 2  # height and width of a patch; must divide image_size
    num_channels: int = 1  # channels of a pixel (1: grey, 3: RGB)
    hidden_size: int = 64  # width of the encoder
    intermediate_size: int = 128  # width of the encoder's GELU MLP
    num_hidden_layers: int = 2  # encoder layers (pre-norm, bidirectional attention)
    num_attention_heads: int = 4  # must divide hidden_size
    vision_output_dim: int = 64  # width of the encoder's output, the projector's input
    image_token_id: int = 255  # the placeholder token (255: a byte no UTF-8 text holds)

    def __post_init__(self):
        for name in ("image_size", "patch_size", "num_channels", "hidden_size", "intermediate_size",
                     "num_hidden_layers", "num_attention_heads", "vision_output_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                _fail(f"vision.{name}", value, "must be a positive integer")
        if self.image_size % self.patch_size:
            _fail("vision.patch_size", self.patch_size, f"must divide vision.image_size ({self.image_size})")
        if self.hidden_size % self.num_attention_heads:
            _fail("vision.num_attention_heads", self.num_attention_heads,
                  f"must divide vision.hidden_size ({self.hidden_size})")
        if not isinstance(self.image_token_id, int) or isinstance(self.image_token_id, bool) or self.image_token_id < 0:
            _fail("vision.image_token_id", self.image_token_id, "must be a token id >= 0")

    @property
    def tokens_per_image(self) -> int:
        """Placeholders (and feature vectors) per image: one per patch."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(height, width, channels) of one image."""
        return (self.image_size, self.image_size, self.num_channels)

    def param_count(self, text_hidden_size: int) -> int:
        """Parameters of the encoder and the projector."""
        d, patch = self.hidden_size, self.patch_size**2 * self.num_channels
        layer = 4 * d * d + 2 * d * self.intermediate_size + 2 * d
        return (patch * d + self.tokens_per_image * d + self.num_hidden_layers * layer + d
                + d * self.vision_output_dim + self.vision_output_dim * text_hidden_size)


@dataclass(frozen=True)
class ModelConfig:
    """A Llama-4-style MoE decoder. Defaults describe a small CPU-sized model."""

    # --- sizes
    vocab_size: int = 256  # embedding rows and logits columns
    hidden_size: int = 128  # d_model
    intermediate_size: int = 256  # width of each routed expert and of the shared expert
    intermediate_size_mlp: int = 512  # width of the dense SwiGLU on non-MoE layers
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2  # grouped-query attention: must divide num_attention_heads
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 4096  # longest sequence the model accepts

    # --- mixture of experts
    num_local_experts: int = 8  # routed experts per MoE layer
    num_experts_per_tok: int = 1  # top-k
    moe_layers: tuple[int, ...] | None = None  # explicit MoE layer indices; overrides the step
    interleave_moe_layer_step: int = 1  # every step-th layer is MoE, starting at index step-1
    router: Literal["llama4", "softmax"] = "llama4"
    # llama4: top-k of the logits, sigmoid scores, the score scales the expert's INPUT.
    # softmax: Mixtral/Switch form, softmax over experts, top-k, weights scale the OUTPUT.
    router_renormalize: bool = True  # softmax router, k > 1: top-k weights renormalised to sum 1 (Mixtral)
    dispatch: Literal["auto", "sorted", "ragged", "dense", "capacity"] = "auto"
    # auto: `sorted` on CPU, `ragged` (jax.lax.ragged_dot) on GPU/TPU. `sorted` and `ragged` are
    # dropless with cost growing with active parameters; `dense` runs every expert on every token
    # (the reference); `capacity` drops tokens past capacity_factor and reports the drop rate.
    capacity_factor: float = 1.25  # capacity dispatch: slots per expert = factor * tokens * k / E
    dispatch_tile: int | None = None  # sorted dispatch: rows per tile; None picks from the shapes

    # --- attention and positions (iRoPE)
    no_rope_layers: tuple[int, ...] | None = None  # 1 = layer USES RoPE (inverted name, as in HF)
    no_rope_layer_interval: int = 4  # default plan: layer i is NoPE when (i + 1) % interval == 0
    attention_chunk_size: int | None = 8192  # RoPE layers attend within chunks of this many tokens
    use_qk_norm: bool = True  # weightless L2 norm of q and k after RoPE, RoPE layers only
    attn_temperature_tuning: bool = True  # NoPE layers scale q by log1p(floor((p+1)/floor_scale))*attn_scale+1
    floor_scale: int = 8192
    attn_scale: float = 0.1
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None  # None: plain RoPE frequencies
    rms_norm_eps: float = 1e-5

    # --- early fusion
    vision: VisionConfig | None = None  # image encoder + projector (VisionConfig); None: text only

    # --- head
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02  # std of the normal initialiser

    # --- numerics and compilation
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # compute dtype of matmuls
    param_dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # storage dtype of parameters
    scan_layers: bool = False  # scan over repeated layer groups: compile time flat in depth
    remat: Literal["none", "full", "dots"] = "none"  # rematerialise each layer group in backward

    # Derived in __post_init__.
    layer_uses_rope: tuple[bool, ...] = field(init=False, repr=False, compare=False)
    layer_is_moe: tuple[bool, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        positive = (
            "vocab_size", "hidden_size", "intermediate_size", "intermediate_size_mlp",
            "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "max_position_embeddings", "num_local_experts", "num_experts_per_tok",
            "interleave_moe_layer_step", "no_rope_layer_interval", "floor_scale",
        )  # fmt: skip
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                _fail(name, value, "must be a positive integer")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                _fail(
                    "num_attention_heads", self.num_attention_heads,
                    f"must divide hidden_size ({self.hidden_size}) when head_dim is not set; set head_dim explicitly",
                )  # fmt: skip
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.head_dim <= 0 or self.head_dim % 2:
            _fail("head_dim", self.head_dim, "must be a positive even integer (RoPE rotates pairs)")
        if self.num_attention_heads % self.num_key_value_heads:
            _fail(
                "num_key_value_heads", self.num_key_value_heads,
                f"must divide num_attention_heads ({self.num_attention_heads})",
            )  # fmt: skip
        if self.num_experts_per_tok > self.num_local_experts:
            _fail(
                "num_experts_per_tok", self.num_experts_per_tok,
                f"top-k cannot exceed num_local_experts ({self.num_local_experts})",
            )  # fmt: skip
        if self.attention_chunk_size is not None and self.attention_chunk_size <= 0:
            _fail("attention_chunk_size", self.attention_chunk_size, "must be a positive integer or null")
        for name, allowed in (("router", ROUTERS), ("dispatch", DISPATCHES), ("dtype", DTYPES),
                              ("param_dtype", DTYPES), ("remat", REMATS)):  # fmt: skip
            if getattr(self, name) not in allowed:
                _fail(name, getattr(self, name), f"allowed values are {', '.join(allowed)}")
        if self.capacity_factor <= 0:
            _fail("capacity_factor", self.capacity_factor, "must be > 0")
        if self.dispatch_tile is not None and self.dispatch_tile <= 0:
            _fail("dispatch_tile", self.dispatch_tile, "must be a positive integer or null")
        if self.rms_norm_eps <= 0:
            _fail("rms_norm_eps", self.rms_norm_eps, "must be > 0")
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        if isinstance(self.vision, dict):
            object.__setattr__(self, "vision", VisionConfig(**self.vision))
        if self.vision is not None and not self.vision.image_token_id < self.vocab_size:
            _fail("vision.image_token_id", self.vision.image_token_id,
                  f"must be below vocab_size ({self.vocab_size}); pick an unused id or grow vocab_size")
        object.__setattr__(self, "layer_uses_rope", self._rope_plan())
        object.__setattr__(self, "layer_is_moe", self._moe_plan())

    def _rope_plan(self) -> tuple[bool, ...]:
        n = self.num_hidden_layers
        if self.no_rope_layers is None:
            return tuple((i + 1) % self.no_rope_layer_interval != 0 for i in range(n))
        plan = tuple(self.no_rope_layers)
        object.__setattr__(self, "no_rope_layers", plan)
        if len(plan) < n or any(v not in (0, 1) for v in plan):
            _fail("no_rope_layers", plan, f"must list 0 (NoPE) or 1 (RoPE) for each of the {n} layers")
        return tuple(bool(v) for v in plan[:n])

    def _moe_plan(self) -> tuple[bool, ...]:
        n = self.num_hidden_layers
        if self.moe_layers is None:
            moe = set(range(self.interleave_moe_layer_step - 1, n, self.interleave_moe_layer_step))
        else:
            object.__setattr__(self, "moe_layers", tuple(self.moe_layers))
            bad = [i for i in self.moe_layers if not 0 <= i < n]
            if bad:
                _fail("moe_layers", self.moe_layers, f"indices {bad} are outside 0..{n - 1}")
            moe = set(self.moe_layers)
        return tuple(i in moe for i in range(n))

    # --- derived quantities used across the package
    @property
    def layer_period(self) -> int:
        """Smallest period of the (rope, moe) layer plan; scan stacks groups of this many layers."""
        plan = list(zip(self.layer_uses_rope, self.layer_is_moe))
        n = len(plan)
        for p in range(1, n + 1):
            if all(plan[i] == plan[i % p] for i in range(n)):
                return p
        return n  # pragma: no cover - p = n always matches

    @property
    def num_moe_layers(self) -> int:
        return sum(self.layer_is_moe)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """The init fields, as plain Python values (for YAML and checkpoints)."""
        out = {}
        for f in dataclasses.fields(self):
            if not f.init:
                continue
            value = getattr(self, f.name)
            if isinstance(value, (RopeScaling, VisionConfig)):
                value = dataclasses.asdict(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    def param_counts(self) -> dict[str, int]:
        """Total and active (per token) parameter counts."""
        d, hd = self.hidden_size, self.head_dim
        attn = d * hd * (2 * self.num_attention_heads + 2 * self.num_key_value_heads)
        swiglu = lambda width: 3 * d * width  # noqa: E731
        expert = swiglu(self.intermediate_size)
        moe_total = self.num_local_experts * expert + expert + d * self.num_local_experts
        moe_active = self.num_experts_per_tok * expert + expert + d * self.num_local_experts
        dense = swiglu(self.intermediate_size_mlp)
        embed = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        total = active = embed + d  # + final norm
        for is_moe in self.layer_is_moe:
            layer = attn + 2 * d
            total += layer + (moe_total if is_moe else dense)
            active += layer + (moe_active if is_moe else dense)
        if self.vision is not None:
            total += self.vision.param_count(d)
            active += self.vision.param_count(d)
        return {"total": total, "active": active}

    def forward_flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token of a `seq_len` sequence, averaged over its positions: 2 per
        multiply-add of every matmul a token passes through (attention projections, the routed
        experts it is sent to and the shared expert, the router, the dense MLP, the LM head; the
        embedding lookup is free) plus q.k and p.v over the keys each position really attends to
        (causal; RoPE layers only within their chunk). A training step costs 3x this (backward 2x)."""
        d, hd = self.hidden_size, self.head_dim
        heads, kv = self.num_attention_heads, self.num_key_value_heads
        positions = range(seq_len)
        full_keys = sum(p + 1 for p in positions) / seq_len
        chunk = self.attention_chunk_size or seq_len
        chunk_keys = sum(p % chunk + 1 for p in positions) / seq_len
        expert = 3 * d * self.intermediate_size
        multiply_adds = self.vocab_size * d  # LM head
        for is_moe, rope in zip(self.layer_is_moe, self.layer_uses_rope):
            multiply_adds += d * hd * (2 * heads + 2 * kv)
            multiply_adds += 2 * heads * hd * (chunk_keys if rope else full_keys)
            multiply_adds += ((self.num_experts_per_tok + 1) * expert + d * self.num_local_experts if is_moe
                              else 3 * d * self.intermediate_size_mlp)
        return 2.0 * multiply_adds

