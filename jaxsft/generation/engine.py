"""The decode engine: fixed row slots, refilled from a queue of prompts as their rows finish.

A call's prompts wait in a queue. The engine holds ``groups`` slots of ``n`` rows (one prompt
and its ``n`` samples per group; the group count comes from a KV memory budget). Three
ahead-of-time compiled programs, all on fixed shapes:

* ``init``: an empty :class:`DecodeState` (every row free);
* ``prefill``: runs up to ``Gp`` prompts (a power of two) into free groups' cache (the prompt's
  part once per group), samples each row's first token;
* ``decode``: a ``lax.while_loop`` of decode steps over all slots that returns to the host
  when enough groups have finished for the waiting prompts to take them (or a step limit, for
  stop strings, or everything is done).

What a model kind does inside prefill and a decode step (its cache layout, its attention) sits
behind :class:`DecodeModel`, so this module never asks which kind it runs: the decoder-only
adapter (:mod:`jaxsft.generation.causal`) and the encoder-decoder one
(:mod:`jaxsft.generation.seq2seq`) implement it. Slots, refill, sampling and stopping are here,
once for both.

The host loop harvests finished groups, prefills waiting prompts into their slots and decodes
again, until the queue is empty and every row is done. A row's key is ``fold_in(key(seed),
global row)`` folded with its token index, so its sample never depends on the slot it ran in
or on how many slots there were.

A decode step runs on one GPU stream: its GEMMs, then its attention. Overlapping the two on a second
stream (half the rows each) was tried and is not available: jax 0.11.2's XLA refused the stream-annotated
attention (it holds nested calls), in the ``while`` loop and unrolled alike, and splitting the rows alone
cost 16-31 % a step on one H200 (``benchmarks/bench_stream_overlap.py``, benchmarks/RESULTS.md).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxsft.infra import sharding as shd
from jaxsft.generation.sampling import Mode, Sampling, row_keys, sample

MIN_PROMPT_BUCKET = 16
MIN_NEW_TOKENS_BUCKET = 16


class DecodeState(NamedTuple):
    """Everything the engine's programs carry between calls (a pytree; donated from program to program)."""

    cache: Any  # the model kind's cache (DecodeModel.empty_cache): K/V and per-group prompt facts
    tokens: Any  # [B, Ls + 1] int32: generated so far (column Ls absorbs finished rows' writes)
    last: Any  # [B] int32: the token the next step feeds in
    gen_len: Any  # [B] int32: tokens generated so far
    keys: Any  # [B] PRNG keys
    done: Any  # [B] bool (free slots are done)
    finished_by_eos: Any  # [B] bool
    steps: Any  # int32 scalar: decode steps run in the current decode call


@dataclasses.dataclass(frozen=True)
class Shape:
    """The static shape of an engine run: programs are compiled per Shape (and mode)."""

    groups: int  # G, a power of two
    n: int  # rows per group (num_return_sequences)
    prompt_slots: int  # Lp, a power of two >= MIN_PROMPT_BUCKET
    new_slots: int  # Ls, a power of two >= MIN_NEW_TOKENS_BUCKET

    @property
    def rows(self) -> int:
        return self.groups * self.n


