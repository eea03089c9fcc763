"""The JAX-native IterativeSFTTrainer: state, RNG, schedule position, logging.

``step()`` validates everything before touching state, turns the call's examples
into bucketed micro-batches, and runs one ahead-of-time compiled program per
update (or per micro-batch with gradient accumulation). Programs are cached by
shape, so the count in ``compiled_shapes`` is exact and a varying loop never
recompiles beyond the declared buckets.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxsft import batching, compile_options, distributed
from jaxsft import checkpoint as checkpointing
from jaxsft import sharding as shd
from jaxsft import step as step_fns
from jaxsft.config import TrainConfig
from jaxsft.models import lora as lora_lib
from jaxsft.models.decoder import CausalLM
from jaxsft.models.options import RunOptions, with_options
from jaxsft.optim import make_optimizer, make_schedule


@dataclasses.dataclass
class TrainerState:
    """What HF's TrainerState holds that matters here."""

    global_step: int = 0
    log_history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    num_input_tokens_seen: int = 0
    total_label_tokens: int = 0


class TrainerCallback:
    """Hooks the trainer fires; override what you need (the facade bridges HF callbacks here)."""

    def on_log(self, trainer: "IterativeSFTTrainer", logs: dict[str, Any]) -> None: ...

    def on_step_end(self, trainer: "IterativeSFTTrainer") -> None: ...

    def on_evaluate(self, trainer: "IterativeSFTTrainer", metrics: dict[str, Any]) -> None: ...


STEP_KEYWORDS = ("input_ids", "attention_mask", "labels", "texts", "texts_labels")


