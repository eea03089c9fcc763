"""What is trained: an :class:`Objective` turns a ``step()`` call into examples, plans them into
micro-batches, names the batch fields the compiled programs take, and scores a batch.

The trainer, batching and the jitted step know nothing of model kinds or batch keys: they ask the
objective. Supervised fine-tuning of a decoder (:class:`CausalSFT`) and of an encoder-decoder
(:class:`Seq2SeqSFT`) are its two implementations; per-example weights (``step(example_weights=)``)
ride on both. A new objective (DPO, a reward-weighted loss) is a new subclass, not a fork.

The loss contract is ``loss(model, batch) -> (sum, denominator, aux)``: the update's loss is the sum
over its micro-batches divided by the summed denominator (the one normaliser: label tokens, or their
weighted count), formed once in :mod:`jaxsft.training.step`; ``aux`` holds additive scalars the trainer reports
(``num_tokens``: the real label-token count).
"""

from __future__ import annotations

import abc
import dataclasses
import math
import warnings
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxsft.training import agreement, batching, fast_path

from jaxsft.infra.config import IGNORE_INDEX
from jaxsft.training.loss import causal_lm_loss

Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class PlanSettings:
    """How a call's examples become micro-batches of the trainer's compiled shapes."""

    rows: int  # rows of one micro-batch on this process
    buckets: tuple[int, ...]
    pack: bool = False
    row_multiple: int = 1
    longer_rows: bool = False
    row_lengths: Optional[tuple[int, ...]] = None  # the lengths a packed row may take (None: ``buckets``)


@dataclasses.dataclass(frozen=True)
class Objective(abc.ABC):
    """What a trainer optimises. Subclasses say how inputs become examples and how a batch is scored.

    ``chunk_size`` / ``num_shards`` tune the fused lm_head + loss (see :func:`jaxsft.training.loss.causal_lm_loss`).
    """

    chunk_size: Optional[int] = None
    num_shards: int = 1

    # Capabilities the trainer checks at construction (a clear error instead of a wrong run).
    supports_packing: bool = dataclasses.field(default=True, init=False)
    supports_multi_process: bool = dataclasses.field(default=True, init=False)
    supports_predict: bool = dataclasses.field(default=True, init=False)

    # ---- inputs -> examples (host, numpy; every check before any state changes)
    def examples(
        self,
        inputs: dict[str, Any],
        *,
        tokenizer: Any,
        max_length: int,
        truncation_mode: str,
        vocab_size: int,
        eos_token_id: Optional[int] = None,
    ) -> list[Any]:
        """``step()``'s keywords (``batching.STEP_KEYWORDS`` plus ``example_weights``) -> checked examples.

        An empty call gives ``[]``. With ``example_weights`` every example carries its weight and
        zero-weight examples are left out (a weight of 0 is the example not given), so all-zero
        weights make an empty call.
        """
        inputs = dict(inputs)
        weights = inputs.pop("example_weights", None)
        texts, input_ids = inputs.get("texts"), inputs.get("input_ids")
        checked = batching.check_example_weights(weights)
        if batching.is_empty(texts if texts is not None else input_ids):
            # No examples this call (a filter that kept nothing). Multi-process: this process still joins
            # every collective program with zero-weight filler rows (agreement.agree_on_microbatches).
            batching.check_empty_call(**inputs)
            batching.with_weights([], checked)  # weights given for no examples must be empty too
            return []
        settings = dict(max_length=max_length, truncation_mode=truncation_mode)
        if texts is not None:
            batching.refuse_tokens_with_texts(inputs, self.texts_fix)
            if tokenizer is None:
                raise ValueError("step(texts=...) needs a tokenizer; pass tokenizer= when building the trainer.")
            examples = self.examples_from_texts(
                tokenizer, texts, inputs.get("texts_labels"), eos_token_id=eos_token_id, **settings
            )
        elif input_ids is not None:
            examples = self.examples_from_tokens(
                input_ids, inputs.get("attention_mask"), inputs.get("labels"), inputs.get("texts_labels"), **settings
            )
        else:
            raise ValueError("step() needs input_ids=... (token arrays) or texts=... (strings); both were None.")
        batching.validate_vocab(examples, vocab_size)
        weighted = batching.with_weights(examples, checked)
        message = batching.truncation_warning(examples, max_length, truncation_mode)  # once the call is accepted
        if message is not None:
            warnings.warn(message, stacklevel=4)
        return weighted

    texts_fix = "pass either texts (with texts_labels) or token arrays, not both."

    @abc.abstractmethod
    def examples_from_texts(self, tokenizer, texts, texts_labels, *, max_length, truncation_mode, eos_token_id):
        ...

    @abc.abstractmethod
    def examples_from_tokens(self, input_ids, attention_mask, labels, texts_labels, *, max_length, truncation_mode):
        ...

    # ---- examples -> micro-batches
    def plan(
        self, examples: Sequence[Any], settings: PlanSettings, rng: np.random.Generator, *, shuffle: bool,
        weighted: bool = False,
    ) -> list[Any]:
        """This process's examples as micro-batches, agreed with every other process (same count and shapes).

        ``weighted``: the call carries example weights (every process's micro-batches then have
        ``label_weights``, its filler rows too).
        """
        local = self.plan_local(examples, settings, rng, shuffle=shuffle) if examples else []
        return agreement.agree_on_microbatches(local, settings.rows, packed=settings.pack, weighted=weighted)

    @abc.abstractmethod
    def plan_local(self, examples, settings: PlanSettings, rng: np.random.Generator, *, shuffle: bool) -> list[Any]:
        ...

    # ---- micro-batch -> program inputs
    @abc.abstractmethod
    def batch_fields(self, mb: Any) -> dict[str, np.ndarray]:
        """The micro-batch's host arrays, by the program input each feeds (static per objective and layout)."""

    # ---- the loss (inside jit)
    @abc.abstractmethod
    def loss(self, model: Any, batch: Batch) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
        """``(sum, denominator, aux)`` of one micro-batch; the update's loss is sum / denominator over it."""

    def logged_aux(self) -> tuple[str, ...]:
        """The ``aux`` entries the trainer sums over an update and reports."""
        return ("num_tokens",)

    def packing(self, packing: Optional[bool], run_options: Any, spec: Any, *, dropout: bool) -> tuple[bool, bool]:
        """(whether micro-batches pack, whether packed rows may outgrow the longest example's bucket).

        ``TrainConfig.packing`` resolved for this backend (None: packed where cuDNN's ragged kernel applies,
        ``jaxsft.training.fast_path``). Rows longer than the bucket only where attention costs per segment (cuDNN's
        ragged kernel); masked XLA attention (CPU, TPU) costs and stores rows x length^2.
        """
        if not self.supports_packing:
            return False, False
        attention_dropout = (getattr(spec, "attention_dropout", 0.0) or 0.0) if dropout else 0.0
        ragged = fast_path.ragged_attention_applies(
            attention_implementation=run_options.attention_implementation, dtype=run_options.dtype,
            windows=spec.windows(), softcap=spec.attn_logit_softcap, attention_dropout=attention_dropout,
        )
        pack = fast_path.resolve_packing(packing, ragged_attention=ragged)
        return pack, pack and ragged


