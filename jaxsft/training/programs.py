"""The trainer's compiled programs: the training counterpart of :class:`jaxsft.generation.Sampler`.

:class:`TrainPrograms` owns the ahead-of-time cache (one program per kind and batch shapes, so the count
is exact and a varying loop never recompiles beyond its buckets), the lowerings, the XLA options and the
shardings. Update programs take the :class:`~jaxsft.training.train_state.TrainState` whole, advance every
field inside (parameters, optimizer state, step, dropout key, non-finite streak) and give it back, donated;
evaluation and logits programs read its parameters. The functions compiled are
:mod:`jaxsft.training.step`'s, around the trainer's objective.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxsft.training import objectives
from jaxsft.infra import sharding as shd
from jaxsft.infra.side_by_side import compile_side_by_side, lowered_here
from jaxsft.training import step as step_fns
from jaxsft.training.train_state import TrainState

Lowerings = list[tuple[tuple, Callable[[], jax.stages.Lowered]]]


def _with_key(batch: dict, key: jax.Array, index: Any, takes_key: bool) -> dict:
    return {**batch, "dropout_rng": TrainState.microbatch_key(key, index)} if takes_key else batch


def fused_on_state(update: Callable, takes_key: bool) -> Callable:
    """``update(params, opt_state, batch, frozen) -> (params, opt_state, metrics)`` as one pure program on the
    whole :class:`TrainState`: the micro-batch's dropout key derived from the state's, and every field advanced."""

    def run(state: TrainState, batch: dict, frozen: tuple = ()):
        batch = _with_key(batch, state.dropout_key, 0, takes_key)
        params, opt_state, metrics = update(state.params, state.opt_state, batch, frozen)
        new = state.after_update(params, opt_state, metrics)
        return new, new.updated_metrics(metrics)

    return run


def counted_zeros(zeros: Callable) -> Callable:
    """The accumulator's zeros with a micro-batch counter (which dropout key the next micro-batch takes)."""

    def run(params):
        return zeros(params), jnp.zeros((), jnp.int32)

    return run


def counted_accumulate(accumulate: Callable, takes_key: bool) -> Callable:
    """One micro-batch into the sums, with its dropout key (derived from the state's, read, never donated)."""

    def run(params, acc_and_count, batch: dict, frozen: tuple, dropout_key: jax.Array):
        acc, index = acc_and_count
        return accumulate(params, acc, _with_key(batch, dropout_key, index, takes_key), frozen), index + 1

    return run


def apply_on_state(apply: Callable) -> Callable:
    """``apply(params, opt_state, acc)`` on the whole :class:`TrainState`, every field advanced."""

    def run(state: TrainState, acc_and_count):
        params, opt_state, metrics = apply(state.params, state.opt_state, acc_and_count[0])
        new = state.after_update(params, opt_state, metrics)
        return new, new.updated_metrics(metrics)

    return run


