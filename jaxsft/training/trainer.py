"""The JAX-native IterativeSFTTrainer: state, RNG, schedule position, logging.

``step()`` validates everything before touching state, turns the call's examples
into bucketed micro-batches, and runs one ahead-of-time compiled program per
update (or per micro-batch with gradient accumulation). Programs are cached by
shape, so the count in ``compiled_shapes`` is exact and a varying loop never
recompiles beyond the declared buckets.
"""

from __future__ import annotations

import copy
import dataclasses
import time
import warnings
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
import optax
from flax import nnx

from jaxsft.training import agreement, batching, buffers, objectives
from jaxsft.infra import compile_cache, compile_options, distributed, fingerprint
from jaxsft.training.argument_checks import check_built_optimizer, check_trainer_arguments
from jaxsft.infra import checkpoint as checkpointing
from jaxsft.infra import metrics as metrics_sinks
from jaxsft.infra import sharding as shd
from jaxsft.training import train_log, train_state
from jaxsft.training.callbacks import EvalPrediction, TrainerCallback, check_callbacks, notify
from jaxsft.infra.config import TrainConfig
from jaxsft.models import lora as lora_lib
from jaxsft.models.decoder import CausalLM
from jaxsft.models.seq2seq import Seq2SeqLM
from jaxsft.models.options import RunOptions, with_options
from jaxsft.training.optim import check_optimizer_arguments, host_learning_rate_fn, optimizer_and_schedule
from jaxsft.training.programs import TrainPrograms
from jaxsft.training.train_state import COUNTER_FIELDS, HostSnapshot, TrainerState, TrainState