def _weights_field(mb: Any) -> dict[str, np.ndarray]:
    return {} if mb.label_weights is None else {"label_weights": mb.label_weights}


@dataclasses.dataclass(frozen=True)
class CausalSFT(Objective):
    """Supervised fine-tuning of a decoder: next-token cross entropy on the label tokens.

    Micro-batches are right-padded (causal attention alone isolates padding) or packed (segment ids keep
    attention within an example; per-example positions).
    """

    def examples_from_texts(self, tokenizer, texts, texts_labels, *, max_length, truncation_mode, eos_token_id):
        return batching.examples_from_texts(
            tokenizer, texts, texts_labels, max_length=max_length, truncation_mode=truncation_mode,
            eos_token_id=eos_token_id,
        )

    def examples_from_tokens(self, input_ids, attention_mask, labels, texts_labels, *, max_length, truncation_mode):
        if texts_labels is not None:
            raise ValueError("texts_labels was given without texts; pass texts=... with it, or labels=... with input_ids.")
        return batching.examples_from_tokens(
            input_ids, attention_mask, labels, max_length=max_length, truncation_mode=truncation_mode
        )

    def plan_local(self, examples, settings, rng, *, shuffle):
        return batching.plan_microbatches(
            examples, rows=settings.rows, buckets=settings.buckets, rng=rng, shuffle=shuffle, pack=settings.pack,
            row_multiple=settings.row_multiple if settings.pack else 1, longer_rows=settings.longer_rows,
            row_lengths=settings.row_lengths,
        )

    def batch_fields(self, mb):
        fields = {"input_ids": mb.input_ids, "labels": mb.labels}
        if mb.packed:
            fields.update(segment_ids=mb.segment_ids, positions=mb.positions, segment_lengths=mb.segment_lengths)
        return {**fields, **_weights_field(mb)}

    def loss(self, model, batch):
        hidden = model.hidden_states(
            batch["input_ids"], positions=batch.get("positions"), segment_ids=batch.get("segment_ids"),
            segment_lengths=batch.get("segment_lengths"), dropout_key=batch.get("dropout_rng"),
        )
        return _scored(self, model.lm_head_operands(hidden), batch, model.dtype, shift=True)


