"""How a model computes, as one value: compute dtype, remat, attention kernel, layer loop, norm kernel.

These knobs do not change what a :class:`~jaxsft.models.CausalLM` holds (its
parameters), only the programs traced from it, so they live together in one
frozen :class:`RunOptions`. ``CausalLM``, ``from_pretrained`` and ``init_model``
take them as keywords; the trainer derives its training view with
:func:`with_options` (a new module over the same arrays), never by mutating one.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxsft.infra.config import ATTENTION_IMPLEMENTATIONS  # defined with the config that validates it
REMAT_POLICIES = {
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """The static compute knobs of a CausalLM (each defined here once, with its default)."""

    dtype: Any = jnp.float32  # compute dtype; parameters keep their own param_dtype
    remat: bool = False  # recompute each layer's activations in the backward pass
    remat_policy: str = "nothing_saveable"
    attention_implementation: str = "auto"  # auto: cuDNN on GPU in 16-bit, XLA elsewhere
    scan_layers: bool = True  # one lax.scan over the layers (False: unrolled)
    # Apply the HF config's dropout rates when a dropout rng is given (training only; the trainer sets it
    # from TrainConfig.dropout). Evaluation and generation never pass an rng, so never drop anything.
    dropout: bool = False
    # Each layer's two residual adds and the RMSNorm after each (the MLP output's add is carried into the next
    # layer's attention norm; RMSNorm models): "auto" (the default: the fused Pallas kernel,
    # jaxsft.kernels.add_rms_norm, on GPUs in the layer stack, XLA's form in the one-token decode step and off a
    # GPU), "xla" (XLA's form everywhere) or "pallas" (the kernel everywhere; interpret mode off a GPU). The kernel
    # runs on each device's own rows under data/FSDP meshes and gives way to XLA under tensor parallelism
    # (decoder.fuses_norms). Measured on an H100: training +1.6 to +4.4 % on fixed batches, decode 4 % slower
    # with it, hence decoder.decode_norm_implementation (benchmarks/RESULTS.md, seventeenth session).
    norm_implementation: str = "auto"

    def __post_init__(self) -> None:
        from jaxsft.kernels.add_rms_norm import IMPLEMENTATIONS as NORM_IMPLEMENTATIONS  # the kernel's own list

        object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
        if self.norm_implementation not in NORM_IMPLEMENTATIONS:
            raise ValueError(
                f"norm_implementation={self.norm_implementation!r} is not supported "
                f"(supported: {', '.join(NORM_IMPLEMENTATIONS)}); pick one of those."
            )
        if self.attention_implementation not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(
                f"attention_implementation={self.attention_implementation!r} is not supported "
                f"(supported: {', '.join(ATTENTION_IMPLEMENTATIONS)}); pick one of those."
            )
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(
                f"remat_policy={self.remat_policy!r} is not supported (supported: {', '.join(REMAT_POLICIES)})."
            )
        for name in ("remat", "scan_layers", "dropout"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be True or False.")

    def as_kwargs(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def of(cls, model: Any) -> "RunOptions":
        """The options a CausalLM was built with."""
        return cls(**{f.name: getattr(model, f.name) for f in dataclasses.fields(cls)})


def with_options(model: Any, options: RunOptions) -> Any:
    """A CausalLM over ``model``'s own arrays that computes under ``options``; ``model`` is not changed.

    The module structure comes from a shape-only model built with ``options`` (no
    memory, no copy of a weight), so the view is derived, not patched.
    """
    from flax import nnx

    if RunOptions.of(model) == options:
        return nnx.merge(*nnx.split(model))
    abstract = nnx.eval_shape(
        lambda: type(model)(  # CausalLM or Seq2SeqLM: both take the same option keywords
            model.spec, param_dtype=model.param_dtype, hf_config_json=model.hf_config_json, rngs=nnx.Rngs(0),
            **options.as_kwargs(), **_adapter_kwargs(model),
        )
    )
    graphdef, _ = nnx.split(abstract)
    return nnx.merge(graphdef, nnx.state(model))


def _adapter_kwargs(model: Any) -> dict[str, Any]:
    """A LoRA model's adapter structure (jaxsft.models.lora) travels into the view with its arrays."""
    setup = getattr(model, "lora", None)
    return {} if setup is None else {"lora": setup}