class DecodeModel(Protocol):
    """What the engine needs of a model kind; an adapter implements it over a jaxsft model class.

    Methods taking ``model`` run inside the engine's programs on the merged model; ``cache`` is the
    adapter's own pytree (groups [G, ...] and rows [G * n, ...] on the leading axis).
    """

    prompt_padding: str  # "left" (the prompt's last token at the end) or "right" (positions from 0)
    accepts_chat: bool  # whether chat prompts (a template's turns) make sense for this kind (host side)

    def tokens_before_new(self, longest_prompt: int) -> int:
        """What HF's ``max_length`` counts besides the new tokens (host side: the default budget)."""

    def check_lengths(self, prompt_ids: list, max_new_tokens: int) -> Optional[str]:
        """Refuse what the model's positions cannot hold (host side, before any work); return a warning or None."""

    def merge(self, graphdef: Any, state: Any) -> Any:
        """The model a program computes with (e.g. its weights cast to the compute dtype once)."""

    def empty_cache(self, shape: Shape) -> Any:
        """Zeroed cache buffers for ``shape`` (every group free)."""

    def cache_layouts(self, mesh: Any, shape: Shape, rules: Any) -> Any:
        """The cache's shardings (a pytree like :meth:`empty_cache`'s)."""

    def prefill(self, model: Any, cache: Any, ids: jax.Array, mask: jax.Array, slots: jax.Array, shape: Shape
                ) -> tuple[Any, jax.Array]:
        """Prompts ``ids``/``mask`` [Gp, Lp] into groups ``slots`` [Gp] (out of range: dropped); returns the
        cache and each prompt's next-token logits [Gp, V] (the compute dtype, as HF's generate samples them),
        shared by its ``n`` rows."""

    def decode_context(self, model: Any, cache: Any, shape: Shape) -> Any:
        """What every decode step of one decode call reuses (split weights, per-group positions)."""

    def decode_step(self, model: Any, context: Any, cache: Any, last: jax.Array, index: jax.Array, live: jax.Array,
                    shape: Shape) -> tuple[Any, jax.Array]:
        """Feed ``last`` [B], token ``index`` [B] of each row's continuation; returns the cache and logits [B, V].

        ``live`` [B] bool: the rows still generating. A finished (or free) row's logits are discarded, so an
        adapter may skip its attention work (the drain tail of a ragged call is mostly such rows)."""

    def kv_bytes_per_group(self, n: int, prompt_slots: int, new_slots: int) -> int:
        """Cache bytes one group holds (the slot count follows from the KV budget)."""

    def prefill_group_cap(self, prompt_slots: int, budget: int) -> int:
        """Prompts per prefill call so that its attention scores stay under ``budget`` bytes."""


def pow2_at_least(n: int, minimum: int = 1) -> int:
    """The smallest power of two >= ``n`` (and >= ``minimum``): the generation programs' bucket sizes."""
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def pow2_at_most(n: int) -> int:
    return 1 << (max(1, int(n)).bit_length() - 1)


# ---------------------------------------------------------------------------- jitted bodies
def make_init(adapter: DecodeModel, shape: Shape):
    def init() -> DecodeState:
        b = shape.rows
        return DecodeState(
            cache=adapter.empty_cache(shape), tokens=jnp.zeros((b, shape.new_slots + 1), jnp.int32),
            last=jnp.zeros((b,), jnp.int32), gen_len=jnp.ones((b,), jnp.int32),
            keys=row_keys(jnp.uint32(0), jnp.arange(b)), done=jnp.ones((b,), bool),
            finished_by_eos=jnp.zeros((b,), bool), steps=jnp.int32(0),
        )

    return init


def make_prefill(adapter: DecodeModel, graphdef, shape: Shape, mode: Mode):
    """Prefill ``Gp`` prompts into the group slots ``inputs['slots']`` (``G`` = a filler, dropped)."""
    n = shape.n

    def prefill(state, st: DecodeState, inputs, sampling: Sampling) -> DecodeState:
        model = adapter.merge(graphdef, state)
        ids, mask, slots = inputs["input_ids"], inputs["mask"].astype(bool), inputs["slots"]
        gp = ids.shape[0]
        cache, logits = adapter.prefill(model, st.cache, ids, mask, slots, shape)
        logits = jnp.repeat(logits, n, axis=0)  # [Gp * n, V]: one prompt, n rows
        rows = (slots[:, None] * n + jnp.arange(n)[None, :]).reshape(-1)
        rows = jnp.where(jnp.repeat(slots, n) < shape.groups, rows, shape.rows)  # fillers: out of range, dropped
        keys = row_keys(sampling.seed, inputs["row_ids"])
        tok = sample(logits, keys, jnp.zeros((gp * n,), jnp.int32), mode, sampling.temperature, sampling.top_p)
        hit = jnp.any(tok[:, None] == sampling.eos[None, :], axis=-1)
        done = hit | (sampling.max_new <= 1)
        first = jnp.full((gp * n, shape.new_slots + 1), sampling.pad, jnp.int32).at[:, 0].set(tok)

        def put(buf, value):
            return buf.at[rows].set(value, mode="drop")

        return st._replace(
            cache=cache, tokens=put(st.tokens, first), last=put(st.last, tok), gen_len=put(st.gen_len, jnp.ones_like(tok)),
            keys=put(st.keys, keys), done=put(st.done, done), finished_by_eos=put(st.finished_by_eos, hit),
        )

    return prefill