class TrainPrograms:
    """Compiles, caches and runs the train / accumulate / apply / eval / logits programs of one trainer.

    ``takes_dropout_key(train)`` says whether a training batch gets a ``dropout_rng`` key: derived inside the
    update programs from :attr:`TrainState.dropout_key` and the micro-batch's index (checkpointed with the
    state, so resume is exact).
    """

    def __init__(
        self,
        graphdef: nnx.GraphDef,
        tx: optax.GradientTransformation,
        objective: objectives.Objective,
        *,
        mesh: jax.sharding.Mesh,
        sharding_rules: shd.ShardingRules,
        xla_options: Optional[dict[str, Any]],
        skip_nonfinite: bool,
        gradient_accumulation_steps: int,
        takes_dropout_key: Callable[[bool], bool],
    ):
        self.graphdef, self.tx, self.objective = graphdef, tx, objective
        self.mesh, self.sharding_rules, self.xla_options = mesh, sharding_rules, xla_options
        self.skip_nonfinite = skip_nonfinite
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.takes_dropout_key = takes_dropout_key
        self.cache: dict[tuple, Any] = {}
        # Lower for these platforms instead of the mesh's own (None): ahead-of-time lowering for another backend,
        # e.g. a GPU program's lowering timed on a CPU host (benchmarks/first_step_host.py --lower-for-gpu).
        self.lowering_platforms: Optional[tuple[str, ...]] = None

    @property
    def count(self) -> int:
        """Programs compiled so far (each kind x batch shapes once)."""
        return len(self.cache)

    # ------------------------------------------------------------------ batches
    def device_batch(self, mb: Any) -> dict:
        """The micro-batch's fields on the mesh (a training batch's dropout key is added inside the program)."""
        return {name: shd.place_batch(rows, self.mesh) for name, rows in self.objective.batch_fields(mb).items()}

    def abstract_batch(self, mb: Any) -> dict[str, jax.ShapeDtypeStruct]:
        """What :meth:`device_batch` would place (global shapes, shardings), with no transfer."""
        processes = jax.process_count()
        return {
            name: jax.ShapeDtypeStruct(
                (rows.shape[0] * processes, *rows.shape[1:]), rows.dtype, sharding=shd.batch_sharding(self.mesh, rows.ndim)
            )
            for name, rows in self.objective.batch_fields(mb).items()
        }

    # ------------------------------------------------------------------ the cache
    @staticmethod
    def key(kind: str, batch: Optional[dict]) -> tuple:
        return (kind, tuple(sorted((k, tuple(v.shape)) for k, v in batch.items()))) if batch is not None else (kind,)

    @staticmethod
    def layout(key: tuple) -> str:
        """A program key as words: ``"fused 8x512 packed"``, ``"apply"``."""
        if len(key) == 1:
            return key[0]
        fields = dict(key[1])
        shape = "x".join(map(str, fields.get("input_ids", next(iter(fields.values()), ()))))
        return f"{key[0]} {shape}{' packed' if 'segment_ids' in fields else ''}"

    def cached(self, key: tuple, build: Callable[[], Any]):
        if key not in self.cache:
            self.cache[key] = build()
        return self.cache[key]

    def lower(self, fn, args, *, donate, out_shardings) -> jax.stages.Lowered:
        def lower_now():
            with jax.set_mesh(self.mesh), shd.use_rules(self.sharding_rules):
                traced = jax.jit(fn, donate_argnums=donate, out_shardings=out_shardings).trace(*args)
                return traced.lower(lowering_platforms=self.lowering_platforms)

        return lowered_here(lower_now)

    def built(self, lowered: jax.stages.Lowered) -> jax.stages.Compiled:
        """A lowered program compiled with the trainer's XLA options (the one place they are applied)."""
        return lowered.compile(compiler_options=self.xla_options or None)

    @staticmethod
    def state_shardings(state: TrainState) -> TrainState:
        return jax.tree.map(lambda x: x.sharding, state)

    # ------------------------------------------------------------------ updates
    def lower_fused(self, state: TrainState, batch: dict, frozen: tuple) -> jax.stages.Lowered:
        """The one-micro-batch update (gradients and optimizer step) for ``batch``'s shape; the state donated."""
        fused = step_fns.make_fused_update(self.graphdef, self.tx, self.objective, self.skip_nonfinite)
        return self.lower(
            fused_on_state(fused, self.takes_dropout_key(True)), (state, batch, frozen), donate=(0,),
            out_shardings=(self.state_shardings(state), shd.replicated(self.mesh)),
        )

    def update_lowerings(self, state: TrainState, update: Sequence[Any], frozen: tuple) -> Lowerings:
        """(program key, lowering) for every program ``update`` runs, in the order it runs them.

        One description for both :meth:`run_update` and :meth:`compile_missing`, so the programs
        compiled ahead are exactly the ones looked up. Batches and the accumulator are abstract here
        (lowering needs only shapes and shardings) and lowerings are lazy: a built program costs a key.
        """
        rep = shd.replicated(self.mesh)
        if len(update) == 1 and self.gradient_accumulation_steps == 1:
            batch = self.abstract_batch(update[0])
            return [(self.key("fused", batch), lambda: self.lower_fused(state, batch, frozen))]
        zeros = counted_zeros(step_fns.make_zero_accumulator(self.objective))
        takes_key = self.takes_dropout_key(True)

        def params_sh():
            return jax.tree.map(lambda x: x.sharding, state.params)

        def acc():
            (grads, *sums), count = jax.eval_shape(zeros, state.params)
            grads = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), grads, params_sh())
            sums = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), sums)
            return (grads, *sums), jax.ShapeDtypeStruct(count.shape, count.dtype, sharding=rep)

        def sums_out():
            return (params_sh(), rep, rep, rep), rep

        out = [(self.key("zeros", None), lambda: self.lower(zeros, (state.params,), donate=(), out_shardings=sums_out()))]
        for mb in update:
            batch = self.abstract_batch(mb)
            out.append((self.key("accumulate", batch), lambda batch=batch: self.lower(
                counted_accumulate(step_fns.make_accumulate(self.graphdef, self.objective), takes_key),
                (state.params, acc(), batch, frozen, state.dropout_key), donate=(1,), out_shardings=sums_out(),
            )))
        out.append((self.key("apply", None), lambda: self.lower(
            apply_on_state(step_fns.make_apply(self.tx, self.skip_nonfinite)), (state, acc()),
            donate=(0,), out_shardings=(self.state_shardings(state), rep),
        )))
        return out

    def compile_missing(self, lowerings: Sequence[Lowerings], meanwhile: Optional[Callable[[], None]] = None) -> float:
        """Compile the call's not-yet-built programs side by side before the first one runs.

        A call that meets several new shapes (packing and buckets make a few) waits about as long as its
        lowerings plus its slowest compile, not the sum of the compiles (:mod:`jaxsft.infra.side_by_side`).
        ``meanwhile`` is host work the call needs before its first update (the trainer's copy of the
        starting weights for ``reset()``): it runs on this thread once every program is lowered,
        while they compile, instead of after them; it runs (once) even when nothing is missing.

        Returns the seconds spent lowering and compiling (0.0 when every program was built already; an
        overlapped ``meanwhile`` counts only where it outlasts the compiles).
        """
        missing = self.missing(lowerings)
        started = time.perf_counter()
        self.cache.update(compile_side_by_side(missing, self.built, meanwhile))
        return time.perf_counter() - started if missing else 0.0

    def compile_each(self, lowerings: Sequence[Lowerings]) -> list[tuple[tuple, float, float]]:
        """:meth:`compile_missing` one program at a time: ``(key, lowering seconds, compiling seconds)`` for each
        program built here, in the order met. For measurements (``benchmarks/first_step_host.py``), where the
        side-by-side form's overlap would hide which program costs what."""
        timings = []
        for key, lower in self.missing(lowerings).items():
            started = time.perf_counter()
            lowered = lower()
            lowered_at = time.perf_counter()
            self.cache[key] = self.built(lowered)
            timings.append((key, lowered_at - started, time.perf_counter() - lowered_at))
        return timings

    def missing(self, lowerings: Sequence[Lowerings]) -> dict[tuple, Callable[[], jax.stages.Lowered]]:
        """The programs of ``lowerings`` not built yet, each once, in the order met: key -> its lowering."""
        out: dict[tuple, Callable[[], jax.stages.Lowered]] = {}
        for update_lowerings in lowerings:
            for key, lower in update_lowerings:
                if key not in self.cache:
                    out.setdefault(key, lower)
        return out

    def run_update(
        self, state: TrainState, update: Sequence[Any], lowerings: Lowerings, frozen: tuple
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        """Run one update's programs (any still missing compile here); ``state`` is donated, the new one returned
        (its step, dropout key and counters advanced inside the programs: no host round trip)."""
        programs = [self.cached(key, lambda lower=lower: self.built(lower())) for key, lower in lowerings]
        if len(programs) == 1:  # one micro-batch, no accumulation: gradients and the optimizer step in one program
            return programs[0](state, self.device_batch(update[0]), frozen)
        zeros, *accumulates, apply = programs
        acc = zeros(state.params)
        for mb, accumulate in zip(update, accumulates):
            acc = accumulate(state.params, acc, self.device_batch(mb), frozen, state.dropout_key)
        return apply(state, acc)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, params: Any, mb: Any, frozen: tuple):
        """(loss sum, denominator, aux) of one evaluation micro-batch (no dropout)."""
        batch = self.device_batch(mb)
        program = self.cached(self.key("eval", batch), lambda: self.built(self.lower(
            step_fns.make_eval(self.graphdef, self.objective), (params, batch, frozen), donate=(),
            out_shardings=shd.replicated(self.mesh),
        )))
        return program(params, batch, frozen)

    def logits(self, params: Any, input_ids: jax.Array, frozen: tuple) -> jax.Array:
        """The model's logits for placed ``input_ids`` (one program per length bucket)."""
        program = self.cached(self.key("logits", {"input_ids": input_ids}), lambda: self.built(self.lower(
            step_fns.make_logits(self.graphdef), (params, input_ids, frozen), donate=(),
            out_shardings=shd.replicated(self.mesh),
        )))
        return program(params, input_ids, frozen)
