"""The one interface every jaxsft language model offers the training side and the sampler.

``CausalLM`` (decoder-only) and ``Seq2SeqLM`` (encoder-decoder) both implement :class:`LanguageModel`,
so a loss, an evaluation program or a sampler asks for hidden states and the lm-head operands by
the same names whatever the model kind. What the model's *inputs* are differs by kind (a decoder
reads ``input_ids``/``positions``/segments, an encoder-decoder also ``decoder_input_ids``): that is
the objective's business, not this interface's. The cache and decode-step side belongs to
generation and is defined there.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Protocol, runtime_checkable

import jax


class LMHead(NamedTuple):
    """What the fused loss and the sampler consume to form logits: ``soft_cap(hidden @ weight.T)``.

    ``hidden`` [..., H'] and ``weight`` [V, H'] may carry extra columns (BART's ``final_logits_bias``
    rides as a constant-1 feature), so the fused loss needs no bias argument. ``softcap`` is the
    final-logit soft cap (Gemma 2: ``cap * tanh(logits / cap)``), ``None`` for none; every place that
    forms logits applies it through :func:`jaxsft.models.layers.soft_cap`, the one definition.
    """

    hidden: jax.Array
    weight: jax.Array
    softcap: Optional[float] = None


@runtime_checkable
class LanguageModel(Protocol):
    """A jaxsft LM as the training side and the sampler see it."""

    spec: Any  # the family-independent description (ModelSpec or Seq2SeqSpec); jit-static
    dtype: Any  # compute dtype
    hf_config_json: Optional[str]  # the HF config it was built from (for saving), or None

    def hidden_states(self, input_ids: jax.Array, *args: Any, dropout_key: Optional[jax.Array] = None,
                      **kwargs: Any) -> jax.Array:
        """Final hidden states [B, T, H] ready for the lm head.

        ``dropout_key`` (training steps only) drives the config's dropout and LoRA dropout; without it
        the model is deterministic (evaluation, generation).
        """
        ...

    def lm_head_operands(self, hidden: jax.Array) -> LMHead:
        """The operands of the lm head for these hidden states (see :class:`LMHead`)."""
        ...

    def logits(self, hidden: jax.Array) -> jax.Array:
        """fp32 logits [B, T, V] of these hidden states, soft cap included."""
        ...
