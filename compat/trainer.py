"""``compat.IterativeSFTTrainer``: TRL's IterativeSFTTrainer API, trained by jaxsft's JAX core.

Switching is one import::

    from compat import IterativeSFTTrainer, IterativeSFTConfig   # was: from trl import ...

The facade owns no training logic. It validates and converts the torch/TRL world
(a transformers model, TrainingArguments, torch optimizers, lists of tensors) and
delegates every update to :class:`jaxsft.IterativeSFTTrainer`:

* ``model`` (a transformers causal LM, or a local folder) is converted once with
  ``jaxsft.from_pretrained``; ``trainer.model`` stays the caller's torch object and
  is brought up to date *lazily*, the first time it is read after an update, by
  copying the JAX weights into its parameters in place.
* ``args`` go through ``compat.arguments.training_arguments_to_config`` (one
  warning per field that has no effect); ``optimizers=(optimizer, scheduler)``
  through ``compat.optimizers``.
* ``step()`` inputs go through ``compat.inputs.convert_step_inputs`` (TRL's checks
  and messages first, then stricter ones), and every check runs before any state
  changes, so a rejected call leaves the trainer and the torch model untouched.
* ``state``, ``log_history`` and HF ``TrainerCallback`` events (``on_train_begin`` at
  the first update, ``on_log``, ``on_step_end``, ``on_evaluate``) follow
  ``transformers.Trainer``. The core owns the step count, the learning rate, the
  log history and the evaluation metrics (``compute_metrics`` included); HF's
  ``state`` mirrors the step each core event reports. ``report_to`` integrations and
  the console progress callback are HF's own classes, fed by the core's events (one
  mechanism for the facade; JAX users have ``TrainConfig.report_to``).

Deliberate differences from TRL 0.23.1 are listed in docs/compat.md.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import types
import warnings
import weakref
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import jax
import numpy as np
import torch

import jaxsft
from jaxsft.training import batching
from jaxsft.infra.atomic_folder import write_folder
from jaxsft.training.batching import STEP_KEYWORDS
from jaxsft.models.hf_io import is_weights_file
from jaxsft.training.trainer import IterativeSFTTrainer as CoreTrainer
from jaxsft.training.trainer import TrainerCallback as CoreCallback

from compat import peft_models, publishing
from compat.arguments import ignored_argument_message, resume_path, save_steps_of, training_arguments_to_config
from compat.config import IterativeSFTConfig
from compat.evaluation import hf_compute_metrics, is_dataset_dict, torch_preprocess
from compat.inputs import IGNORE_INDEX, convert_step_inputs
from compat.optimizers import optimizer_and_schedule
from compat.torch_models import check_torch_model, dtype_name_of, load_torch_model, local_tokenizer
from compat.torch_sync import TorchWeightSync

# torch model -> the trainer whose sync hooks it carries (the newest one built on it)
_HOOK_OWNER: "weakref.WeakKeyDictionary[Any, weakref.ref]" = weakref.WeakKeyDictionary()


def _tokenizer_base():
    from transformers import PreTrainedTokenizerBase

    return PreTrainedTokenizerBase


class _LearningRateView:
    """``trainer.lr_scheduler``: read-only, with torch's ``get_last_lr()`` (the rate for the next update)."""

    def __init__(self, trainer: "IterativeSFTTrainer"):
        self._trainer = trainer

    @property
    def last_epoch(self) -> int:
        return self._trainer.core.state.global_step

    def get_last_lr(self) -> list[float]:
        rate = self._trainer.core.current_learning_rate()
        return [] if rate is None else [rate]

    def step(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError(
            "trainer.lr_scheduler is a read-only view: the schedule advances by one on every optimizer update that "
            "step() applies. Pass optimizers=(optimizer, scheduler) at construction to change the schedule."
        )

    def __repr__(self) -> str:
        return f"<compat learning-rate view: last_lr={self.get_last_lr()}>"


class _CoreBridge(CoreCallback):
    """Forwards the core's events to the facade, which speaks HF's callback protocol."""

    def __init__(self, facade: "IterativeSFTTrainer"):
        self._facade = facade

    def on_log(self, trainer: CoreTrainer, logs: dict[str, Any]) -> None:
        self._facade._on_core_log(logs)

    def on_step_end(self, trainer: CoreTrainer, step: int) -> None:
        self._facade._on_core_step_end(step)

    def on_evaluate(self, trainer: CoreTrainer, metrics: dict[str, Any], step: int) -> None:
        self._facade._on_core_evaluate(metrics, step)


class IterativeSFTTrainer:
    """TRL's ``IterativeSFTTrainer`` (classic signature, TRL 0.18+'s config), running on jaxsft.

    Args:
        model: a transformers causal LM (Llama, Mistral, Qwen2, Qwen3, SmolLM2, GPT-2) or a local model
            folder, loaded with ``AutoModelForCausalLM.from_pretrained(path, **args.model_init_kwargs)``.
        args: ``transformers.TrainingArguments`` or :class:`compat.IterativeSFTConfig`; ``None`` gives
            ``IterativeSFTConfig(output_dir="<model name>-IterativeSFT")``. A tokenizer passed here (the
            documented ``IterativeSFTTrainer(model, tokenizer)``) is taken as the tokenizer.
        tokenizer / processing_class: the tokenizer (two names for one argument; give at most one).
            ``None``: loaded from the model folder when there is one.
        optimizers: ``(optimizer, scheduler)``: a torch AdamW / Adam / SGD or an optax transformation, and a
            torch LR scheduler (or, with an optax transformation, an optax schedule, used for logging).
        data_collator: accepted for compatibility; jaxsft batches itself (warned unless it is the default
            ``DataCollatorForLanguageModeling(mlm=False)``).
        eval_dataset: a ``datasets.Dataset`` (``input_ids``/``attention_mask``/``labels`` or ``text``
            columns), a dict of ``step()`` keywords, a list of strings or of token sequences.
        max_length, truncation_mode, optimize_device_cache: the classic keywords; the same fields of
            ``IterativeSFTConfig`` are used when these are left at their defaults.
        preprocess_logits_for_metrics, compute_metrics: as ``transformers.Trainer``, used by ``evaluate()``.
        callbacks: extra HF ``TrainerCallback`` classes or instances (keyword only).
        mesh: a jaxsft device mesh (keyword only); default: every device on the data axis.
        peft_config: a ``peft.LoraConfig`` (keyword only, as TRL's SFTTrainer takes it): the model is
            wrapped with ``peft.get_peft_model`` and only its adapters train. ``model`` may also be a
            ``peft.PeftModel`` with one LoRA adapter; other PEFT methods are refused.
    """

    _tag_names = list(publishing.TAGS[:2])

    def __init__(
        self,
        model: Any = None,
        args: Any = None,
        tokenizer: Any = None,
        optimizers: Any = (None, None),
        data_collator: Any = None,
        eval_dataset: Any = None,
        max_length: Optional[int] = None,
        truncation_mode: str = "keep_end",
        preprocess_logits_for_metrics: Optional[Callable] = None,
        compute_metrics: Optional[Callable] = None,
        optimize_device_cache: bool = False,
        *,
        processing_class: Any = None,
        callbacks: Optional[Sequence[Any]] = None,
        mesh: Optional[jax.sharding.Mesh] = None,
        peft_config: Any = None,
    ):
        from transformers import TrainingArguments

        # ---- tokenizer: two names, and the documented positional (model, tokenizer) form
        if tokenizer is not None and processing_class is not None:
            raise ValueError(
                "Both `tokenizer` and `processing_class` were given; they are the same argument (TRL renamed it in "
                "0.12). Pass only one."
            )
        name = "processing_class" if processing_class is not None else "tokenizer"
        tokenizer = processing_class if processing_class is not None else tokenizer
        if isinstance(args, _tokenizer_base()):
            if tokenizer is not None:
                raise ValueError(
                    f"args is a tokenizer ({type(args).__name__}) and {name} was given too; pass TrainingArguments "
                    f"or IterativeSFTConfig as args."
                )
            tokenizer, args = args, None
        if tokenizer is not None and not isinstance(tokenizer, _tokenizer_base()):
            hint = ""
            if callable(tokenizer) and not isinstance(tokenizer, type):
                hint = (
                    "; the positional order is the classic one, (model, args, tokenizer, optimizers, data_collator, "
                    "...): pass a data collator as data_collator=..."
                )
            raise ValueError(
                f"{name} must be a PreTrainedTokenizerBase like a PreTrainedTokenizer or a PreTrainedTokenizerFast, "
                f"got {type(tokenizer)}{hint}"
            )

        # ---- model (type checks before any loading)
        from transformers import PreTrainedModel

        if isinstance(model, (str, os.PathLike)):
            model_id: Optional[str] = os.fspath(model)
        elif isinstance(model, PreTrainedModel) or peft_models.is_peft_model(model):
            model_id = getattr(model.config, "_name_or_path", "") or None
        else:
            raise ValueError(
                f"model must be a PreTrainedModel, got {type(model)}; pass a transformers causal LM or a local "
                "model folder (for a jaxsft CausalLM use jaxsft.IterativeSFTTrainer)."
            )

        # ---- args
        if args is None:
            stem = (model_id or getattr(getattr(model, "config", None), "model_type", None) or "model")
            args = IterativeSFTConfig(output_dir=f"{stem.rstrip('/').split('/')[-1]}-IterativeSFT")
        if not isinstance(args, TrainingArguments):
            raise TypeError(
                f"args must be a transformers.TrainingArguments or compat.IterativeSFTConfig - got {type(args)}; "
                "build one with IterativeSFTConfig(output_dir=...)."
            )
        self.args = args
        self.max_length = _pick("max_length", max_length, None, getattr(args, "max_length", None))
        self.truncation_mode = _pick("truncation_mode", truncation_mode, "keep_end",
                                     getattr(args, "truncation_mode", "keep_end"))
        self.optimize_device_cache = bool(
            _pick("optimize_device_cache", optimize_device_cache, False, getattr(args, "optimize_device_cache", False))
        )
        config, ignored = training_arguments_to_config(
            args, max_length=self.max_length, truncation_mode=self.truncation_mode
        )
        opt, sched = _split_optimizers(optimizers)
        if (peft_config is not None or peft_models.is_peft_model(model)) and isinstance(opt, torch.optim.Optimizer):
            raise ValueError(
                "optimizers=(torch optimizer, ...) with a PEFT model: jaxsft cannot map a torch optimizer's groups onto "
                "the adapters; pass optimizers=(None, None) (AdamW from args) or an optax transformation."
            )
        eval_steps = config.eval_steps
        if eval_steps and eval_dataset is None:
            raise ValueError(
                f"args.eval_steps={args.eval_steps} makes step() evaluate every {eval_steps} updates, but no "
                "eval_dataset was given; pass eval_dataset=... or set eval_steps=None."
            )
        for field in ignored:
            warnings.warn(ignored_argument_message(args, field), UserWarning, stacklevel=2)
        _warn_about_collator(data_collator)

        # ---- load and convert (the first expensive work)
        model_init_kwargs = getattr(args, "model_init_kwargs", None)
        if isinstance(model, PreTrainedModel) or peft_models.is_peft_model(model):
            if model_init_kwargs:
                warnings.warn(
                    "You passed model_init_kwargs to the `IterativeSFTConfig`, but your model is already "
                    "instantiated. The `model_init_kwargs` will be ignored.",
                    UserWarning,
                    stacklevel=2,
                )
            torch_model = model
        else:
            torch_model = load_torch_model(model_id, model_init_kwargs or {})
        torch_model = peft_models.wrap(torch_model, peft_config)  # a PeftModel to train the adapters of, or as is
        peft = peft_models.is_peft_model(torch_model)
        check_torch_model(torch_model.get_base_model() if peft else torch_model, adapters=peft)
        if tokenizer is None:
            tokenizer = local_tokenizer(model_id)
        self.processing_class = tokenizer
        self.is_encoder_decoder = bool(getattr(torch_model.config, "is_encoder_decoder", False))
        self._pad_token_id = getattr(torch_model.config, "pad_token_id", None)
        core_eval = self._core_eval_dataset(eval_dataset, eval_steps)  # checked before the JAX conversion

        from transformers import set_seed

        set_seed(int(args.seed))  # as Trainer.__init__: seeds python, numpy and torch (e.g. for generate())
        jax_model = jaxsft.from_pretrained(torch_model, mesh=mesh)  # a PeftModel: base and adapters
        self._sync = peft_models.TorchAdapterSync(torch_model) if peft else TorchWeightSync(torch_model, jax_model.spec)
        config, tx, schedule = optimizer_and_schedule(opt, sched, config, torch_model, jax_model.spec)

        self._torch_model = torch_model
        self.data_collator = data_collator
        self.is_peft_model = peft
        self._torch_optimizers = (opt, sched)
        core_config = dataclasses.replace(config, disable_tqdm=True)  # progress: HF's ProgressCallback
        self.core = CoreTrainer(
            jax_model, core_config, tokenizer, optimizer=tx, schedule=schedule, mesh=mesh,
            eval_dataset=core_eval, callbacks=[_CoreBridge(self)],
        )
        self._eval_dataset = eval_dataset  # the caller's object; the core holds it converted
        self.compute_metrics = compute_metrics
        self.preprocess_logits_for_metrics = preprocess_logits_for_metrics
        self._synced_version = self.core.params_version
        self._hook_handles = _install_sync_hooks(torch_model, weakref.ref(self))
        weakref.finalize(self, _remove_hooks, self._hook_handles)
        previous = _HOOK_OWNER.get(torch_model)
        if previous is not None and previous() is not None:  # a newer trainer now drives this torch model
            _remove_hooks(previous()._hook_handles)
        _HOOK_OWNER[torch_model] = weakref.ref(self)
        self._stepping = False
        self._update_open = False
        self._train_begun = False

        from transformers import TrainerControl, TrainerState

        zero = jax.process_index() == 0
        self.state = TrainerState(is_local_process_zero=zero, is_world_process_zero=zero)
        self.state.log_history = self.core.state.log_history  # one list, appended by the core
        self.state.max_steps = max(config.max_steps, 0)
        self.state.logging_steps = config.logging_steps
        self.state.eval_steps = eval_steps
        self.state.save_steps = save_steps_of(args, config.max_steps)
        self.state.train_batch_size = self.core.rows
        self.control = TrainerControl()
        self.callback_handler = _make_callback_handler(self, callbacks)
        resume = resume_path(args)
        if resume is not None:
            self.restore_checkpoint(resume)

    # ------------------------------------------------------------------ the torch view
    @property
    def model(self) -> Any:
        """The caller's torch model, holding the current trained weights (synced lazily, in place)."""
        self._sync_torch_model()
        return self._torch_model

    def sync_model(self) -> Any:
        """Copy the trained weights into the caller's torch model now (if an update happened since the last
        copy) and return that model.

        Most reads sync by themselves: ``trainer.model``, and on the caller's own reference ``forward`` (so
        ``generate``), ``state_dict()`` (so ``save_pretrained``), ``parameters()`` and ``named_parameters()``.
        A tensor reached as an attribute (``model.lm_head.weight``) or held from before ``step()`` is only
        current after a sync: call this first. Syncing after every step instead would copy the whole model
        each update (on one H200 with the torch model on the CPU, 5x the step; benchmarks/RESULTS.md).
        """
        self._sync_torch_model()
        return self._torch_model

    def _sync_torch_model(self) -> None:
        """Copy the JAX weights into the torch model if an update happened since the last copy.

        Runs when ``trainer.model`` is read, and through hooks when the caller's own reference to the torch
        model runs ``forward`` (so ``generate``), ``state_dict`` (so ``save_pretrained``), ``parameters`` or
        ``named_parameters``.
        """
        version = self.core.params_version
        if version != self._synced_version:
            self._sync.copy_from(self.core.model)
            self._synced_version = version

    @model.setter
    def model(self, value: Any) -> None:
        raise AttributeError(
            "trainer.model cannot be replaced: the JAX copy the trainer updates was built from the model given at "
            "construction. Build a new trainer for another model."
        )

    def generate(self, input_ids: Any = None, attention_mask: Any = None, **kwargs: Any) -> torch.Tensor:
        """``model.generate`` for TRL loops, on the trained JAX weights (no copy to torch): HF's common keywords
        (``max_new_tokens``, ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``num_return_sequences``,
        ``eos_token_id``, ``pad_token_id``) in, HF's LongTensor (prompt + new tokens) out. See compat.generation."""
        from compat.generation import generate

        config = getattr(self._torch_model, "generation_config", None)
        return generate(self.core, config, input_ids, attention_mask, **kwargs)

    @property
    def jax_model(self):
        """The jaxsft CausalLM with the current weights (no copy)."""
        return self.core.model

    @property
    def tokenizer(self) -> Any:
        """TRL < 0.12's name for ``processing_class``."""
        return self.processing_class

    @property
    def optimizer(self) -> Any:
        """The optax transformation that updates the weights, clipping included (a torch optimizer given at
        construction was translated into it; its own state and ``param_groups`` are not updated)."""
        return self.core.optimizer

    # ------------------------------------------------------------------ evaluation settings (kept in the core)
    @property
    def eval_dataset(self) -> Any:
        return self._eval_dataset

    @eval_dataset.setter
    def eval_dataset(self, dataset: Any) -> None:
        """The caller's object stays here; the core gets it converted to step() keywords (checked now)."""
        self.core.eval_dataset = self._core_eval_dataset(dataset, self.core.config.eval_steps)
        self._eval_dataset = dataset

    @property
    def compute_metrics(self) -> Optional[Callable]:
        return self._compute_metrics

    @compute_metrics.setter
    def compute_metrics(self, fn: Optional[Callable]) -> None:
        """HF's ``compute_metrics(EvalPrediction)``; the core calls it with its own numpy predictions."""
        self._compute_metrics = fn
        self.core.compute_metrics = None if fn is None else hf_compute_metrics(fn)

    @property
    def preprocess_logits_for_metrics(self) -> Optional[Callable]:
        return self._preprocess_logits

    @preprocess_logits_for_metrics.setter
    def preprocess_logits_for_metrics(self, fn: Optional[Callable]) -> None:
        """HF's ``preprocess_logits_for_metrics(logits, labels)`` on torch tensors, once per eval batch."""
        self._preprocess_logits = fn
        self.core.preprocess_logits_for_metrics = None if fn is None else torch_preprocess(fn)

    @property
    def lr_scheduler(self) -> _LearningRateView:
        return _LearningRateView(self)

    # ------------------------------------------------------------------ training
    def step(
        self,
        input_ids: Any = None,
        attention_mask: Any = None,
        labels: Any = None,
        texts: Any = None,
        texts_labels: Any = None,
        **unexpected: Any,
    ) -> dict[str, Any]:
        """Train on one batch of examples; returns the step's statistics (TRL documented a dict, returned None).

        Token inputs: lists of 1-D tensors / arrays / int lists, or 2-D tensors, with optional
        ``attention_mask`` (0 = padding, dropped) and ``labels`` (-100 = not learned; default: input_ids).
        Text inputs: ``texts``, optionally with ``texts_labels`` (completions appended to each text and
        learned alone). The examples are shuffled and cut into micro-batches of
        ``per_device_train_batch_size``; every ``gradient_accumulation_steps`` micro-batches make one update.
        """
        inputs = self._core_inputs("step", input_ids, attention_mask, labels, texts, texts_labels, unexpected)
        self._stepping = True
        try:
            stats = self.core.step(**inputs.as_kwargs())
        finally:
            self._stepping = self._update_open = False
            self._mirror_core_state(self.core.state.global_step)
        if self.optimize_device_cache:
            del inputs
            _free_device_memory()
        return stats

    def precompile(
        self,
        input_ids: Any = None,
        attention_mask: Any = None,
        labels: Any = None,
        texts: Any = None,
        texts_labels: Any = None,
        **unexpected: Any,
    ) -> dict[str, Any]:
        """A jaxsft addition (TRL has none): compile, without training, what :meth:`step` with these inputs would
        run, so a loop's first ``step()`` compiles nothing. Takes ``step()``'s arguments, converted as it converts
        them; the core's ``precompile`` (``jaxsft.IterativeSFTTrainer.precompile``) says what it returns. The
        model, optimizer and schedule are left as they were."""
        inputs = self._core_inputs("precompile", input_ids, attention_mask, labels, texts, texts_labels, unexpected)
        return self.core.precompile(**inputs.as_kwargs())

    def _core_inputs(self, call: str, input_ids, attention_mask, labels, texts, texts_labels, unexpected: dict):
        """step()'s arguments as the core's inputs, checked (``call`` names the method in the errors)."""
        if unexpected:
            raise TypeError(
                f"{call}() got unexpected keyword argument(s) {', '.join(sorted(unexpected))}; it accepts "
                f"{', '.join(STEP_KEYWORDS)}."
            )
        inputs = convert_step_inputs(
            input_ids, attention_mask, labels, texts, texts_labels, is_encoder_decoder=self.is_encoder_decoder
        )
        if inputs.texts is not None and self.processing_class is None:
            raise ValueError(
                f"{call}(texts=...) needs a tokenizer, and none was given or found in the model folder; pass "
                "processing_class=<tokenizer> to the trainer, or pass input_ids=... instead."
            )
        if self.is_encoder_decoder and inputs.labels is not None:
            inputs = dataclasses.replace(inputs, labels=self._seq2seq_label_padding(inputs.labels))
        return inputs

    def _seq2seq_label_padding(self, labels: list) -> list:
        """TRL's seq2seq collation: every label equal to the pad id becomes -100 (DataCollatorForSeq2Seq pads
        labels with -100 itself; TRL then masks the pad id too, so padded label tensors work either way)."""
        pad = getattr(self.processing_class, "pad_token_id", None)
        if pad is None:
            pad = self._pad_token_id
        return [np.where(np.asarray(row) == pad, IGNORE_INDEX, row) for row in labels]

    def _core_eval_kwargs(self, dataset: Any) -> dict[str, Any]:
        """An eval dataset in any accepted form -> the core's step()-keyword dict (converted as step() inputs are;
        errors name eval_dataset)."""
        try:
            inputs = convert_step_inputs(**batching.step_inputs_of_dataset(dataset), is_encoder_decoder=self.is_encoder_decoder)
        except (TypeError, ValueError) as err:
            raise type(err)(f"eval_dataset: {err}") from None
        if self.is_encoder_decoder and inputs.labels is not None:
            inputs = dataclasses.replace(inputs, labels=self._seq2seq_label_padding(inputs.labels))
        return {k: v for k, v in inputs.as_kwargs().items() if v is not None}

    def _core_eval_dataset(self, dataset: Any, eval_steps: Optional[int]) -> Optional[dict[str, Any]]:
        """What the core evaluates during step(): one dataset, converted; a dict of named sets only by evaluate()."""
        if dataset is None:
            return None
        if not is_dataset_dict(dataset):
            return self._core_eval_kwargs(dataset)
        if eval_steps:
            raise ValueError(
                f"eval_dataset is a dict of named datasets ({sorted(dataset)}); in-training evaluation (eval_steps) "
                "measures one dataset. Pass one dataset, or call trainer.evaluate() for each."
            )
        return None

    def train(self, *args: Any, **kwargs: Any) -> None:
        raise ValueError(
            "Trainer: training requires a train_dataset. IterativeSFTTrainer has no train(): call "
            "trainer.step(input_ids=... or texts=...) for each batch you generate."
        )

    # ------------------------------------------------------------------ events from the core
    def _mirror_core_state(self, step: int) -> None:
        """HF's ``state`` shows the core's counters (the core owns them); ``step`` is the reported update's."""
        self.state.global_step = int(step)
        self.state.num_input_tokens_seen = self.core.state.num_input_tokens_seen

    def _open_update(self, step: int) -> None:
        """The first event of an update inside step(): fire on_train_begin once, then show the update's step.

        The core reports an update's events in order (its evaluation, its log, on_step_end) after the
        call's updates have run, each with its update's number; ``state.global_step`` shows that number,
        so callbacks see each update's step.
        """
        if not self._stepping or self._update_open:
            return
        self._update_open = True
        if not self._train_begun:
            self._train_begun = True
            self.control = self.callback_handler.on_train_begin(self.args, self.state, self.control)
        self._mirror_core_state(step)

    def _on_core_log(self, logs: dict[str, Any]) -> None:
        self._open_update(logs["step"])
        shown = {k: v for k, v in logs.items() if k != "step"}  # HF passes logs without "step" to on_log
        self.control = self.callback_handler.on_log(self.args, self.state, self.control, shown)

    def _on_core_evaluate(self, metrics: dict[str, Any], step: int) -> None:
        self._open_update(step)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics=metrics)

    def _on_core_step_end(self, step: int) -> None:
        self._open_update(step)
        self.control = self.callback_handler.on_step_end(self.args, self.state, self.control)
        self._update_open = False

    # ------------------------------------------------------------------ logging and callbacks (HF API)
    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        """Append ``{**logs, "step": global_step}`` to ``state.log_history`` and fire ``on_log`` (as HF Trainer).

        The core keeps the history and fires its ``on_log``, which reaches the HF callbacks.
        """
        self.core.log(dict(logs))

    def add_callback(self, callback: Any) -> None:
        self.callback_handler.add_callback(callback)

    def pop_callback(self, callback: Any) -> Any:
        return self.callback_handler.pop_callback(callback)

    def remove_callback(self, callback: Any) -> None:
        self.callback_handler.remove_callback(callback)

    def is_world_process_zero(self) -> bool:
        return self.state.is_world_process_zero

    def is_local_process_zero(self) -> bool:
        return self.state.is_local_process_zero

    # ------------------------------------------------------------------ evaluation
    def evaluate(
        self, eval_dataset: Any = None, ignore_keys: Optional[list[str]] = None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        """``eval_loss`` (mean token loss, computed by the JAX model) plus ``compute_metrics``; fires ``on_evaluate``.

        With ``compute_metrics``, logits come from the JAX model on right-padded batches, go through
        ``preprocess_logits_for_metrics(logits, labels)`` (torch tensors, as HF) and reach
        ``compute_metrics`` as an ``EvalPrediction`` of numpy arrays padded with -100, labels aligned with
        input_ids (the shift happens in the loss, as in HF).
        """
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("Trainer: evaluation requires an eval_dataset.")
        if is_dataset_dict(dataset):  # HF: a dict of named eval sets
            metrics: dict[str, float] = {}
            for key, value in dataset.items():
                metrics.update(self.evaluate(value, ignore_keys, f"{metric_key_prefix}_{key}"))
            return metrics
        return self.core.evaluate(
            self._core_eval_kwargs(dataset), ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix
        )

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, output_dir: Optional[str] = None) -> str:
        """Write the whole training state to ``<output_dir>/checkpoint-<global_step>`` (default ``args.output_dir``).

        The core's checkpoint (see :meth:`jaxsft.IterativeSFTTrainer.save_checkpoint`): weights, optimizer
        state, step counters, log history and the shuffling RNG, committed atomically; ``args.save_total_limit``
        keeps the newest N. Call it on every process. Returns the folder.
        """
        directory = str(output_dir if output_dir is not None else self.args.output_dir)
        return self.core.save_checkpoint(directory, keep_last=getattr(self.args, "save_total_limit", None))

    def restore_checkpoint(self, path: str) -> None:
        """Load a ``checkpoint-N`` folder from :meth:`save_checkpoint` (all or nothing); the run continues from it.

        ``state.global_step`` and ``state.log_history`` are the core's (one list); the torch model receives
        the restored weights the next time it is read.
        """
        self.core.restore_checkpoint(str(path))
        self.state.global_step = self.core.state.global_step
        self.state.num_input_tokens_seen = self.core.state.num_input_tokens_seen

    # ------------------------------------------------------------------ saving and sharing
    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        """Write a folder ``transformers`` loads: config, safetensors weights (the torch model's dtype),
        generation config, tokenizer and ``training_args.bin``. A PeftModel's folder is PEFT's: the
        adapter (adapter_config.json + adapter_model.safetensors), tokenizer and ``training_args.bin``."""
        output_dir = Path(output_dir if output_dir is not None else self.args.output_dir)
        if not self.state.is_world_process_zero:  # every process gathers its shards; only process 0 writes
            if self.is_peft_model:
                peft_models.save_adapter(self.core.model, output_dir)
            else:
                jaxsft.save_pretrained(self.core.model, output_dir, dtype=dtype_name_of(self._torch_model))
            return
        # Written whole into a folder beside output_dir and swapped in when complete: a failure (a full disk)
        # leaves the previous save exactly as it was and raises OSError naming output_dir.
        write_folder(output_dir, self._write_saved_model, what="save_model", replaces=is_weights_file)

    def _write_saved_model(self, folder: Path) -> None:
        """Everything save_model writes, into ``folder`` (a fresh temporary one)."""
        if self.is_peft_model:
            peft_models.save_adapter(self.core.model, folder)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(str(folder))
            torch.save(self.args, folder / "training_args.bin")
            return
        dtype = dtype_name_of(self._torch_model)
        jaxsft.save_pretrained(self.core.model, folder, tokenizer=self.processing_class, dtype=dtype)
        generation_config = getattr(self._torch_model, "generation_config", None)
        if generation_config is not None:
            try:
                generation_config.save_pretrained(str(folder))
            except Exception as err:  # an invalid generation config must not lose the weights
                warnings.warn(f"save_model: generation_config was not saved: {err}", UserWarning, stacklevel=2)
        torch.save(self.args, folder / "training_args.bin")

    def create_model_card(
        self,
        model_name: Optional[str] = None,
        dataset_name: Optional[str] = None,
        tags: Union[str, list[str], None] = None,
    ) -> None:
        """Write ``<output_dir>/README.md`` (trainer "Iterative SFT", tags trl, iterative-sft, jaxsft)."""
        if not self.state.is_world_process_zero:
            return
        card = publishing.model_card(publishing.base_model_of(self._torch_model.config), model_name, dataset_name, tags,
                                     title=model_name or Path(self.args.output_dir).name)
        output_dir = Path(self.args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "README.md").write_text(card)

    def push_to_hub(
        self,
        commit_message: Optional[str] = "End of training",
        blocking: bool = True,
        token: Optional[str] = None,
        revision: Optional[str] = None,
        **kwargs: Any,
    ) -> Any:
        """Save to ``args.output_dir``, write the model card, and upload the folder with ``HfApi().upload_folder``.

        The repository is ``args.hub_model_id`` or the output folder's name. Offline (``HF_HUB_OFFLINE=1``) or
        unreachable Hub: ``ConnectionError`` saying so; the files stay in ``output_dir``.
        """
        output_dir = str(self.args.output_dir)
        self.save_model(output_dir)
        card_kwargs = {k: kwargs.pop(k) for k in ("model_name", "dataset_name", "tags") if k in kwargs}
        self.create_model_card(**card_kwargs)
        if not self.state.is_world_process_zero:
            return None
        repo_id = getattr(self.args, "hub_model_id", None) or Path(output_dir).absolute().name
        return publishing.upload_folder(
            output_dir, repo_id, token=token or getattr(self.args, "hub_token", None),
            private=getattr(self.args, "hub_private_repo", None), commit_message=commit_message, revision=revision,
            blocking=blocking,
        )