@dataclasses.dataclass(frozen=True)
class Seq2SeqSFT(Objective):
    """Supervised fine-tuning of an encoder-decoder (T5, BART): inputs feed the encoder, labels the decoder.

    Encoder and decoder lengths are bucketed independently; ``decoder_input_ids`` are the labels shifted
    right with the decoder start token, built on the host; the loss is not shifted.
    """

    decoder_start_token_id: int = 0
    pad_token_id: int = 0
    supports_packing: bool = dataclasses.field(default=False, init=False)
    supports_multi_process: bool = dataclasses.field(default=False, init=False)
    supports_predict: bool = dataclasses.field(default=False, init=False)
    texts_fix = "pass either texts with texts_labels or token arrays with labels, not both."

    def examples(self, inputs, **kwargs):
        texts = inputs.get("texts")
        if not batching.is_empty(texts if texts is not None else inputs.get("input_ids")) and inputs.get("labels") is None and inputs.get("texts_labels") is None:
            raise ValueError(  # TRL's message (compat raises it verbatim), naming this method's own argument
                "No 'labels' or 'texts_labels' are provided. When using an encoder-decoder architecture, "
                "'labels' or 'texts_labels' must be passed: labels=... with input_ids, texts_labels=... with texts."
            )
        return super().examples(inputs, **kwargs)

    def examples_from_texts(self, tokenizer, texts, texts_labels, *, max_length, truncation_mode, eos_token_id):
        if texts_labels is None:
            raise ValueError("step(texts=...) on an encoder-decoder needs texts_labels=... (the decoder targets).")
        return batching.seq2seq_examples_from_texts(
            tokenizer, texts, texts_labels, max_length=max_length, truncation_mode=truncation_mode
        )

    def examples_from_tokens(self, input_ids, attention_mask, labels, texts_labels, *, max_length, truncation_mode):
        if labels is None:
            raise ValueError("texts_labels was given without texts; pass texts=... with it, or labels=... with input_ids.")
        return batching.seq2seq_examples_from_tokens(
            input_ids, attention_mask, labels, max_length=max_length, truncation_mode=truncation_mode
        )

    def plan_local(self, examples, settings, rng, *, shuffle):
        return batching.plan_seq2seq_microbatches(
            examples, rows=settings.rows, buckets=settings.buckets, rng=rng, shuffle=shuffle,
            decoder_start_token_id=self.decoder_start_token_id, pad_token_id=self.pad_token_id,
        )

    def batch_fields(self, mb):
        return {
            "input_ids": mb.input_ids, "labels": mb.labels, "attention_mask": mb.attention_mask,
            "decoder_input_ids": mb.decoder_input_ids, **_weights_field(mb),
        }

    def loss(self, model, batch):
        hidden = model.hidden_states(
            batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"], dropout_key=batch.get("dropout_rng"),
        )
        return _scored(self, model.lm_head_operands(hidden), batch, model.dtype, shift=False)


def _scored(objective: Objective, head: Any, batch: Batch, dtype, *, shift: bool):
    """Cross entropy of the lm head's operands (``head.hidden``, ``head.weight``, ``head.softcap``: the model
    interface's) against the batch's labels: (sum, denominator, {"num_tokens"})."""
    loss_sum, denominator = causal_lm_loss(
        head.hidden, head.weight, batch["labels"], chunk_size=objective.chunk_size, compute_dtype=dtype,
        num_shards=objective.num_shards, shift=shift, softcap=head.softcap, weights=batch.get("label_weights"),
    )
    if "label_weights" not in batch:
        return loss_sum, denominator, {"num_tokens": denominator}
    labels = batch["labels"][:, 1:] if shift else batch["labels"]
    num_tokens = jax.lax.stop_gradient(jnp.sum(labels != IGNORE_INDEX).astype(jnp.float32))
    return loss_sum, denominator, {"num_tokens": num_tokens}


def objective_for(model: Any, *, chunk_size: Optional[int] = None, num_shards: int = 1) -> Objective:
    """Supervised fine-tuning of ``model``'s kind: the one place a model kind picks what is trained."""
    spec = model.spec
    if getattr(spec, "is_encoder_decoder", False):
        return Seq2SeqSFT(
            chunk_size=chunk_size, num_shards=num_shards, decoder_start_token_id=spec.decoder_start_token_id,
            pad_token_id=spec.pad_token_id,
        )
    return CausalSFT(chunk_size=chunk_size, num_shards=num_shards)


def loss_chunk_size(config: Any, vocab_size: int, max_length: int) -> int:
    """Tokens per chunk of the fused lm_head + loss: as many as ``loss_chunk_bytes`` of fp32 logits allow.

    A power of two (at least 256), never more than one device's micro-batch tokens, where the
    whole micro-batch is a single chunk with no accumulator. ``TrainConfig.loss_chunk_size`` overrides it.
    """
    if config.loss_chunk_size is not None:
        return config.loss_chunk_size
    tokens_per_device = config.per_device_train_batch_size * max_length
    fitting = max(256, config.loss_chunk_bytes // (4 * vocab_size))
    return min(tokens_per_device, 1 << int(math.log2(fitting)))


def declares_dropout(spec: Any) -> bool:
    """Whether the model's HF config asks for any dropout in training."""
    rates = [getattr(spec, name, 0.0) or 0.0 for name in ("dropout", "attention_dropout", "activation_dropout",
                                                          "embd_dropout", "resid_dropout")]
    return any(rate > 0 for rate in rates)
