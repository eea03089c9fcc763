"""LoRA adapters for every supported decoder family: configuration, the site table, and the matmul helper.

A LoRA model is a plain :class:`~jaxsft.models.decoder.CausalLM` with two extra attributes:
``lora`` (a static :class:`LoraSetup`: the config and the sites it resolved to) and
``lora_layers`` (a :class:`LoraLayers` module whose :class:`LoraParam` arrays are stacked on the
same leading ``layers`` axis as the base weights). The trainer trains exactly the ``LoraParam``
variables and passes the base weights to its programs as frozen, undonated inputs.

Adapters are applied *in the matmul*: ``y = x @ W + scale * (dropout(x) @ A) @ B``, never by
forming ``W + scale * A @ B``. Per layer and token this costs ``2 r (in + out)`` extra FLOPs and
reads nothing but the small A and B, while a merged weight costs ``2 r * in * out`` FLOPs per
layer per forward, a full-size temporary, and (in training) the full ``x^T dY`` weight gradient
that LoRA exists to avoid. The same path serves generation, so the decode loop reads the frozen
base once per token and no adapted copy of the base is ever made.

Layouts follow PEFT: ``lora_A.weight`` is ``[r, in]``, ``lora_B.weight`` is ``[out, r]``; ours are
``A: [*in_dims, r]`` and ``B: [r, *out_dims]`` where ``in_dims``/``out_dims`` are the base weight's
own input and output dimensions (e.g. ``q_proj [hidden, heads, head_dim]``), so
``tensordot(A, B, 1)`` has the base weight's shape.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsft.models.families import lora_sites
from jaxsft.models.interface import LanguageModel  # not CausalLM: the decoder imports this module
from jaxsft.models.lora_sites import Site, b_name
from jaxsft.models.spec import ModelSpec, layer_param_shapes


class LoraParam(nnx.Param):
    """A trainable LoRA adapter array (the trainer's filter for what trains when a model has adapters)."""


# Input dimensions of each base layer weight (the rest are outputs), see spec.layer_param_shapes.
IN_DIMS = {"q_proj": 1, "k_proj": 1, "v_proj": 1, "o_proj": 2, "gate_proj": 1, "up_proj": 1, "down_proj": 1}

@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA hyperparameters, named as ``peft.LoraConfig`` names them.

    ``target_modules``: HF module names (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``,
    ``gate_proj``, ``up_proj``, ``down_proj``; GPT-2: ``c_attn``, ``c_proj``, ``c_fc``) or
    ``"all-linear"`` (every projection of the layers; the lm_head stays frozen, as in PEFT).
    Scale is ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora``.
    """

    r: int = 8
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    target_modules: Union[str, tuple[str, ...]] = ("q_proj", "v_proj")
    use_rslora: bool = False

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoraConfig.r={self.r!r} must be a positive integer (the adapter rank), e.g. r=8.")
        if (not isinstance(self.lora_alpha, (int, float)) or isinstance(self.lora_alpha, bool)
                or not math.isfinite(self.lora_alpha) or self.lora_alpha <= 0):  # NaN alpha trains every weight to NaN
            raise ValueError(f"LoraConfig.lora_alpha={self.lora_alpha!r} must be a finite positive number, e.g. 16.")
        if (not isinstance(self.lora_dropout, (int, float)) or isinstance(self.lora_dropout, bool)
                or not 0.0 <= self.lora_dropout < 1.0):
            raise ValueError(f"LoraConfig.lora_dropout={self.lora_dropout!r} must be in [0, 1).")
        targets = self.target_modules
        if isinstance(targets, str):
            targets = targets if targets == "all-linear" else (targets,)
        elif isinstance(targets, (list, tuple, set, frozenset)) and targets and all(isinstance(t, str) for t in targets):
            targets = tuple(sorted(set(targets))) if isinstance(targets, (set, frozenset)) else tuple(targets)
        else:
            raise ValueError(
                f"LoraConfig.target_modules={self.target_modules!r} must be 'all-linear' or a non-empty list of "
                "module names such as ['q_proj', 'v_proj']."
            )
        object.__setattr__(self, "target_modules", targets)
        object.__setattr__(self, "lora_alpha", float(self.lora_alpha))
        object.__setattr__(self, "lora_dropout", float(self.lora_dropout))

    @property
    def scale(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def resolve(self, spec: ModelSpec) -> tuple[Site, ...]:
        """The sites of ``spec``'s family these targets name; unknown names are refused, naming the valid ones."""
        sites = lora_sites(spec)
        if not sites:
            raise ValueError(f"LoRA is not offered for {spec.model_type} models (no adapter sites in its family record).")
        if self.target_modules == "all-linear":
            return sites
        valid = sorted({s.target for s in sites})
        unknown = [t for t in self.target_modules if t not in valid]
        if unknown:
            raise ValueError(
                f"LoraConfig.target_modules: {unknown} name no linear layer of a {spec.model_type} model; "
                f"use some of {valid} or 'all-linear'."
            )
        return tuple(s for s in sites if s.target in self.target_modules)


@dataclasses.dataclass(frozen=True)
class LoraSetup:
    """What the decoder needs at trace time (static, hashable): the config and its resolved sites."""

    config: LoraConfig
    sites: tuple[Site, ...]

    def site_of(self, output: str) -> Optional[Site]:
        for site in self.sites:
            if output in site.outputs:
                return site
        return None


def adapter_shapes(spec: ModelSpec, setup: LoraSetup) -> dict[str, tuple[tuple[int, ...], tuple[Optional[str], ...]]]:
    """name -> (per-layer shape, logical axes without the layers axis), derived from the base weights' shapes."""
    base = layer_param_shapes(spec)
    r = setup.config.r
    out: dict[str, tuple[tuple[int, ...], tuple[Optional[str], ...]]] = {}
    for site in setup.sites:
        shape, axes, _ = base[site.outputs[0]]
        n_in = IN_DIMS[site.outputs[0]]
        out[site.a_name] = ((*shape[:n_in], r), (*axes[:n_in], "lora_rank"))
        for output in site.outputs:
            shape, axes, _ = base[output]
            out[b_name(output)] = ((r, *shape[n_in:]), ("lora_rank", *axes[n_in:]))
    return out


class LoraLayers(nnx.Module):
    """The adapters of every layer, stacked on a leading layers axis like the base weights."""

    def __init__(self, arrays: dict[str, jax.Array], axes: dict[str, tuple[Optional[str], ...]]):
        for name, value in arrays.items():
            setattr(self, name, LoraParam(value, logical_axes=("layers", *axes[name])))

    @classmethod
    def zeros(cls, spec: ModelSpec, setup: "LoraSetup") -> "LoraLayers":
        shapes = adapter_shapes(spec, setup)
        arrays = {name: jnp.zeros((spec.num_layers, *shape), jnp.float32) for name, (shape, _) in shapes.items()}
        return cls(arrays, {name: axes for name, (_, axes) in shapes.items()})

    def arrays(self) -> dict[str, jax.Array]:
        return {k: v[...] for k, v in vars(self).items() if isinstance(v, LoraParam)}


def init_adapters(spec: ModelSpec, setup: LoraSetup, seed: int) -> dict[str, np.ndarray]:
    """PEFT's default init: A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming_uniform, a=sqrt(5)), B = 0, fp32."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, (shape, _) in adapter_shapes(spec, setup).items():
        full = (spec.num_layers, *shape)
        if name.startswith("lora_a_"):
            bound = 1.0 / math.sqrt(int(np.prod(shape[:-1])))
            out[name] = rng.uniform(-bound, bound, size=full).astype(np.float32)
        else:
            out[name] = np.zeros(full, np.float32)
    return out


def attach(model: LanguageModel, setup: LoraSetup, arrays: dict[str, np.ndarray]) -> LanguageModel:
    """Give ``model`` these adapters (placed on its mesh per the sharding rules), in place; returns it."""
    from jaxsft.infra import sharding as shd

    shapes = adapter_shapes(model.spec, setup)
    if set(arrays) != set(shapes):
        raise ValueError(f"adapters {sorted(arrays)} do not match the config's {sorted(shapes)}.")
    for name, (shape, _) in shapes.items():
        if tuple(arrays[name].shape) != (model.spec.num_layers, *shape):
            raise ValueError(
                f"adapter {name} has shape {tuple(arrays[name].shape)}, expected {(model.spec.num_layers, *shape)} "
                f"(r={setup.config.r}); check that the adapter belongs to this base model."
            )
    mesh = shd.mesh_of(nnx.state(model))
    placed = {}
    for name, (shape, axes) in shapes.items():
        spec = shd.logical_to_spec(("layers", *axes), arrays[name].shape, mesh, name)
        placed[name] = shd.place_array(np.asarray(arrays[name], np.float32), jax.sharding.NamedSharding(mesh, spec))
    model.lora = setup
    model.lora_layers = LoraLayers(placed, {k: v[1] for k, v in shapes.items()})
    return model


def add_lora(model: LanguageModel, config: LoraConfig, *, seed: int = 0) -> LanguageModel:
    """Add freshly initialised adapters to ``model`` (in place; returns it). Its base weights will train no more.

    The base may be stored in bf16 (``from_pretrained(..., param_dtype=jnp.bfloat16)``); adapters are fp32.
    """
    if not isinstance(getattr(model, "spec", None), ModelSpec):
        raise TypeError(f"add_lora: model must be a jaxsft CausalLM (a decoder), got {type(model).__name__}.")
    if not isinstance(config, LoraConfig):
        raise TypeError(f"add_lora: config must be a jaxsft LoraConfig, got {type(config).__name__}.")
    if lora_setup(model) is not None:
        raise ValueError("add_lora: this model already has LoRA adapters; build a fresh base model to add others.")
    setup = LoraSetup(config, config.resolve(model.spec))
    return attach(model, setup, init_adapters(model.spec, setup, seed))


def lora_setup(model: Any) -> Optional[LoraSetup]:
    """The model's LoRA setup, or None for a model without adapters."""
    return getattr(model, "lora", None)


def adapter_arrays(model: LanguageModel) -> dict[str, np.ndarray]:
    """The adapters as fp32 numpy (gathered across hosts when sharded)."""
    from jaxsft.infra import sharding as shd

    return {k: np.asarray(shd.fetch_to_host(v), np.float32) for k, v in model.lora_layers.arrays().items()}


def merged_layer_weights(setup: LoraSetup, layers: dict[str, np.ndarray], adapters: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Base layer weights with ``scale * A @ B`` folded in (numpy, fp32), for a merged save."""
    out = dict(layers)
    scale = setup.config.scale
    for site in setup.sites:
        a = adapters[site.a_name].astype(np.float32)
        for output in site.outputs:
            b = adapters[b_name(output)].astype(np.float32)
            delta = np.stack([np.tensordot(a[i], b[i], 1) for i in range(a.shape[0])])
            base = layers[output]
            out[output] = (base.astype(np.float32) + np.float32(scale) * delta).astype(base.dtype)
    return out


# --------------------------------------------------------------------------------- trace time
DROPOUT_KEY = "lora_dropout_key"


def layer_inputs(model: LanguageModel, dtype: Any, dropout_key: Optional[jax.Array]) -> dict[str, jax.Array]:
    """The adapter arrays (cast to the compute dtype) to scan with the base weights, plus per-layer dropout keys."""
    setup = lora_setup(model)
    if setup is None:
        return {}
    out = {k: v.astype(dtype) for k, v in model.lora_layers.arrays().items()}
    if dropout_key is not None and setup.config.lora_dropout > 0:
        out[DROPOUT_KEY] = jax.random.split(dropout_key, model.spec.num_layers)
    return out


def adapted(y: jax.Array, x: jax.Array, p: dict[str, jax.Array], output: str, setup: Optional[LoraSetup]) -> jax.Array:
    """``y`` (= x @ W_output) plus the output's LoRA term ``scale * (dropout(x) @ A) @ B``; ``y`` itself without one."""
    site = setup.site_of(output) if setup is not None else None
    if site is None:
        return y
    a, b = p[site.a_name], p[b_name(output)]
    n_in = a.ndim - 1
    if DROPOUT_KEY in p:
        rate = setup.config.lora_dropout
        key = jax.random.fold_in(p[DROPOUT_KEY], setup.sites.index(site))
        keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
        x = jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)
    xa = jnp.tensordot(x, a, n_in)
    return y + (jnp.tensordot(xa, b, 1) * setup.config.scale).astype(y.dtype)