def make_decode(adapter: DecodeModel, graphdef, shape: Shape, mode: Mode):
    """Decode steps until ``limit`` steps ran, every row is done, or ``refill_at`` groups are free."""
    n, g = shape.n, shape.groups

    def decode(state, st: DecodeState, sampling: Sampling, limit, refill_at) -> DecodeState:
        model = adapter.merge(graphdef, state)
        context = adapter.decode_context(model, st.cache, shape)  # once, outside the loop

        def cond(st: DecodeState):
            free = jnp.sum(jnp.all(st.done.reshape(g, n), axis=1))
            return (st.steps < limit) & ~jnp.all(st.done) & (free < refill_at)

        def body(st: DecodeState):
            index = st.gen_len - 1  # the token fed now is token gen_len - 1 of its row
            live = ~st.done
            cache, logits = adapter.decode_step(model, context, st.cache, st.last, index, live, shape)
            tok = sample(logits, st.keys, st.gen_len, mode, sampling.temperature, sampling.top_p)
            tok = jnp.where(live, tok, sampling.pad)
            hit = jnp.any(tok[:, None] == sampling.eos[None, :], axis=-1) & live
            tokens = jax.vmap(lambda row, t, i: jax.lax.dynamic_update_slice_in_dim(row, t[None], i, 0))(
                st.tokens, tok, st.gen_len)  # finished rows write pad past their end
            gen_len = st.gen_len + live.astype(jnp.int32)
            done = st.done | hit | (gen_len >= sampling.max_new)
            return st._replace(cache=cache, tokens=tokens, last=jnp.where(live, tok, st.last), gen_len=gen_len,
                               done=done, finished_by_eos=st.finished_by_eos | hit, steps=st.steps + 1)

        return jax.lax.while_loop(cond, body, st._replace(steps=jnp.int32(0)))

    return decode


# ---------------------------------------------------------------------------- host side
@dataclasses.dataclass
class Queue:
    """A call's prompts (token ids, in call order) waiting for a group slot."""

    prompt_ids: list[list[int]]
    next: int = 0

    def waiting(self) -> int:
        return len(self.prompt_ids) - self.next

    def take(self, k: int) -> list[int]:
        out = list(range(self.next, min(len(self.prompt_ids), self.next + k)))
        self.next += len(out)
        return out


class Programs(NamedTuple):
    init: Callable
    prefill: Callable[[int], Callable]  # prompts per prefill call -> program
    decode: Callable


def layouts(adapter: DecodeModel, mesh, shape: Shape, rules) -> DecodeState:
    """Shardings of the engine state: rows over the batch axes when they divide; the cache's from its adapter."""

    def named(axes, shp):
        return NamedSharding(mesh, shd.activation_spec(axes, shp, mesh, rules))

    rows1 = named(("batch",), (shape.rows,))
    return DecodeState(
        cache=adapter.cache_layouts(mesh, shape, rules), tokens=named(("batch", None), (shape.rows, 1)), last=rows1,
        gen_len=rows1, keys=rows1, done=rows1, finished_by_eos=rows1, steps=NamedSharding(mesh, P()),
    )


def first_fill_size(shape: Shape, prefill_cap: int) -> int:
    """Prompts in a call's first prefill: every group slot at once (fillers where prompts run out), up to the cap,
    so a call runs the prefill program its shape already has. Known before the call, so it compiles beside decode."""
    return min(prefill_cap, shape.groups)