# ---------------------------------------------------------------------------------------------- helpers
def _pick(name: str, passed: Any, default: Any, from_args: Any) -> Any:
    """A classic trainer keyword vs the IterativeSFTConfig field: the one that was set; both set and different: error."""
    if passed is None or passed == default:
        return from_args
    if from_args is not None and from_args != default and from_args != passed:
        raise ValueError(
            f"{name}={passed!r} was passed to the trainer but args.{name}={from_args!r}; set it in one place "
            f"(IterativeSFTConfig.{name} is the current one)."
        )
    return passed


def _split_optimizers(optimizers: Any) -> tuple[Any, Any]:
    if optimizers is None:
        return None, None
    if not isinstance(optimizers, (tuple, list)) or len(optimizers) != 2:
        raise TypeError(
            f"optimizers must be a tuple (optimizer, scheduler), either of which may be None - got {optimizers!r}."
        )
    opt, sched = optimizers
    if opt is None and sched is not None:
        raise ValueError(
            "optimizers=(None, scheduler): a scheduler drives the optimizer it was built with; pass that optimizer "
            "too, optimizers=(optimizer, scheduler)."
        )
    return opt, sched


def _warn_about_collator(collator: Any) -> None:
    if collator is None:
        return
    from transformers import DataCollatorForLanguageModeling

    if isinstance(collator, DataCollatorForLanguageModeling) and not collator.mlm:
        return  # what TRL used for causal models; jaxsft's batching does the same job
    warnings.warn(
        f"data_collator={type(collator).__name__} is not used: jaxsft pads, batches and builds labels itself "
        "(labels = input_ids, or the labels / texts_labels you pass; padding masked by attention_mask).",
        UserWarning,
        stacklevel=3,
    )