class IterativeSFTTrainer:
    """Fine-tune a jaxsft causal LM with ``step()`` calls between your own generate/filter work.

    ``model`` is a :class:`jaxsft.models.CausalLM` (from ``jaxsft.from_pretrained``).
    ``optimizer`` replaces the AdamW built from ``config`` with any optax
    transformation, or a function ``schedule -> transformation`` that the trainer
    calls with ``schedule`` (default: ``config``'s HF schedule); pass ``schedule``
    with a transformation if you want its rate logged; a
    :class:`jaxsft.training.optim.TableSchedule` logs its exact float64 value). The
    trainer always puts ``config.max_grad_norm`` clipping in front of the
    optimizer, its own or yours (``max_grad_norm=None`` or 0 turns it off).
    ``mesh`` defaults to the model's mesh (all local devices on the data axis for a
    plain ``from_pretrained``); ``sharding_rules`` (default ``jaxsft.infra.sharding.DEFAULT_RULES``)
    lay the parameters, optimizer state and activations out on it. ``compute_metrics``
    (``EvalPrediction -> dict``) and ``preprocess_logits_for_metrics`` (``(logits, labels) -> array``,
    per eval batch, numpy) add metrics to every evaluation, as in ``transformers.Trainer``.
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
        sharding_rules: Optional[shd.ShardingRules] = None,
        eval_dataset: Any = None,
        callbacks: Sequence[TrainerCallback] = (),
        compute_metrics: Optional[Callable[[EvalPrediction], dict[str, Any]]] = None,
        preprocess_logits_for_metrics: Optional[Callable[[np.ndarray, np.ndarray], Any]] = None,
    ):
        error: Optional[Exception] = None
        try:  # every check before any device work; multi-process: every process learns every verdict
            if not isinstance(model, (CausalLM, Seq2SeqLM)):
                raise TypeError(
                    f"model must be a jaxsft CausalLM or Seq2SeqLM (use jaxsft.from_pretrained(path_or_torch_model)), got "
                    f"{type(model).__name__}."
                )
            if config is None:
                config = TrainConfig()
            if not isinstance(config, TrainConfig):
                raise TypeError(f"config must be a jaxsft.TrainConfig, got {type(config).__name__}.")
            config.validate()  # a dict field changed in place since construction is seen here
            check_trainer_arguments(tokenizer, compute_metrics, preprocess_logits_for_metrics)
            metrics_sinks.check_installed(config.report_to)  # a missing sink library fails before any state
            check_optimizer_arguments(optimizer, schedule)
            if mesh is not None and (not isinstance(mesh, jax.sharding.Mesh) or set(mesh.axis_names) != {"data", "fsdp", "tensor"}):
                raise TypeError(
                    f"mesh must be a jax Mesh with axes data, fsdp and tensor (build it with jaxsft.make_mesh), got "
                    f"{getattr(mesh, 'axis_names', type(mesh).__name__)}."
                )
            check_callbacks(callbacks)
            self.config = config
            self._user_model = model
            self.tokenizer = tokenizer
            self._eval_dataset = eval_dataset
            self.callbacks = list(callbacks)
            self.compute_metrics = compute_metrics
            self.preprocess_logits_for_metrics = preprocess_logits_for_metrics
            self.state = TrainerState()
            self.spec = model.spec
            # What is trained (decoder or encoder-decoder SFT): inputs -> examples -> micro-batches -> loss.
            self.objective = objectives.objective_for(model)
            if not self.objective.supports_multi_process and jax.process_count() > 1:
                raise NotImplementedError(
                    f"{type(self.objective).__name__} (encoder-decoder models: T5, BART) trains on one process in this "
                    "release; run single-process (any number of local devices) or use a decoder-only model for "
                    "multi-host training."
                )
            self.dropout_enabled = bool(config.dropout) and objectives.declares_dropout(model.spec)
            if config.packing is True and not self.objective.supports_packing:
                raise ValueError(
                    f"TrainConfig.packing=True is not supported by {type(self.objective).__name__} (encoder-decoder "
                    "models: T5, BART); pass packing=False."
                )

            self.mesh = mesh if mesh is not None else shd.mesh_of(nnx.state(model))
            if sharding_rules is not None and not isinstance(sharding_rules, shd.ShardingRules):
                raise TypeError(
                    f"sharding_rules must be a jaxsft.infra.sharding.ShardingRules, got {type(sharding_rules).__name__}."
                )
            self.sharding_rules = sharding_rules or shd.DEFAULT_RULES
            self.buckets = config.buckets(model.spec.max_position_embeddings)
            self.packed_row_lengths = config.packed_row_lengths(model.spec.max_position_embeddings)
            self.max_length = self.buckets[-1]
            if model.spec.position == "learned" and self.max_length > model.spec.max_position_embeddings:
                raise ValueError(
                    f"TrainConfig.max_length={self.max_length} exceeds the model's learned position table "
                    f"({model.spec.max_position_embeddings} positions, e.g. GPT-2's n_positions): longer sequences have "
                    f"no position embedding. Pass max_length <= {model.spec.max_position_embeddings}."
                )
            self.rows = config.per_device_train_batch_size * shd.batch_rows_multiple(self.mesh)
            self.eval_rows = config.per_device_eval_batch_size * shd.batch_rows_multiple(self.mesh)
            shd.check_model_fits(self.spec, self.mesh, self.sharding_rules)
            self._xla_options = compile_options.resolve(config.xla_options, hidden_size=model.spec.hidden_size)  # None: measured defaults
            compile_options.check(self._xla_options)
            cache_folder = compile_cache.resolve(config.compilation_cache, config.compilation_cache_dir)
            shd.check_batch_split_over_processes(self.mesh)
            # Checked now, so that evaluation inside step() (eval_steps) cannot fail after an update.
            self._eval_examples = None if eval_dataset is None else self._eval_inputs(eval_dataset)
        except Exception as err:  # any type: every process must learn it before the first collective
            error = err
        timeout = config.agreement_timeout_s if isinstance(config, TrainConfig) else TrainConfig().agreement_timeout_s
        agreed = {} if error else {**self._fingerprint(), **fingerprint.of_training(config, model.spec, RunOptions.of(model))}
        distributed.agree("IterativeSFTTrainer()", error, agreed, timeout)
        compile_cache.use(cache_folder)  # before this trainer compiles anything

        # The training view: the model's arrays under the config's compute options (a derived module;
        # the caller's model keeps its own options).
        self.run_options = config.run_options(RunOptions.of(model), num_layers=model.spec.num_layers)
        self.scan_layers = self.run_options.scan_layers
        # TrainConfig.packing resolved for this backend, and whether packed rows may outgrow their bucket (the
        # planning rule of cuDNN's ragged attention; public so that a host-side measurement can plan as a GPU would).
        self.packing, self.longer_packed_rows = self.objective.packing(
            config.packing, self.run_options, self.spec, dropout=self.dropout_enabled
        )
        view = with_options(model, self.run_options)
        if lora_lib.lora_setup(model) is None:
            self._graphdef, params = nnx.split(view)
            frozen: tuple = ()
        else:  # LoRA: only the adapters train; the base weights are frozen program inputs, never donated
            self._graphdef, params, *frozen = nnx.split(view, lora_lib.LoraParam, ...)
        params = buffers.exclusive(shd.place_state(params, self.mesh, self.sharding_rules), self)
        self.train_state = TrainState(params, None, None, None, None)  # (buffers.exclusive reads it) completed below
        self._frozen = tuple(shd.place_state(f, self.mesh, self.sharding_rules) for f in frozen)

        self._tx, schedule = optimizer_and_schedule(  # clipping included
            config, optimizer, schedule, check_built=check_built_optimizer
        )
        self._learning_rate_fn = host_learning_rate_fn(schedule)
        with jax.set_mesh(self.mesh), shd.use_rules(self.sharding_rules):
            # Moments take their parameter's sharding (zeros_like under jit would replicate them).
            opt_shardings = shd.optimizer_state_shardings(jax.eval_shape(self._tx.init, params), params, self.mesh)
            # Kept: reset() rebuilds the initial optimizer state with this same compiled program.
            self._init_opt_state = jax.jit(self._tx.init, out_shardings=opt_shardings)
            # The device half of the state, one pytree: the update programs take, advance and donate it whole.
            opt_state, replicated = self._init_opt_state(params), shd.replicated(self.mesh)
            self.train_state = TrainState.fresh(params, opt_state, seed=config.seed, sharding=replicated)
        self._initial_params: Optional[HostSnapshot] = None  # taken before the first donation (reset())
        self._rng = np.random.default_rng(config.seed)
        # Multi-process: the same initial weights, optimizer and schedule everywhere, or no training at all.
        distributed.agree("IterativeSFTTrainer() (initial state)", None, fingerprint.of_state(
            self._params, self._opt_state, self.learning_rate_at), timeout)
        self._shards = shd.batch_rows_multiple(self.mesh)
        self._chunk_size = objectives.loss_chunk_size(config, self.spec.vocab_size, self.max_length)
        self.objective = dataclasses.replace(self.objective, chunk_size=self._chunk_size, num_shards=self._shards)
        self.programs = TrainPrograms(
            self._graphdef, self._tx, self.objective, mesh=self.mesh, sharding_rules=self.sharding_rules,
            xla_options=self._xla_options, skip_nonfinite=config.skip_nonfinite_updates,
            gradient_accumulation_steps=config.gradient_accumulation_steps, takes_dropout_key=self._takes_dropout_key,
        )
        self._sampler = None  # built on the first generate()
        self._params_version = 0
        if jax.process_index() == 0:  # report_to sinks: scalars of every log entry (jaxsft.infra.metrics)
            self.callbacks += metrics_sinks.writers_for(config)

    # ------------------------------------------------------------------ public
    @property
    def model(self) -> CausalLM:
        """The model with the current weights (a view sharing the trainer's arrays).

        Re-read it after each ``step()``: the previous arrays are donated to the update.
        """
        # Fresh containers over the same arrays: a model built on this view (a second trainer) that is
        # updated in place must not write into this trainer's state.
        return nnx.merge(self._graphdef, *jax.tree.map(lambda x: x, (self._params, *self._frozen)))

    @property
    def params(self) -> nnx.State:
        """The trained parameters: every weight, or only the adapters of a LoRA model."""
        return self.train_state.params

    @property
    def _params(self) -> nnx.State:
        return self.train_state.params

    @_params.setter
    def _params(self, params: nnx.State) -> None:
        self.train_state = dataclasses.replace(self.train_state, params=params)

    @property
    def _opt_state(self) -> Any:
        return self.train_state.opt_state

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
        return self.programs.count

    @property
    def xla_options(self) -> dict[str, Any]:
        """The XLA options the train, eval and generation programs compile with (``TrainConfig.xla_options`` resolved)."""
        return dict(self._xla_options)

    @property
    def eval_dataset(self) -> Any:
        """The dataset ``eval_steps`` and ``evaluate()`` measure (a ``step()``-style dict or a list)."""
        return self._eval_dataset

    @eval_dataset.setter
    def eval_dataset(self, dataset: Any) -> None:
        """Checked now, so that evaluation inside ``step()`` (eval_steps) cannot fail after an update."""
        examples = None if dataset is None else self._eval_inputs(dataset)
        self._eval_dataset, self._eval_examples = dataset, examples

    @property
    def optimizer(self) -> optax.GradientTransformation:
        """The optax transformation the trainer applies (clipping included)."""
        return self._tx

    def learning_rate_at(self, count: int) -> Optional[float]:
        """The rate the update after ``count`` applied updates uses (host float64; None without a schedule).

        Logs and ``step()``'s stats report ``learning_rate_at(global_step)`` after each update, as HF
        Trainer logs the scheduler's value after its step.
        """
        return None if self._learning_rate_fn is None else self._learning_rate_fn(int(count))

    def current_learning_rate(self) -> Optional[float]:
        return self.learning_rate_at(self.state.global_step)

    def step(
        self,
        input_ids: Any = None,
        attention_mask: Any = None,
        labels: Any = None,
        texts: Optional[Sequence[str]] = None,
        texts_labels: Optional[Sequence[str]] = None,
        *,
        example_weights: Optional[Sequence[float]] = None,
    ) -> dict[str, Any]:
        """Train on one call's examples (shuffled, micro-batched, accumulated) and return stats.

        Token inputs: lists of 1-D integer arrays or a 2-D array with its mask.
        Text inputs: ``texts`` (and optionally ``texts_labels``, learned alone,
        after their prompt). Every check runs before any state changes. A call's
        leftover micro-batches (fewer than gradient_accumulation_steps) still make
        one update.

        ``example_weights`` (a list or 1-D array of finite floats >= 0, one per example): every label
        token of example i counts ``w_i`` times in the loss and in the token count that normalises it
        (reward-weighted SFT): 2 equals giving the example twice, 0 leaving it out, all zeros is an
        empty round. ``num_tokens`` stays the real count; ``weighted_num_tokens`` is the weighted one.
        A weighted call runs its own programs (one more compile per shape the first time).
        """
        examples, weighted = self._agreed_examples(
            "step()", input_ids=input_ids, attention_mask=attention_mask, labels=labels, texts=texts,
            texts_labels=texts_labels, example_weights=example_weights,
        )
        started = time.perf_counter()
        microbatches = self._plan(examples, self.rows, shuffle=True, pack=self.packing, weighted=weighted)
        if not microbatches:
            # A filter that kept nothing is a normal round, not an error: every process warns and trains nothing.
            warnings.warn(
                "step(): no examples (on any process) this call; nothing was trained and the weights, optimizer "
                "state, schedule and RNG are unchanged.",
                stacklevel=2,
            )
        updates = batching.group_into_updates(microbatches, self.config.gradient_accumulation_steps)
        totals = agreement.global_label_counts(updates)

        # 1. run: the updates on device. Whatever happens, the caller's model ends up on live arrays and
        #    global_step counts the updates that ran (the arrays they consumed are donated, so no going back).
        per_update_metrics = []
        compile_seconds = 0.0
        eval_metrics: dict[int, dict[str, float]] = {}
        first_step = self.state.global_step
        progress = train_log.progress_bar(self.config, len(updates))
        try:
            lowerings, compile_seconds = self._prepare_updates(updates, totals)
            for update, total, update_lowerings in zip(updates, totals, lowerings):
                if total == 0:
                    warnings.warn(
                        "step(): an update had no label tokens (all labels -100 or masked); it was skipped and "
                        "the weights, optimizer state and schedule were left unchanged.",
                        stacklevel=2,
                    )
                    continue
                # (the starting weights were copied for reset() by _prepare_updates, before any donation)
                self.train_state, metrics = self.programs.run_update(
                    self.train_state, update, update_lowerings, self._frozen
                )
                per_update_metrics.append(metrics)
                self._params_version += 1
                step_number = first_step + len(per_update_metrics)  # what the state's step now holds
                if self._eval_due(step_number):
                    # Now, on this update's weights (a later update of the call would otherwise be measured).
                    eval_metrics[step_number] = self.measure_eval(self.eval_dataset)
                if progress is not None:
                    progress.update(1)
        except BaseException:  # interrupted: the step mirror counts the updates that ran (no device read here)
            self.state.step_mirror = first_step + len(per_update_metrics)
            raise
        finally:
            if progress is not None:
                progress.close()
            if per_update_metrics:
                # The caller's model object shares the arrays the first update donated: point it at the new
                # ones, so the model passed in is trained in place (as a torch model would be) and stays usable.
                nnx.update(self._user_model, self._params)
        applied_steps = list(range(first_step + 1, first_step + len(per_update_metrics) + 1))

        # 2. collect: every host-side consequence, computed before any of it is stored.
        host_metrics = jax.device_get(per_update_metrics)  # the call's one host sync (the state's step and streak too)
        elapsed = time.perf_counter() - started
        input_tokens = distributed.global_sum(sum(int(mb.attention_mask.sum()) for mb in microbatches))
        truncated = distributed.global_sum(sum(bool(ex.truncated) for ex in examples or ()))
        label_tokens = int(sum(totals))
        events, stopped, host = train_log.collect_logs(self.state, self.config, self.learning_rate_at, applied_steps,
                                                        host_metrics, eval_metrics)

        # 3. apply: counters and logs in one go. 4. notify: callbacks see a complete state; one that raises
        #    cannot leave it half-done.
        self.state.step_mirror = int(host_metrics[-1]["global_step"]) if host_metrics else first_step  # the mirror
        self.state.num_input_tokens_seen += input_tokens
        self.state.total_label_tokens += label_tokens
        for name, value in host.items():
            setattr(self.state, name, value)
        if jax.process_index() == 0:
            self.state.log_history.extend(entry for kind, entry, _ in events if kind in ("eval", "log"))
        notify(self, self.callbacks, events)

        skipped = train_log.warn_nonfinite(host_metrics)
        if stopped is not None:
            raise FloatingPointError(stopped)
        every = self.config.save_steps
        if every and any(step_number % every == 0 for step_number in applied_steps):  # periodic checkpoint
            self.save_checkpoint(str(self.config.output_dir), keep_last=self.config.save_total_limit)
        return train_log.step_stats(
            host_metrics, skipped=skipped, weighted=weighted, learning_rate=self.current_learning_rate(),
            num_tokens=label_tokens, num_microbatches=len(microbatches),
            truncated_examples=truncated,  # cut to max_length (a warning said so)
            global_step=self.state.global_step,
            tokens_per_second=input_tokens / elapsed if elapsed > 0 else float("nan"),
            seconds=elapsed, compiled_shapes=self.compiled_shapes,
            compile_seconds=compile_seconds,  # of ``seconds``: lowering and compiling this call's new programs
        )

    def precompile(
        self,
        input_ids: Any = None,
        attention_mask: Any = None,
        labels: Any = None,
        texts: Optional[Sequence[str]] = None,
        texts_labels: Optional[Sequence[str]] = None,
        *,
        example_weights: Optional[Sequence[float]] = None,
        side_by_side: bool = True,
    ) -> dict[str, Any]:
        """Compile, without training, every program a :meth:`step` call with these inputs would run.

        Why: a loop's first ``step()`` waits for XLA to compile its programs (seconds to tens of seconds on
        a GPU), and so does each later call that meets a new length bucket. Called before the loop with
        examples of the lengths the loop will produce, those compiles happen here instead; with a
        persistent compilation cache (``JAX_COMPILATION_CACHE_DIR``) a rerun's come from disk.

        Takes :meth:`step`'s arguments with its checks (a bad one raises the same error, before anything
        compiles) and plans the examples exactly as ``step()`` would, with a copy of the trainer's shuffling
        RNG: the weights, optimizer state, schedule, RNG and counters are left as they were, so a later
        ``step()`` trains as it would have without this call. Before the first ``step()`` it also takes the
        host copy of the starting weights that :meth:`reset` needs, while the programs compile, as ``step()``
        would. ``side_by_side=False`` compiles one program at a time (to time each; slower).

        Returns ``{"programs": [layout, ...], "new_programs": n, "compile_seconds": s, "compiled_shapes": total}``
        (the layouts of every program the call runs, e.g. ``"fused 8x512"``) and, compiled one at a
        time, ``"each": [(layout, lowering seconds, compiling seconds), ...]``.
        """
        examples, weighted = self._agreed_examples(
            "precompile()", input_ids=input_ids, attention_mask=attention_mask, labels=labels, texts=texts,
            texts_labels=texts_labels, example_weights=example_weights,
        )
        microbatches = self._plan(examples, self.rows, shuffle=True, pack=self.packing, weighted=weighted,
                                  rng=copy.deepcopy(self._rng))
        updates = batching.group_into_updates(microbatches, self.config.gradient_accumulation_steps)
        lowerings = [self.programs.update_lowerings(self.train_state, update, self._frozen) for update in updates]
        keys = dict.fromkeys(key for update_lowerings in lowerings for key, _ in update_lowerings)
        report: dict[str, Any] = {"programs": [TrainPrograms.layout(key) for key in keys],
                                  "new_programs": len(self.programs.missing(lowerings))}
        if side_by_side:
            report["compile_seconds"] = self.programs.compile_missing(lowerings, meanwhile=self._keep_initial_params)
        else:
            each = self.programs.compile_each(lowerings)
            report["each"] = [(TrainPrograms.layout(key), lower_s, compile_s) for key, lower_s, compile_s in each]
            report["compile_seconds"] = sum(lower_s + compile_s for _, lower_s, compile_s in each)
            self._keep_initial_params()
        report["compiled_shapes"] = self.compiled_shapes
        return report

    def evaluate(
        self, eval_dataset: Any = None, *, ignore_keys: Optional[Sequence[str]] = None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        """Measure a dataset (``step()``-style dict, list of strings, or the one given at init) and report it.

        The metrics (:meth:`measure_eval`) go into ``log_history`` with the step and to ``on_log`` /
        ``on_evaluate``, as HF Trainer.evaluate does.
        """
        metrics = self.measure_eval(
            eval_dataset if eval_dataset is not None else self.eval_dataset,
            ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix,
        )
        self._report_eval(metrics, self.state.global_step)
        return metrics

    def log(self, logs: dict[str, Any]) -> None:
        """Append ``{**logs, "step": global_step}`` to ``log_history`` and fire ``on_log`` (as HF ``Trainer.log``)."""
        if jax.process_index() == 0:
            entry = {**logs, "step": self.state.global_step}
            self.state.log_history.append(entry)
            for callback in self.callbacks:
                callback.on_log(self, entry)

    def _report_eval(self, metrics: dict[str, float], step_number: int) -> None:
        """As HF Trainer.evaluate: the metrics go into log_history (with the step), then to on_log / on_evaluate."""
        events = [("eval", {**metrics, "step": step_number}, metrics)]
        if jax.process_index() == 0:
            self.state.log_history.append(events[0][1])
        notify(self, self.callbacks, events)

    def _eval_due(self, step_number: int) -> bool:
        every = self.config.eval_steps
        return bool(every) and step_number % every == 0 and self.eval_dataset is not None

    def measure_eval(
        self, dataset: Any, *, ignore_keys: Optional[Sequence[str]] = None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        """Evaluation metrics of ``dataset`` on the current weights, without logging or callbacks.

        ``eval_loss`` (mean token loss) and ``eval_num_tokens``; with ``compute_metrics``, its
        results on :meth:`predict` (keys prefixed ``eval_``, those in ``ignore_keys`` left out);
        then ``eval_runtime`` and ``eval_samples_per_second``. ``metric_key_prefix`` replaces
        ``eval`` in every key. ``evaluate()`` and in-training evaluation (``eval_steps``) both
        measure through this method.
        """
        if dataset is None:
            raise ValueError("evaluate(): no eval_dataset given here or at construction; pass eval_dataset=...")
        error: Optional[Exception] = None
        try:
            if dataset is self.eval_dataset and self._eval_examples is not None:
                examples = self._eval_examples  # checked at construction
            else:
                examples = self._eval_inputs(dataset)
        except Exception as err:  # any type: shared, so every process raises
            error = err
        distributed.agree("evaluate()", error, self._fingerprint(), self.config.agreement_timeout_s)
        started = time.perf_counter()
        microbatches = self._eval_microbatches(examples)
        sums = jax.device_get([self.programs.evaluate(self._params, mb, self._frozen) for mb in microbatches])
        loss_sum = sum(float(s) for s, _, _ in sums)
        denominator = sum(float(d) for _, d, _ in sums)
        count = sum(float(aux["num_tokens"]) for _, _, aux in sums)
        metrics: dict[str, Any] = {
            "eval_loss": loss_sum / denominator if denominator else float("nan"), "eval_num_tokens": int(count),
        }
        if self.compute_metrics is not None:
            extra = self.compute_metrics(EvalPrediction(*self._predict_examples(examples))) or {}
            for key, value in extra.items():
                if ignore_keys and key in ignore_keys:
                    continue
                metrics[key if key.startswith("eval_") else f"eval_{key}"] = value
        runtime = time.perf_counter() - started
        metrics["eval_runtime"] = round(runtime, 4)
        metrics["eval_samples_per_second"] = round(len(examples) / runtime, 3) if runtime > 0 else float("nan")
        if metric_key_prefix != "eval":
            metrics = {f"{metric_key_prefix}_{k[len('eval_'):]}": v for k, v in metrics.items()}
        return metrics

    def predict(self, dataset: Any) -> tuple[Any, np.ndarray]:
        """``(predictions, label_ids)`` of ``dataset`` on the current weights, in the dataset's order.

        Predictions are the model's logits ``[examples, length, vocab]``, or what
        ``preprocess_logits_for_metrics(logits, labels)`` makes of each eval batch; both are
        concatenated along examples and padded with -100 to the longest example, as HF's
        ``nested_concat``. Labels are aligned with ``input_ids`` (the shift happens in the loss).
        The forward program is compiled once per length bucket and kept with the trainer's others.
        """
        if dataset is None:
            raise ValueError("predict(): dataset is None; pass a step()-style dict, a list of strings or of token arrays.")
        error: Optional[Exception] = None
        try:
            examples = self._eval_inputs(dataset)
        except Exception as err:  # any type: shared, so every process raises (none waits in a collective)
            error, examples = err, []
        distributed.agree("predict()", error, self._fingerprint(), self.config.agreement_timeout_s)
        return self._predict_examples(examples)

    def _eval_microbatches(self, examples: Sequence[Any]) -> list[Any]:
        return self._plan(examples, self.eval_rows, shuffle=False)

    def _predict_examples(self, examples: Sequence[batching.Example]) -> tuple[Any, np.ndarray]:
        if not self.objective.supports_predict:
            raise NotImplementedError(
                f"predict() / compute_metrics are not supported by {type(self.objective).__name__} (encoder-decoder "
                "models) yet (eval_loss is); pass compute_metrics=None, or compute your metric from trainer.model's "
                "outputs."
            )
        predictions, labels = [], []
        for mb in self._eval_microbatches(examples):
            ids = shd.place_batch(mb.input_ids, self.mesh)
            rows, longest = mb.num_examples, int(mb.attention_mask.sum(axis=1).max(initial=0))
            logits = np.array(jax.device_get(self.programs.logits(self._params, ids, self._frozen))[:rows, :longest])
            label_ids = mb.labels[:rows, :longest].astype(np.int64)  # -100 at padding already
            if self.preprocess_logits_for_metrics is not None:
                logits = self.preprocess_logits_for_metrics(logits, label_ids)
            predictions.append(logits)
            labels.append(label_ids)
        if not predictions:
            return np.zeros((0,), np.float32), np.zeros((0,), np.int64)
        return batching.concat_padded(predictions), batching.concat_padded(labels)

    def generate(self, prompts: Sequence[Any], *, sampling: Any = None, **kwargs: Any):
        """Sample from the current training weights (see :func:`jaxsft.generate` for the arguments).

        ``seed`` (a keyword or ``sampling.seed``) None, the default, advances per call: call *n*
        samples with a seed derived from ``(TrainConfig.seed, n)``, so every round of a loop draws
        fresh samples and a rerun with the same config draws the same ones (the call count is saved
        in checkpoints). An explicit seed gives exactly the samples of any other call with that
        seed, and does not advance the count. (The function ``jaxsft.generate`` is pure: its seed
        defaults to 0.)

        The trainer keeps one :class:`jaxsft.generation.Sampler` on its mesh and sharding rules,
        so generate/train loops compile the generation programs once.
        """
        from jaxsft.generation import Sampler, SamplingParams, generate

        if self.tokenizer is None:
            raise ValueError("generate(): the trainer has no tokenizer; pass tokenizer= at construction.")
        fields = {f.name for f in dataclasses.fields(SamplingParams)}
        params = SamplingParams.of(sampling, {k: kwargs.pop(k) for k in list(kwargs) if k in fields})
        advancing = params.seed is None
        params = dataclasses.replace(params, seed=self.next_generation_seed() if advancing else params.seed)
        if "mesh" in kwargs or "sharding_rules" in kwargs:  # another layout: not the trainer's own sampler
            out = generate(self.model, self.tokenizer, prompts, sampling=params, xla_options=self.xla_options, **kwargs)
        else:
            if self._sampler is None:
                self._sampler = Sampler(self.model, self.tokenizer, sharding_rules=self.sharding_rules, xla_options=self.xla_options)
            self._sampler.tokenizer = self.tokenizer
            out = self._sampler.generate(prompts, sampling=params, model=self.model, **kwargs)
        if advancing:
            self.state.generate_calls += 1  # only once the call succeeded: a rejected call changes nothing
        return out

    def next_generation_seed(self) -> int:
        """The seed the next ``generate()`` call without ``seed=`` will use (reading it changes nothing)."""
        return int(np.random.SeedSequence([self.config.seed % (1 << 32), self.state.generate_calls]).generate_state(1)[0])

    def save_checkpoint(self, directory: str, *, keep_last: Optional[int] = None) -> str:
        """Write the whole trainer state to ``directory/checkpoint-<global_step>`` atomically; returns the path.

        Weights, optimizer state, step counters, log history and the shuffling RNG: a run restored
        from it takes the same updates as one that never stopped. A state holding NaN or inf is
        refused (``FloatingPointError``) and nothing is written. ``keep_last=k`` keeps only the newest
        k checkpoints in ``directory``. Call it on every process.
        """
        return checkpointing.save(self, directory, keep_last=keep_last)

    def restore_checkpoint(self, path: str) -> None:
        """Load a checkpoint from :meth:`save_checkpoint` (onto this trainer's mesh, whichever it is).

        ``path`` is a ``checkpoint-<step>`` folder (``jaxsft.infra.checkpoint.latest_checkpoint(dir)``
        finds the newest). A checkpoint of another architecture or optimizer is refused before
        anything changes. The config is this trainer's, so a resumed run may change e.g. the
        learning rate; the schedule continues from the restored ``global_step``.
        """
        checkpointing.restore(self, path)

    # ------------------------------------------------------------------ the state, as one pytree
    def state_dict(self) -> dict[str, Any]:
        """Everything ``step()`` depends on, as one pytree (the one thing checkpoints read and write).

        ``params`` (pure dict; a LoRA model's adapters only), ``opt_state``, ``global_step``, ``dropout_key``, device
        ``counters`` from the TrainState; ``rng``, ``log_history``, host counters. The next ``step()`` donates the arrays.
        """
        return train_state.state_dict_of(self.train_state, self.state, self._rng)

    def load_state_dict(self, state: dict[str, Any], *, copy: bool = True) -> None:
        """Replace the whole state with ``state`` (from :meth:`state_dict` or ``jaxsft.infra.checkpoint.read``).

        Everything is checked first (keys, tree structure, shapes, dtypes, host fields); on any mismatch
        a ``ValueError`` names it and nothing changes. Arrays are placed onto this trainer's mesh (any
        source mesh works); ``copy=False`` lets the trainer take ownership of arrays already placed there.
        The previous layout (no ``dropout_key``: format-3 checkpoints) loads too, its dropout stream restarted.
        """
        new_state, rng, host = train_state.checked_state(
            state, self.state_dict(), self._params, copy=copy, seed=self.config.seed,
            uses_dropout=self._takes_dropout_key(True), replicated=shd.replicated(self.mesh),
        )
        self._keep_initial_params()
        # Nothing above changed the trainer; from here on it is assignment only.
        self.train_state, self._rng = new_state, rng
        self.state.step_mirror = host["global_step"]
        self.state.log_history[:] = host["log_history"]  # in place: whoever holds the list (the facade) sees it
        for name in COUNTER_FIELDS:
            setattr(self.state, name, host["counters"][name])
        self._params_version += 1
        nnx.update(self._user_model, self._params)

    def reset(self) -> None:
        """Back to the state the trainer was built with, keeping every compiled program.

        The starting weights (a LoRA model's frozen base never changed), a fresh optimizer state, the
        schedule at step 0, ``global_step`` 0, the RNG re-seeded from ``TrainConfig.seed``, counters zeroed,
        ``log_history`` emptied in place. ``generate()``'s call count is kept, so a generate / reset / train
        loop (ReST-EM: sample from the latest model, fine-tune from the base on everything kept) samples
        afresh each round. Nothing recompiles. The starting weights are copied to the host (this process's
        shards) once, just before the first update or ``load_state_dict`` replaces them. Call it on every process.
        """
        if self._initial_params is not None:  # (else nothing replaced the device state since construction)
            params = self._initial_params.restore()
            with jax.set_mesh(self.mesh), shd.use_rules(self.sharding_rules):  # as at construction: a cache hit
                opt_state = self._init_opt_state(params)
            self.train_state = TrainState.fresh(params, opt_state, seed=self.config.seed, sharding=shd.replicated(self.mesh))
            self._params_version += 1
            nnx.update(self._user_model, self._params)
        self._rng = np.random.default_rng(self.config.seed)
        fresh = TrainerState()
        self.state.step_mirror = 0
        self.state.log_history.clear()  # in place: whoever holds the list (the facade) sees it
        for name in COUNTER_FIELDS:
            if name != "generate_calls":
                setattr(self.state, name, getattr(fresh, name))

    def _prepare_updates(self, updates: list, totals: Sequence[int]) -> tuple[list, float]:
        """Each update's programs, described once (none for an update without label tokens, which is skipped)
        and compiled ahead, side by side, where missing; the first call's host copy of the starting weights
        (``reset()``) is taken while they compile rather than after (a device-to-host copy of every weight).
        Returns the lowerings and the seconds spent compiling (0.0 when nothing was new)."""
        lowerings = [
            self.programs.update_lowerings(self.train_state, update, self._frozen) if total else []
            for update, total in zip(updates, totals)
        ]
        seconds = self.programs.compile_missing(lowerings, meanwhile=self._keep_initial_params if any(totals) else None)
        return lowerings, seconds

    def _keep_initial_params(self) -> None:
        """Copy the starting weights to the host once, before anything replaces or donates them."""
        if self._initial_params is None:
            self._initial_params = HostSnapshot.of(self._params)

    def save_pretrained(self, directory: str, **kwargs: Any):
        from jaxsft.models.hf_io import save_pretrained

        kwargs.setdefault("tokenizer", self.tokenizer)
        return save_pretrained(self.model, directory, **kwargs)

    # ------------------------------------------------------------------ inputs
    def _eval_inputs(self, dataset: Any) -> list:
        """An eval dataset as checked examples; errors name ``eval_dataset``."""
        try:
            return self._examples(**batching.step_inputs_of_dataset(dataset))
        except (TypeError, ValueError) as err:
            raise type(err)(f"eval_dataset: {err}") from None

    def _fingerprint(self) -> dict[str, Any]:
        """What every process must agree on before a collective (distributed.agree)."""
        return {
            "global_step": self.state.global_step,
            "rows": self.rows,
            "eval_rows": self.eval_rows,
            "gradient_accumulation_steps": self.config.gradient_accumulation_steps,
            "buckets": list(self.buckets),
            "mesh": {k: int(v) for k, v in self.mesh.shape.items()},
            "skip_nonfinite_updates": self.config.skip_nonfinite_updates,
        }

    def _agreed_examples(self, call: str, **inputs: Any) -> tuple[list, bool]:
        """``step()``'s keywords as checked examples, and whether the call is weighted, once every process has
        checked its own: any process's error is raised on all of them, before any state changes or collective
        runs (weighted calls run other programs, so every process must pass weights or none)."""
        error: Optional[Exception] = None
        examples: list = []
        try:
            examples = self._examples(**inputs)
        except Exception as err:  # any type (an input whose len() raises): shared, so every process raises
            error = err
        weighted = inputs.get("example_weights") is not None
        distributed.agree(call, error, {**self._fingerprint(), "example_weights": weighted},
                          self.config.agreement_timeout_s)
        return examples, weighted

    def _examples(self, **inputs: Any) -> list:
        """step()'s keywords as checked examples (the objective's routing); ``[]`` for an empty call."""
        return self.objective.examples(
            inputs, tokenizer=self.tokenizer, max_length=self.max_length, truncation_mode=self.config.truncation_mode,
            vocab_size=self.spec.vocab_size, eos_token_id=self._completion_eos(),
        )

    def _completion_eos(self) -> Optional[int]:
        """The EOS id appended to completions (TrainConfig.add_eos), or None."""
        if not self.config.add_eos:
            return None
        eos = getattr(self.tokenizer, "eos_token_id", None)
        return int(eos) if isinstance(eos, (int, np.integer)) else None

    def _plan(self, examples, rows: int, *, shuffle: bool, pack: bool = False, weighted: bool = False,
              rng: Optional[np.random.Generator] = None) -> list:
        """The examples as micro-batches of ``rows`` global rows, agreed over processes (the objective's plan),
        shuffled with ``rng`` (default: the trainer's own, advanced)."""
        local_rows = rows // jax.process_count()
        settings = objectives.PlanSettings(
            rows=local_rows, buckets=self.buckets, pack=pack, row_lengths=self.packed_row_lengths,
            row_multiple=max(1, self._shards // jax.process_count()), longer_rows=self.longer_packed_rows,
        )
        return self.objective.plan(examples, settings, self._rng if rng is None else rng, shuffle=shuffle,
                                   weighted=weighted)

    # ------------------------------------------------------------------ programs
    def compile_update(self, batch: dict[str, jax.Array]) -> jax.stages.Compiled:
        """The one-micro-batch update program (gradients and optimizer step) for ``batch``'s shape.

        ``step()`` runs it with ``gradient_accumulation_steps == 1``; it is compiled with the trainer's
        shardings and XLA options (not run, not cached), which is what ``jaxsft.infra.diagnostics`` inspects.
        ``batch`` holds placed ``input_ids`` and ``labels`` of one global micro-batch shape.
        """
        return self.programs.built(self.programs.lower_fused(self.train_state, batch, self._frozen))

    def _takes_dropout_key(self, train: bool) -> bool:
        setup = lora_lib.lora_setup(self._user_model)
        return train and (self.dropout_enabled or (setup is not None and setup.config.lora_dropout > 0))

    # ------------------------------------------------------------------ logging