def run(programs: Programs, state, queue: Queue, shape: Shape, pad_id: int, max_new: int, prefill_cap: int,
        place_inputs: Callable, place_scalar: Callable, place_rows: Callable, scalars: Sampling, *,
        left_pad: bool = True, step_limit: Optional[int] = None, on_chunk: Optional[Callable] = None
        ) -> list[tuple[np.ndarray, str]]:
    """Drive the engine until every prompt of ``queue`` has ``n`` finished rows; results prompt-major.

    ``on_chunk(host, running_rows) -> rows to stop`` (stop strings) is called after every decode call
    when given, with ``step_limit`` steps per call.
    """
    g, n = shape.groups, shape.n
    n_prompts = len(queue.prompt_ids)
    results: list[Optional[tuple[np.ndarray, str]]] = [None] * (n_prompts * n)
    owner = [-1] * g  # prompt index per group slot (-1: free)
    stopped: set[int] = set()  # rows a stop string ended (global row ids)
    dstate = programs.init()
    host = None
    while True:
        if host is not None:  # harvest finished groups
            done = host["done"]
            for slot in range(g):
                p = owner[slot]
                if p < 0 or not done[slot * n : (slot + 1) * n].all():
                    continue
                for j in range(n):
                    r = slot * n + j
                    length = int(host["gen_len"][r])
                    row = np.asarray(host["tokens"][r, :length]).copy()
                    gr = p * n + j
                    reason = "eos" if host["finished_by_eos"][r] else ("stop" if gr in stopped else "length")
                    results[gr] = (row, reason)
                owner[slot] = -1
        free = [s for s in range(g) if owner[s] < 0]
        while free and queue.waiting():
            # The first fill prefills every group (fillers where prompts run out): a call with fewer prompts
            # than slots then runs the one prefill program its shape already has, not one per prompt count.
            first_fill = host is None and len(free) == g
            gp = first_fill_size(shape, prefill_cap) if first_fill else min(
                prefill_cap, pow2_at_least(min(len(free), queue.waiting())))
            taken = queue.take(min(gp, len(free)))
            slots, free = free[: len(taken)], free[len(taken):]
            ids = np.full((gp, shape.prompt_slots), pad_id, np.int32)
            mask = np.zeros((gp, shape.prompt_slots), np.int32)
            for i, p in enumerate(taken):
                toks = queue.prompt_ids[p]
                at = slice(shape.prompt_slots - len(toks), None) if left_pad else slice(0, len(toks))
                ids[i, at] = toks
                mask[i, at] = 1
                owner[slots[i]] = p
            mask[len(taken):, -1 if left_pad else 0] = 1  # fillers: one real token so no attention row is empty
            slot_arr = np.full((gp,), g, np.int32)
            slot_arr[: len(taken)] = slots
            row_ids = np.full((gp * n,), -1, np.int32)
            for i, p in enumerate(taken):
                row_ids[i * n : (i + 1) * n] = p * n + np.arange(n)
            dstate = programs.prefill(gp)(state, dstate, place_inputs(ids, mask, slot_arr, row_ids), scalars)
        if all(o < 0 for o in owner):
            break
        waiting = queue.waiting()
        refill_at = g + 1 if not waiting else max(1, min(waiting, g // 8))
        limit = step_limit if step_limit is not None else max_new + 1
        dstate = programs.decode(state, dstate, scalars, place_scalar(limit), place_scalar(refill_at))
        host = jax.device_get({k: getattr(dstate, k) for k in ("tokens", "done", "finished_by_eos", "gen_len")})
        if on_chunk is not None:
            running = [s * n + j for s in range(g) if owner[s] >= 0 for j in range(n) if not host["done"][s * n + j]]
            hits = on_chunk(host, running)
            if hits:
                done = np.asarray(host["done"]).copy()
                for r in hits:
                    done[r] = True
                    stopped.add(owner[r // n] * n + r % n)
                host["done"] = done
                dstate = dstate._replace(done=place_rows(done))
    return results  # type: ignore[return-value]