def _make_callback_handler(trainer: IterativeSFTTrainer, callbacks: Optional[Iterable[Any]]):
    from transformers.integrations import get_reporting_integration_callbacks
    from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback, PrinterCallback, ProgressCallback

    report_to = trainer.args.report_to  # HF's own integration callbacks, as HF Trainer builds them
    chosen = [DefaultFlowCallback] + list(get_reporting_integration_callbacks(report_to)) + list(callbacks or [])
    # The torch model itself (isinstance checks keep working); its forward / state_dict hooks sync it on use.
    handler = CallbackHandler(chosen, trainer._torch_model, trainer.processing_class, None, _LearningRateView(trainer))
    handler.add_callback(PrinterCallback if trainer.args.disable_tqdm else ProgressCallback)
    return handler


def _install_sync_hooks(torch_model: Any, trainer_ref: "weakref.ref[IterativeSFTTrainer]") -> list[Any]:
    """Sync before the caller's torch model computes, is serialised or has its parameters listed (weakly: the
    hooks keep nothing alive). Each hook costs one version comparison when nothing changed."""

    def hook(*_args: Any, **_kwargs: Any) -> None:
        trainer = trainer_ref()
        if trainer is not None:
            trainer._sync_torch_model()

    if "named_parameters" not in vars(torch_model):
        # torch has no hook for listing parameters: an instance attribute shadows the method (parameters()
        # calls named_parameters()). It asks _HOOK_OWNER for the model's current trainer, so it needs no handle;
        # being a bound method, a deepcopy of the model binds it to the copy, which has no trainer (no sync).
        torch_model.named_parameters = types.MethodType(_synced_named_parameters, torch_model)
    return [torch_model.register_forward_pre_hook(hook), torch_model.register_state_dict_pre_hook(hook)]


def _synced_named_parameters(module: Any, *args: Any, **kwargs: Any):
    owner = _HOOK_OWNER.get(module)
    trainer = owner() if owner is not None else None
    if trainer is not None:
        trainer._sync_torch_model()
    return type(module).named_parameters(module, *args, **kwargs)


# Pickling a bound method looks its name up on the object again: let that find the class's method.
_synced_named_parameters.__name__ = "named_parameters"


def _remove_hooks(handles: list[Any]) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()


def _free_device_memory() -> None:
    """optimize_device_cache: drop what is no longer referenced (donated buffers are already freed by XLA).

    JAX has no public equivalent of ``torch.cuda.empty_cache()``; clearing JAX's caches would throw away the
    compiled programs, so this only collects garbage, which releases device buffers held by dead objects.
    """
    gc.collect()


__all__ = ["IterativeSFTTrainer", "IterativeSFTConfig"]
