"""The trainer's compiled programs: the training counterpart of :class:`jaxsft.generation.Sampler`.

:class:`TrainPrograms` owns the ahead-of-time cache (one program per kind and batch shapes, so the count
is exact and a varying loop never recompiles beyond its buckets), the lowerings, the XLA options and the
shardings. Update programs take the :class:`~jaxsft.training.train_state.TrainState` whole and give it back,
donated; evaluation and logits programs read its parameters. The functions compiled are
:mod:`jaxsft.training.step`'s, around the trainer's objective.
"""

from __future__ import annotations

import concurrent.futures
import os
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
import optax
from flax import nnx

from jaxsft.training import objectives
from jaxsft.infra import sharding as shd
from jaxsft.training import step as step_fns
from jaxsft.training.train_state import TrainState

Lowerings = list[tuple[tuple, Callable[[], jax.stages.Lowered]]]


def _on_state(update: Callable) -> Callable:
    """An update ``(params, opt_state, ...) -> (params, opt_state, metrics)`` as ``(state, ...) -> (state, metrics)``."""

    def run(state: TrainState, *args):
        params, opt_state, metrics = update(state.params, state.opt_state, *args)
        return TrainState(params, opt_state), metrics

    return run


class TrainPrograms:
    """Compiles, caches and runs the train / accumulate / apply / eval / logits programs of one trainer.

    ``takes_dropout_key(train)`` says whether a batch carries a ``dropout_rng`` key (drawn from the
    trainer's RNG in :meth:`device_batch`, so resume is exact).
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

    @property
    def count(self) -> int:
        """Programs compiled so far (each kind x batch shapes once)."""
        return len(self.cache)

    # ------------------------------------------------------------------ batches
    def device_batch(self, mb: Any, *, train: bool = True, rng: Optional[np.random.Generator] = None) -> dict:
        """The micro-batch on the mesh. A training batch with dropout on (the model's own, or LoRA's) carries
        one ``dropout_rng`` key drawn from ``rng``; evaluation batches carry none, so evaluation is deterministic."""
        batch = {name: shd.place_batch(rows, self.mesh) for name, rows in self.objective.batch_fields(mb).items()}
        if self.takes_dropout_key(train):
            seed = int(rng.integers(0, 2**31 - 1))
            batch["dropout_rng"] = jax.device_put(jax.random.PRNGKey(seed), shd.replicated(self.mesh))
        return batch

    def abstract_batch(self, mb: Any, *, train: bool = True) -> dict[str, jax.ShapeDtypeStruct]:
        """What :meth:`device_batch` would place (global shapes, shardings), with no transfer and no RNG draw."""
        processes = jax.process_count()
        batch = {
            name: jax.ShapeDtypeStruct(
                (rows.shape[0] * processes, *rows.shape[1:]), rows.dtype, sharding=shd.batch_sharding(self.mesh, rows.ndim)
            )
            for name, rows in self.objective.batch_fields(mb).items()
        }
        if self.takes_dropout_key(train):
            key = jax.eval_shape(jax.random.PRNGKey, 0)
            batch["dropout_rng"] = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=shd.replicated(self.mesh))
        return batch

    # ------------------------------------------------------------------ the cache
    @staticmethod
    def key(kind: str, batch: Optional[dict]) -> tuple:
        return (kind, tuple(sorted((k, tuple(v.shape)) for k, v in batch.items()))) if batch is not None else (kind,)

    def cached(self, key: tuple, build: Callable[[], Any]):
        if key not in self.cache:
            self.cache[key] = build()
        return self.cache[key]

    def lower(self, fn, args, *, donate, out_shardings) -> jax.stages.Lowered:
        with jax.set_mesh(self.mesh), shd.use_rules(self.sharding_rules):
            return jax.jit(fn, donate_argnums=donate, out_shardings=out_shardings).lower(*args)

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
            _on_state(fused), (state, batch, frozen), donate=(0,),
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
        zeros = step_fns.make_zero_accumulator(self.objective)

        def params_sh():
            return jax.tree.map(lambda x: x.sharding, state.params)

        def acc():
            grads, *sums = jax.eval_shape(zeros, state.params)
            grads = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), grads, params_sh())
            return (grads, *jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), sums))

        def sums_out():
            return (params_sh(), rep, rep, rep)

        out = [(self.key("zeros", None), lambda: self.lower(zeros, (state.params,), donate=(), out_shardings=sums_out()))]
        for mb in update:
            batch = self.abstract_batch(mb)
            out.append((self.key("accumulate", batch), lambda batch=batch: self.lower(
                step_fns.make_accumulate(self.graphdef, self.objective), (state.params, acc(), batch, frozen),
                donate=(1,), out_shardings=sums_out(),
            )))
        out.append((self.key("apply", None), lambda: self.lower(
            _on_state(step_fns.make_apply(self.tx, self.skip_nonfinite)), (state, acc()),
            donate=(0,), out_shardings=(self.state_shardings(state), rep),
        )))
        return out

    def compile_missing(self, lowerings: Sequence[Lowerings]) -> None:
        """Compile the call's not-yet-built programs side by side before the first one runs.

        XLA compiles outside the GIL, so a call that meets several new shapes (packing and buckets
        make a few) waits about as long as its lowerings plus its slowest compile, not the sum of
        the compiles. Lowering stays on this thread, overlapping the compiles already started; a
        single missing program is left to the lazy path.
        """
        missing: dict[tuple, Callable[[], jax.stages.Lowered]] = {}
        for update_lowerings in lowerings:
            for key, lower in update_lowerings:
                if key not in self.cache:
                    missing.setdefault(key, lower)
        if len(missing) < 2:
            return
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(len(missing), os.cpu_count() or 1)) as pool:
            # Each program starts compiling as soon as it is lowered, while the next one is lowered here.
            futures = {key: pool.submit(self.built, lower()) for key, lower in missing.items()}
            for key, future in futures.items():
                self.cache[key] = future.result()

    def run_update(
        self, state: TrainState, update: Sequence[Any], lowerings: Lowerings, frozen: tuple, rng: np.random.Generator
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        """Run one update's programs (any still missing compile here); ``state`` is donated, the new one returned."""
        programs = [self.cached(key, lambda lower=lower: self.built(lower())) for key, lower in lowerings]
        if len(programs) == 1:  # one micro-batch, no accumulation: gradients and the optimizer step in one program
            return programs[0](state, self.device_batch(update[0], rng=rng), frozen)
        zeros, *accumulates, apply = programs
        acc = zeros(state.params)
        for mb, accumulate in zip(update, accumulates):
            acc = accumulate(state.params, acc, self.device_batch(mb, rng=rng), frozen)
        return apply(state, acc)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, params: Any, mb: Any, frozen: tuple):
        """(loss sum, denominator, aux) of one evaluation micro-batch (no dropout)."""
        batch = self.device_batch(mb, train=False)
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