class IterativeSFTTrainer:
    """Fine-tune a jaxsft causal LM with ``step()`` calls between your own generate/filter work.

    ``model`` is a :class:`jaxsft.models.CausalLM` (from ``jaxsft.from_pretrained``).
    ``optimizer`` replaces the AdamW built from ``config`` with any optax
    transformation (pass ``schedule`` too if you want its rate logged).
    ``mesh`` defaults to the model's mesh (all local devices on the data axis for a
    plain ``from_pretrained``).
    """

    def __init__(
        self,
        model: CausalLM,
        config: Optional[TrainConfig] = None,
        tokenizer: Any = None,
        *,
        optimizer: Optional[optax.GradientTransformation] = None,
        schedule: Optional[optax.Schedule] = None,
        mesh: Optional[jax.sharding.Mesh] = None,
        eval_dataset: Any = None,
        callbacks: Sequence[TrainerCallback] = (),
    ):
        if not isinstance(model, CausalLM):
            raise TypeError(
                f"model must be a jaxsft CausalLM (use jaxsft.from_pretrained(path_or_torch_model)), got "
                f"{type(model).__name__}."
            )
        if config is None:
            config = TrainConfig()
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a jaxsft.TrainConfig, got {type(config).__name__}.")
        if optimizer is not None and not isinstance(optimizer, optax.GradientTransformation):
            raise TypeError(f"optimizer must be an optax.GradientTransformation, got {type(optimizer).__name__}.")
        self.config = config
        self._user_model = model
        self.tokenizer = tokenizer
        self.eval_dataset = eval_dataset
        self.callbacks = list(callbacks)
        self.state = TrainerState()
        self.spec = model.spec

        self.mesh = mesh if mesh is not None else shd.mesh_of(nnx.state(model))
        self.buckets = config.buckets(model.spec.max_position_embeddings)
        self.max_length = self.buckets[-1]
        self.rows = config.per_device_train_batch_size * shd.batch_rows_multiple(self.mesh)
        self.eval_rows = config.per_device_eval_batch_size * shd.batch_rows_multiple(self.mesh)
        self._check_tensor_axis()
        self._xla_options = dict(config.xla_options or {})  # {}: XLA's defaults
        compile_options.check(self._xla_options)
        shd.check_batch_split_over_processes(self.mesh)

        # The training view: the model's arrays under the config's compute options (a derived module;
        # the caller's model keeps its own options).
        self.run_options = config.run_options(RunOptions.of(model), fsdp=self.mesh.shape["fsdp"])
        self.scan_layers = self.run_options.scan_layers
        view = with_options(model, self.run_options)
        if lora_lib.lora_setup(model) is None:
            self._graphdef, params = nnx.split(view)
            frozen: tuple = ()
        else:  # LoRA: only the adapters train; the base weights are frozen program inputs, never donated
            self._graphdef, params, *frozen = nnx.split(view, lora_lib.LoraParam, ...)
        self._params = shd.place_state(params, self.mesh)
        self._frozen = tuple(shd.place_state(f, self.mesh) for f in frozen)

        if optimizer is None:
            schedule = make_schedule(config)
            optimizer = make_optimizer(config, schedule)
        self._schedule = schedule
        self._tx = optimizer
        with jax.set_mesh(self.mesh):
            # Moments take their parameter's sharding (zeros_like under jit would replicate them).
            opt_shardings = shd.optimizer_state_shardings(jax.eval_shape(self._tx.init, self._params), self._params, self.mesh)
            self._opt_state = jax.jit(self._tx.init, out_shardings=opt_shardings)(self._params)
        self._rng = np.random.default_rng(config.seed)
        self._shards = shd.batch_rows_multiple(self.mesh)
        self._chunk_size = self._loss_chunk_size()
        self._programs: dict[tuple, Any] = {}
        self._params_version = 0
        self._last_logged_step = 0
        self._loss_since_log: list[float] = []

    # ------------------------------------------------------------------ public
    @property
    def model(self) -> CausalLM:
        """The model with the current weights (a view sharing the trainer's arrays).

        Re-read it after each ``step()``: the previous arrays are donated to the update.
        """
        return nnx.merge(self._graphdef, self._params, *self._frozen)

    @property
    def params(self) -> nnx.State:
        """The trained parameters: every weight, or only the adapters of a LoRA model."""
        return self._params

    @property
    def frozen_params(self) -> tuple[nnx.State, ...]:
        """Weights used but never trained (a LoRA model's base); empty for full fine-tuning."""
        return self._frozen

    @property
    def params_version(self) -> int:
        """Bumped by every applied update; lets the facade sync torch weights lazily."""
        return self._params_version

    @property
    def compiled_shapes(self) -> int:
        return len(self._programs)

    def current_learning_rate(self) -> Optional[float]:
        if self._schedule is None:
            return None
        return float(self._schedule(self.state.global_step))

    def step(
        self,
        input_ids: Any = None,
        attention_mask: Any = None,
        labels: Any = None,
        texts: Optional[Sequence[str]] = None,
        texts_labels: Optional[Sequence[str]] = None,
    ) -> dict[str, Any]:
        """Train on one call's examples (shuffled, micro-batched, accumulated) and return stats.

        Token inputs: lists of 1-D integer arrays or a 2-D array with its mask.
        Text inputs: ``texts`` (and optionally ``texts_labels``, learned alone,
        after their prompt). Every check runs before any state changes. A call's
        leftover micro-batches (fewer than gradient_accumulation_steps) still make
        one update.
        """
        examples = self._examples(input_ids, attention_mask, labels, texts, texts_labels)
        started = time.perf_counter()
        microbatches = batching.plan_microbatches(
            examples, rows=self.rows // jax.process_count(), buckets=self.buckets, rng=self._rng
        ) if examples else []  # multi-process: this process has nothing this call (filler micro-batches below)
        microbatches = distributed.agree_on_microbatches(microbatches, self.rows // jax.process_count())
        updates = batching.group_into_updates(microbatches, self.config.gradient_accumulation_steps)
        totals = distributed.global_label_counts(updates)

        per_update_metrics = []
        applied_steps = []
        eval_metrics: dict[int, dict[str, float]] = {}
        progress = self._progress(len(updates))
        for update, total in zip(updates, totals):
            if total == 0:
                warnings.warn(
                    "step(): an update had no label tokens (all labels -100 or masked); it was skipped and "
                    "the weights, optimizer state and schedule were left unchanged.",
                    stacklevel=2,
                )
                continue
            metrics = self._run_update(update)
            self.state.global_step += 1
            self._params_version += 1
            per_update_metrics.append(metrics)
            applied_steps.append(self.state.global_step)
            if self._eval_due(self.state.global_step):
                # Now, on this update's weights (a later update of the call would otherwise be measured).
                eval_metrics[self.state.global_step] = self.measure_eval(self.eval_dataset)
            if progress is not None:
                progress.update(1)
        if progress is not None:
            progress.close()
        if per_update_metrics:
            # The caller's model object shares the arrays the first update donated: point it at the new ones,
            # so the model passed in is trained in place (as a torch model would be) and stays usable.
            nnx.update(self._user_model, self._params)

        host_metrics = jax.device_get(per_update_metrics)  # the call's one host sync
        elapsed = time.perf_counter() - started
        input_tokens = distributed.global_sum(sum(int(mb.attention_mask.sum()) for mb in microbatches))
        label_tokens = int(sum(totals))
        self.state.num_input_tokens_seen += input_tokens
        self.state.total_label_tokens += label_tokens
        for step_number, metrics in zip(applied_steps, host_metrics):
            self._after_update(step_number, metrics, eval_metrics.get(step_number))
        loss_sum = sum(float(m["loss_sum"]) for m in host_metrics)
        skipped = sum(bool(m.get("skipped", False)) for m in host_metrics)
        if skipped:
            warnings.warn(
                f"step(): {skipped} of {len(host_metrics)} updates had a non-finite loss or gradient norm and were "
                "skipped (skip_nonfinite_updates=True): weights and optimizer state were left as they were.",
                stacklevel=2,
            )
        return {
            # A call with no label tokens trained nothing; it reports 0.0 (not NaN, which poisons running means).
            "loss": loss_sum / label_tokens if label_tokens else 0.0,
            "learning_rate": self.current_learning_rate(),
            "grad_norm": float(host_metrics[-1]["grad_norm"]) if host_metrics else None,
            "num_tokens": label_tokens,
            # Each applied update's exact loss (its token-loss sum over its label tokens), unrounded.
            "update_losses": [float(m["loss"]) for m in host_metrics],
            "num_updates": len(host_metrics),
            "skipped_updates": skipped,
            "num_microbatches": len(microbatches),
            "global_step": self.state.global_step,
            "tokens_per_second": input_tokens / elapsed if elapsed > 0 else float("nan"),
            "seconds": elapsed,
            "compiled_shapes": self.compiled_shapes,
        }

    def evaluate(self, eval_dataset: Any = None) -> dict[str, float]:
        """Mean token loss over a dataset (``step()``-style dict, list of strings, or the one given at init)."""
        metrics = self.measure_eval(eval_dataset if eval_dataset is not None else self.eval_dataset)
        self._report_eval(metrics, self.state.global_step)
        return metrics

    def _report_eval(self, metrics: dict[str, float], step_number: int) -> None:
        """As HF Trainer.evaluate: the metrics go into log_history (with the step) and to on_log / on_evaluate."""
        if jax.process_index() == 0:
            logs = {**metrics, "step": step_number}
            self.state.log_history.append(logs)
            for callback in self.callbacks:
                callback.on_log(self, logs)
        for callback in self.callbacks:
            callback.on_evaluate(self, metrics)

    def _eval_due(self, step_number: int) -> bool:
        every = self.config.eval_steps
        return bool(every) and step_number % every == 0 and self.eval_dataset is not None

    def measure_eval(self, dataset: Any) -> dict[str, float]:
        """Evaluation metrics of ``dataset`` on the current weights, without logging or callbacks.

        ``evaluate()`` and in-training evaluation (``eval_steps``) both measure through this
        method, so a subclass that overrides it (the TRL facade adds ``compute_metrics``)
        changes every evaluation at once.
        """
        if dataset is None:
            raise ValueError("evaluate(): no eval_dataset given here or at construction; pass eval_dataset=...")
        examples = self._examples(**_dataset_as_step_kwargs(dataset))
        microbatches = batching.plan_microbatches(
            examples, rows=self.eval_rows // jax.process_count(), buckets=self.buckets, rng=self._rng, shuffle=False
        ) if examples else []
        microbatches = distributed.agree_on_microbatches(microbatches, self.eval_rows // jax.process_count())
        sums = []
        for mb in microbatches:
            batch = self._device_batch(mb, train=False)
            program = self._program("eval", batch, lambda: self._compile_eval(batch))
            sums.append(program(self._params, batch, self._frozen))
        sums = jax.device_get(sums)
        loss_sum = sum(float(s) for s, _ in sums)
        count = sum(float(c) for _, c in sums)
        return {"eval_loss": loss_sum / count if count else float("nan"), "eval_num_tokens": int(count)}

    def generate(self, prompts: Sequence[Any], **kwargs: Any):
        """Sample from the current training weights (see :func:`jaxsft.generate`)."""
        from jaxsft.generation import generate

        if self.tokenizer is None:
            raise ValueError("generate(): the trainer has no tokenizer; pass tokenizer= at construction.")
        return generate(self.model, self.tokenizer, prompts, **kwargs)

    def save_checkpoint(self, directory: str) -> str:
        """Write the whole trainer state to ``directory/checkpoint-<global_step>`` atomically; returns the path.

        Weights, optimizer state, step counters, log history and the shuffling RNG: a run restored
        from it takes the same updates as one that never stopped. A state holding NaN or inf is
        refused (``FloatingPointError``) and nothing is written. Call it on every process.
        """
        return checkpointing.save(self, directory)

    def restore_checkpoint(self, path: str) -> None:
        """Load a checkpoint from :meth:`save_checkpoint` (onto this trainer's mesh, whichever it is).

        ``path`` is a ``checkpoint-<step>`` folder (``jaxsft.checkpoint.latest_checkpoint(dir)``
        finds the newest). A checkpoint of another architecture or optimizer is refused before
        anything changes. The config is this trainer's, so a resumed run may change e.g. the
        learning rate; the schedule continues from the restored ``global_step``.
        """
        checkpointing.restore(self, path)

    def save_pretrained(self, directory: str, **kwargs: Any):
        from jaxsft.models.hf_io import save_pretrained

        kwargs.setdefault("tokenizer", self.tokenizer)
        return save_pretrained(self.model, directory, **kwargs)

    # ------------------------------------------------------------------ inputs
    def _examples(self, input_ids=None, attention_mask=None, labels=None, texts=None, texts_labels=None):
        if jax.process_count() > 1 and _is_empty(texts if texts is not None else input_ids):
            # Multi-process: a process may have no examples this call; it still joins every collective
            # program with zero-weight filler rows (distributed.agree_on_microbatches).
            return []
        if texts is not None:
            given = [n for n, v in (("input_ids", input_ids), ("attention_mask", attention_mask), ("labels", labels)) if v is not None]
            if given:
                raise ValueError(
                    f"step() got texts=... together with {', '.join(given)}; pass either texts (with texts_labels) "
                    f"or token arrays, not both."
                )
            if self.tokenizer is None:
                raise ValueError("step(texts=...) needs a tokenizer; pass tokenizer= when building the trainer.")
            examples = batching.examples_from_texts(
                self.tokenizer, texts, texts_labels, max_length=self.max_length, truncation_mode=self.config.truncation_mode
            )
        elif input_ids is not None:
            if texts_labels is not None:
                raise ValueError("texts_labels was given without texts; pass texts=... with it, or labels=... with input_ids.")
            examples = batching.examples_from_tokens(
                input_ids, attention_mask, labels, max_length=self.max_length, truncation_mode=self.config.truncation_mode
            )
        else:
            raise ValueError("step() needs input_ids=... (token arrays) or texts=... (strings); both were None.")
        batching.validate_vocab(examples, self.spec.vocab_size)
        return examples

    # ------------------------------------------------------------------ programs
    def _device_batch(self, mb, train: bool = True) -> dict[str, jax.Array]:
        batch = {
            "input_ids": shd.place_batch(mb.input_ids, self.mesh),
            "labels": shd.place_batch(mb.labels, self.mesh),
        }
        setup = lora_lib.lora_setup(self._user_model)
        if train and setup is not None and setup.config.lora_dropout > 0:
            # Drawn from the checkpointed shuffling RNG, so a resumed run drops the same activations.
            seed = int(self._rng.integers(0, 2**31 - 1))
            batch["dropout_rng"] = jax.device_put(jax.random.PRNGKey(seed), shd.replicated(self.mesh))
        return batch

    def _program(self, kind: str, batch: dict, build: Callable[[], Any]):
        key = (kind, tuple(batch["input_ids"].shape)) if batch is not None else (kind,)
        if key not in self._programs:
            self._programs[key] = build()
        return self._programs[key]

    def _shardings(self):
        params_sh = jax.tree.map(lambda x: x.sharding, self._params)
        opt_sh = jax.tree.map(lambda x: x.sharding, self._opt_state)
        return params_sh, opt_sh

    def _compile(self, fn, args, *, donate, out_shardings):
        with jax.set_mesh(self.mesh):
            lowered = jax.jit(fn, donate_argnums=donate, out_shardings=out_shardings).lower(*args)
            return lowered.compile(compiler_options=self._xla_options or None)

    def _step_count(self) -> jax.Array:
        return jax.device_put(jnp.asarray(self.state.global_step, jnp.int32), shd.replicated(self.mesh))

    def _run_update(self, update) -> dict[str, jax.Array]:
        step_count = self._step_count()
        if len(update) == 1 and self.config.gradient_accumulation_steps == 1:
            batch = self._device_batch(update[0])
            program = self._program("fused", batch, lambda: self._compile_fused(batch, step_count))
            self._params, self._opt_state, metrics = program(self._params, self._opt_state, batch, step_count, self._frozen)
            return metrics
        params_sh, opt_sh = self._shardings()
        rep = shd.replicated(self.mesh)
        zeros = self._program(
            "zeros", None, lambda: self._compile(step_fns.make_zero_accumulator(), (self._params,), donate=(), out_shardings=(params_sh, rep, rep))
        )
        acc = zeros(self._params)
        for mb in update:
            batch = self._device_batch(mb)
            program = self._program(
                "accumulate",
                batch,
                lambda: self._compile(
                    step_fns.make_accumulate(self._graphdef, self._chunk_size, self._shards),
                    (self._params, acc, batch, self._frozen),
                    donate=(1,),
                    out_shardings=(params_sh, rep, rep),
                ),
            )
            acc = program(self._params, acc, batch, self._frozen)
        apply = self._program(
            "apply",
            None,
            lambda: self._compile(
                step_fns.make_apply(self._tx, self._schedule, self.config.skip_nonfinite_updates),
                (self._params, self._opt_state, acc, step_count),
                donate=(0, 1),
                out_shardings=(params_sh, opt_sh, rep),
            ),
        )
        self._params, self._opt_state, metrics = apply(self._params, self._opt_state, acc, step_count)
        return metrics

    def _compile_fused(self, batch: dict, step_count: jax.Array):
        """The one-micro-batch update program (gradients and optimizer step) for ``batch``'s shape."""
        params_sh, opt_sh = self._shardings()
        return self._compile(
            step_fns.make_fused_update(
                self._graphdef, self._tx, self._schedule, self._chunk_size, self._shards,
                self.config.skip_nonfinite_updates,
            ),
            (self._params, self._opt_state, batch, step_count, self._frozen),
            donate=(0, 1),
            out_shardings=(params_sh, opt_sh, shd.replicated(self.mesh)),
        )

    def _compile_eval(self, batch):
        rep = shd.replicated(self.mesh)
        return self._compile(
            step_fns.make_eval(self._graphdef, self._chunk_size, self._shards), (self._params, batch, self._frozen), donate=(),
            out_shardings=(rep, rep),
        )

    # ------------------------------------------------------------------ logging
    def _after_update(self, step_number: int, metrics: dict[str, Any], eval_metrics: Optional[dict] = None) -> None:
        self._loss_since_log.append(float(metrics["loss"]))
        cfg = self.config
        if eval_metrics is not None:  # measured right after this update, reported here (before its log, as HF)
            self._report_eval(eval_metrics, step_number)
        if cfg.logging_steps and step_number % cfg.logging_steps == 0:
            logs: dict[str, Any] = {
                "loss": round(float(np.mean(self._loss_since_log)), 4),
                "grad_norm": float(metrics["grad_norm"]),
            }
            if "learning_rate" in metrics:
                logs["learning_rate"] = float(metrics["learning_rate"])
            logs["step"] = step_number
            self._loss_since_log = []
            self._last_logged_step = step_number
            if jax.process_index() == 0:
                self.state.log_history.append(logs)
                for callback in self.callbacks:
                    callback.on_log(self, logs)
        for callback in self.callbacks:
            callback.on_step_end(self)

    def _progress(self, total: int):
        if self.config.disable_tqdm or total < 8 or jax.process_index() != 0:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, desc="jaxsft step", unit="update", leave=False)

    # ------------------------------------------------------------------ setup helpers
    def _loss_chunk_size(self) -> Optional[int]:
        """Chunk the lm_head + loss over tokens only when full fp32 logits would be large."""
        if self.config.loss_chunk_size is not None:
            return self.config.loss_chunk_size
        tokens_per_device = self.config.per_device_train_batch_size * self.max_length
        if tokens_per_device * self.spec.vocab_size * 4 <= self.config.loss_chunk_bytes:
            return None
        per_chunk = max(256, (1 << 28) // (4 * self.spec.vocab_size))
        return 1 << int(math.log2(per_chunk))

    def _check_tensor_axis(self) -> None:
        tensor = self.mesh.shape["tensor"]
        if tensor == 1:
            return
        s = self.spec
        for what, size in (("num_attention_heads", s.num_heads), ("num_key_value_heads", s.num_kv_heads),
                           ("intermediate_size", s.intermediate_size), ("vocab_size", s.vocab_size)):
            if size % tensor:
                raise ValueError(
                    f"mesh tensor axis of size {tensor} does not divide the model's {what} ({size}); "
                    f"choose a tensor size that divides it (e.g. make_mesh(tensor=1))."
                )


def _is_empty(value: Any) -> bool:
    try:
        return value is not None and len(value) == 0
    except TypeError:
        return False


def _dataset_as_step_kwargs(dataset: Any) -> dict[str, Any]:
    if isinstance(dataset, dict):
        unknown = set(dataset) - set(STEP_KEYWORDS)
        if unknown:
            raise ValueError(f"eval_dataset has unknown keys {sorted(unknown)}; use {', '.join(STEP_KEYWORDS)}.")
        return dict(dataset)
    if isinstance(dataset, (list, tuple)) and dataset and isinstance(dataset[0], str):
        return {"texts": list(dataset)}
    if isinstance(dataset, (list, tuple)):
        return {"input_ids": list(dataset)}
    raise TypeError(
        f"eval_dataset must be a dict of step() keywords, a list of strings or a list of token arrays, "
        f"got {type(dataset).__name__}."
    )
