"""The public generation API: :func:`generate`, :class:`Sampler`, :class:`GenerationResult`.

Host side only: validate a call (every check before any work), tokenize, hand the prompts to
the engine (:mod:`jaxsft.generation.engine`: fixed row slots refilled from a queue, a KV cache
holding each prompt once for its samples) and shape its rows into texts or a result.

* **Programs.** A :class:`Sampler` owns its compiled programs, keyed by the engine's static
  shape (slot groups, rows per group, prompt and new-token buckets, all powers of two) and the
  sampling *mode* (greedy or sampling, ``top_k`` value, top-p on/off); temperature, top-p
  value, seed, EOS ids and the token budget are run-time values (:class:`Sampling`), so calls of
  similar size share programs. :func:`compiled_programs` counts compilations process-wide.
  :func:`generate` keeps one Sampler per model object; ``trainer.generate`` the trainer's own.
* **Sampling** is per row from ``fold_in(fold_in(key(seed), row), token index)``, ``row`` the
  output row's global index, so a row's sample depends on the seed, its prompt and its sample
  index only, never on ``batch_size`` or the slot it ran in. Order as in HF: temperature ->
  top-k -> top-p (:mod:`jaxsft.generation.sampling`). Temperature 0 is greedy (argmax).
* **Stopping.** A row finishes at any EOS id (the tokenizer's eos plus the model config's eos
  ids) or its length. Stop strings are checked on the host between decode calls of
  ``stop_check_every`` steps; every text is cut before its first stop string.
* **Memory.** The slot count comes from ``kv_cache_bytes`` (default: a quarter of the
  accelerator's memory, 2 GiB on CPU): a call of any number of prompts runs through the same
  slots, refilling them as rows finish. A sliding-window layer holds only its window's KV, so
  Gemma and Mistral fit more slots (:func:`jaxsft.generation.kv_cache.layer_slots`).
* **Sharding.** Everything runs under the model's mesh and the sharding rules' activation
  table: slot groups split over the data axes when they divide them, KV heads over the tensor
  axis when it divides them.
"""

from __future__ import annotations

import dataclasses
import warnings
import weakref
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxsft.infra import chat as chat_format
from jaxsft.infra import sharding as shd
from jaxsft.generation import engine
from jaxsft.generation.common import GenerationResult, check_sampling_arguments, is_int as _is_int
from jaxsft.generation.common import is_number as _is_number
from jaxsft.generation.engine import MAX_EOS_IDS, MIN_NEW_TOKENS_BUCKET, MIN_PROMPT_BUCKET, DecodeState, pow2_at_least
from jaxsft.generation.sampling import Mode, Sampling
from jaxsft.models.decoder import CausalLM

__all__ = [
    "generate", "Sampler", "DecodeState", "Sampling", "Mode", "GenerationResult", "compiled_programs", "clear_cache",
    "format_prompts", "pow2_at_least", "check_sampling_arguments",
]

CPU_KV_CACHE_BYTES = 2 << 30  # the default KV budget where the device reports no memory size
PREFILL_SCORE_BYTES = 2 << 30  # a prefill call's attention scores stay under this

Prompt = Union[str, Sequence[dict]]

# Process-wide compile counter (telemetry, not a cache): every Sampler adds to it.
_COMPILES = {"init": 0, "prefill": 0, "decode": 0}
# The Sampler that :func:`generate` keeps per model object (and mesh/rules); an entry dies with its model.
_SAMPLERS: "weakref.WeakKeyDictionary[CausalLM, dict]" = weakref.WeakKeyDictionary()


def compiled_programs() -> int:
    """How many generation programs have been compiled in this process (init, prefill, decode), by any Sampler."""
    return sum(_COMPILES.values())


def clear_cache() -> None:
    """Forget the samplers :func:`generate` keeps per model (the compile counter keeps counting)."""
    _SAMPLERS.clear()


# ---------------------------------------------------------------------------- public API
def format_prompts(tokenizer: Any, prompts: Sequence[Prompt], chat: bool = False) -> list[str]:
    """Strings unchanged; message lists (or every prompt when ``chat``) through the chat template."""
    out = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str) and not chat:
            out.append(prompt)
            continue
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise TypeError(
                f"prompts[{i}] must be a string or a list of {{'role': ..., 'content': ...}} messages, got {prompt!r}."
            )
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(
                f"prompts[{i}] is a chat (list of messages) but the tokenizer has no chat_template; pass plain strings."
            )
        out.append(chat_format.prompt_text(tokenizer, messages))  # step(texts=chats) formats them the same way
    return out


@dataclasses.dataclass(frozen=True)
class _Request:
    """One validated ``generate`` call (host side)."""

    max_new_tokens: int
    mode: Mode
    nrs: int
    seed: int
    temperature: float
    top_p: float
    stops: tuple[str, ...]
    batch_size: Optional[int]
    eos: tuple[int, ...]
    skip_special_tokens: bool
    stop_check_every: int


class Sampler:
    """Batched generation from a jaxsft model; owns its engine's compiled programs.

    Build one per model (the trainer keeps one for ``trainer.generate``) and call
    :meth:`generate` as often as you like: calls of similar size share programs (see the
    module doc), and ``model=`` hands in newer weights of the same model without recompiling.
    ``mesh`` defaults to the mesh the model's params live on; another mesh moves them there
    first, and ``sharding_rules`` (default ``jaxsft.infra.sharding.DEFAULT_RULES``) lay out the
    params, the KV cache and the rows.
    """

    def __init__(
        self,
        model: CausalLM,
        tokenizer: Any,
        *,
        mesh: Optional[jax.sharding.Mesh] = None,
        sharding_rules: Optional[shd.ShardingRules] = None,
        kv_cache_bytes: Optional[int] = None,
    ):
        if not isinstance(model, CausalLM):
            raise TypeError(f"generate(): model must be a jaxsft CausalLM, got {type(model).__name__}.")
        if sharding_rules is not None and not isinstance(sharding_rules, shd.ShardingRules):
            raise TypeError(f"sharding_rules must be a jaxsft.infra.sharding.ShardingRules, got {type(sharding_rules).__name__}.")
        self.model = model
        self.tokenizer = tokenizer
        self.mesh = mesh
        self.sharding_rules = sharding_rules or shd.DEFAULT_RULES
        # The KV memory the engine's slots may hold (None: default_kv_cache_bytes()); the slot count follows.
        self.kv_cache_bytes = _check_budget(kv_cache_bytes, "Sampler()")
        self._programs: dict[tuple, Any] = {}

    @property
    def compiled_programs(self) -> int:
        """How many programs this sampler has compiled (init, prefill, decode)."""
        return len(self._programs)

    def generate(
        self,
        prompts: Sequence[Prompt],
        *,
        max_new_tokens: Optional[int] = None,
        temperature: float = 0.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        num_return_sequences: int = 1,
        seed: int = 0,
        stop: Optional[Union[str, Sequence[str]]] = None,
        return_tokens: bool = False,
        chat: bool = False,
        batch_size: Optional[int] = None,
        eos_token_ids: Optional[Sequence[int]] = None,
        skip_special_tokens: bool = True,
        stop_check_every: int = 32,
        model: Optional[CausalLM] = None,
        kv_cache_bytes: Optional[int] = None,
    ) -> Union[list[str], GenerationResult]:
        """Generate completions for ``prompts`` (see :func:`generate` for the arguments).

        ``model`` replaces the sampler's model from now on (e.g. the trainer's latest weights);
        ``kv_cache_bytes`` overrides the sampler's KV budget for this call.
        """
        if model is not None:
            if not isinstance(model, CausalLM):
                raise TypeError(f"generate(): model must be a jaxsft CausalLM, got {type(model).__name__}.")
            self.model = model
        model, tokenizer = self.model, self.tokenizer
        if isinstance(prompts, (str, dict)) or (
            isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], dict)
        ):
            raise TypeError("generate(): prompts must be a list of prompts (wrap a single prompt or chat in a list).")
        prompts = list(prompts)
        if not prompts:
            return GenerationResult([], [], [], [], num_return_sequences) if return_tokens else []
        request = _request(
            model, tokenizer, max_new_tokens=1 if max_new_tokens is None else max_new_tokens, temperature=temperature,
            top_k=top_k, top_p=top_p, num_return_sequences=num_return_sequences, seed=seed, stop=stop,
            batch_size=batch_size, eos_token_ids=eos_token_ids, skip_special_tokens=skip_special_tokens,
            stop_check_every=stop_check_every,
        )
        spec, nrs = model.spec, request.nrs
        prompt_ids = prompt_token_ids(tokenizer, prompts, chat, spec.vocab_size)
        longest = max(len(p) for p in prompt_ids)
        if max_new_tokens is None:
            request = dataclasses.replace(request, max_new_tokens=default_max_new_tokens(model, longest))
        if spec.position == "learned" and longest + request.max_new_tokens > spec.max_position_embeddings:
            raise ValueError(
                f"generate(): prompt ({longest} tokens) + max_new_tokens ({request.max_new_tokens}) exceeds the "
                f"model's {spec.max_position_embeddings} positions; shorten the prompts or lower max_new_tokens."
            )
        call_budget = _check_budget(kv_cache_bytes, "generate()")
        budget = call_budget or self.kv_cache_bytes or default_kv_cache_bytes()
        self._check_memory(longest, request, budget)
        if spec.position == "rope" and longest + request.max_new_tokens > spec.max_position_embeddings:
            _warn_once(f"generate(): prompt ({longest} tokens) + max_new_tokens ({request.max_new_tokens}) runs past "
                       f"the {spec.max_position_embeddings} positions this model was trained on; quality may drop.")
        pad_id = _pad_id(tokenizer, spec, list(request.eos))
        sampling = Sampling(
            temperature=np.float32(request.temperature),
            top_p=np.float32(request.top_p),
            eos=np.asarray(list(request.eos) + [-1] * (MAX_EOS_IDS - len(request.eos)), np.int32),
            pad=np.int32(pad_id),
            max_new=np.int32(request.max_new_tokens),
            seed=np.uint32(request.seed % (1 << 32)),
        )
        graphdef, state = nnx.split(model)
        mesh = self.mesh
        if mesh is not None:
            state = shd.place_state(state, mesh, self.sharding_rules)
        else:
            single_process = jax.process_count() == 1
            mesh = shd.mesh_of(state, shd.make_mesh(devices=jax.devices()[:1]) if single_process else None)
        shape = self._shape(len(prompt_ids), longest, request, budget)
        with jax.set_mesh(mesh), shd.use_rules(self.sharding_rules):
            results = self._run_engine(graphdef, state, mesh, shape, prompt_ids, request, sampling)
        tokens_out = [row for row, _ in results]
        reasons = [reason for _, reason in results]
        return _finish(tokenizer, tokens_out, reasons, prompt_ids, request, return_tokens)

    # ------------------------------------------------------------------ engine
    def _check_memory(self, longest: int, request: "_Request", budget: int) -> None:
        """Refuse, before any work, a call whose single prompt group cannot fit the KV budget."""
        spec, nrs = self.model.spec, request.nrs
        need = engine.kv_bytes_per_group(spec, self.model.dtype, nrs, pow2_at_least(longest, MIN_PROMPT_BUCKET),
                                         pow2_at_least(request.max_new_tokens, MIN_NEW_TOKENS_BUCKET))
        if need > budget:
            raise ValueError(
                f"generate(): max_new_tokens={request.max_new_tokens} with num_return_sequences={nrs} and a "
                f"{longest}-token prompt needs {need / 2**30:.1f} GiB of KV cache for one prompt, over the "
                f"{budget / 2**30:.1f} GiB budget (Sampler(kv_cache_bytes=...)); lower max_new_tokens or "
                "num_return_sequences, or raise the budget."
            )

    def _shape(self, n_prompts: int, longest: int, request: "_Request", budget: int) -> engine.Shape:
        """Slot groups from the KV budget (and ``batch_size``), never more than the call needs (powers of two)."""
        spec, nrs = self.model.spec, request.nrs
        prompt_slots = pow2_at_least(longest, MIN_PROMPT_BUCKET)
        new_slots = pow2_at_least(request.max_new_tokens, MIN_NEW_TOKENS_BUCKET)
        per_group = engine.kv_bytes_per_group(spec, self.model.dtype, nrs, prompt_slots, new_slots)
        groups = max(1, budget // per_group)
        if request.batch_size is not None:
            groups = min(groups, max(1, request.batch_size // nrs))
        groups = min(engine.pow2_at_most(groups), pow2_at_least(n_prompts))
        return engine.Shape(groups=groups, n=nrs, prompt_slots=prompt_slots, new_slots=new_slots)

    def _program(self, key: tuple, build: Callable[[], Any]) -> Any:
        if key not in self._programs:
            self._programs[key] = build()
            _COMPILES[key[0]] += 1
        return self._programs[key]

    def _run_engine(self, graphdef, state, mesh, shape: engine.Shape, prompt_ids, request: "_Request",
                    sampling: Sampling) -> list[tuple[np.ndarray, str]]:
        spec, dtype, mode = self.model.spec, self.model.dtype, request.mode
        rules = self.sharding_rules
        rep = NamedSharding(mesh, P())
        layouts = engine.layouts(spec, mesh, shape, rules)
        scalars = Sampling(*(shd.place_array(np.asarray(v), rep) for v in sampling))
        sig = _params_signature(state)
        base = (graphdef, sig, mesh, shape, mode)

        def named(axes, shp):
            return NamedSharding(mesh, shd.activation_spec(axes, shp, mesh, rules))

        def place_inputs(ids, mask, slots, row_ids):
            return dict(input_ids=shd.place_array(ids, named(("batch", None), ids.shape)),
                        mask=shd.place_array(mask, named(("batch", None), mask.shape)),
                        slots=shd.place_array(slots, named(("batch",), slots.shape)),
                        row_ids=shd.place_array(row_ids, named(("batch",), row_ids.shape)))

        def place_scalar(v):
            return shd.place_array(np.asarray(np.int32(v)), rep)

        init = self._program(("init", graphdef, sig, mesh, shape), lambda: jax.jit(
            engine.make_init(spec, dtype, shape), out_shardings=layouts).lower().compile())

        def example():  # the engine state's abstract value, for compiling (traced only then)
            abstract = jax.eval_shape(engine.make_init(spec, dtype, shape))
            return jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), abstract, layouts)

        def prefill(gp):
            def build():
                inputs = place_inputs(np.zeros((gp, shape.prompt_slots), np.int32),
                                      np.zeros((gp, shape.prompt_slots), np.int32), np.zeros((gp,), np.int32),
                                      np.zeros((gp * shape.n,), np.int32))
                return jax.jit(engine.make_prefill(graphdef, dtype, shape, mode), donate_argnums=(1,),
                               out_shardings=layouts).lower(state, example(), inputs, scalars).compile()

            return self._program(("prefill",) + base + (gp,), build)

        decode = self._program(("decode",) + base, lambda: jax.jit(
            engine.make_decode(graphdef, dtype, shape, mode), donate_argnums=(1,), out_shardings=layouts,
        ).lower(state, example(), scalars, place_scalar(0), place_scalar(0)).compile())
        programs = engine.Programs(init=init, prefill=prefill, decode=decode)
        cap = engine.prefill_group_cap(spec, shape.prompt_slots, PREFILL_SCORE_BYTES)
        on_chunk, step_limit = None, None
        if request.stops:
            stops = list(request.stops)
            step_limit = max(1, request.stop_check_every)

            def on_chunk(host, running):
                decoded = self.tokenizer.batch_decode(
                    [host["tokens"][r, : int(host["gen_len"][r])].tolist() for r in running],
                    skip_special_tokens=request.skip_special_tokens)
                return [r for r, text in zip(running, decoded) if _first_stop(text, stops) is not None]

        return engine.run(
            programs, state, engine.Queue(prompt_ids), shape, int(sampling.pad), request.max_new_tokens, cap,
            place_inputs, place_scalar, lambda done: shd.place_array(done, layouts.done), scalars,
            step_limit=step_limit, on_chunk=on_chunk,
        )


def _check_budget(value: Any, where: str) -> Optional[int]:
    if value is None:
        return None
    if not _is_int(value) or value < 1:
        raise ValueError(f"{where}: kv_cache_bytes={value!r} must be a positive integer (bytes) or None (the default: "
                         "a quarter of the accelerator's memory).")
    return int(value)


def default_kv_cache_bytes() -> int:
    """A quarter of the first device's memory where it reports one (GPU, TPU), else 2 GiB."""
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # backends without memory stats
        stats = {}
    limit = stats.get("bytes_limit")
    return int(limit) // 4 if limit else CPU_KV_CACHE_BYTES


def _request(model, tokenizer, *, max_new_tokens, temperature, top_k, top_p, num_return_sequences, seed, stop,
             batch_size, eos_token_ids, skip_special_tokens, stop_check_every) -> _Request:
    """Validate one call's arguments (every check before any work)."""
    check_sampling_arguments(max_new_tokens, temperature, top_k, top_p, num_return_sequences, batch_size)
    if not _is_int(seed):
        raise ValueError(f"generate(): seed={seed!r} must be an integer.")
    if stop is not None and not isinstance(stop, (str, list, tuple)):
        raise ValueError(f"generate(): stop={stop!r} must be a non-empty string or a list of them.")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not isinstance(s, str) or not s for s in stops):
        raise ValueError(f"generate(): stop={stop!r} must be a non-empty string or a list of them.")
    if not _is_int(stop_check_every) or stop_check_every < 1:
        raise ValueError(f"generate(): stop_check_every={stop_check_every!r} must be an integer >= 1 (decode steps "
                         "between stop-string checks).")
    vocab = model.spec.vocab_size
    if eos_token_ids is not None:
        if isinstance(eos_token_ids, (str, bytes)) or not isinstance(eos_token_ids, (list, tuple, np.ndarray)):
            raise ValueError(f"generate(): eos_token_ids={eos_token_ids!r} must be a list of token ids ([] = never stop).")
        bad = [e for e in eos_token_ids if not _is_int(e) or not 0 <= int(e) < vocab]
        if bad:
            raise ValueError(f"generate(): eos_token_ids contains {bad!r}, not token ids of this model's vocabulary "
                             f"(0 .. {vocab - 1}).")
    eos = _eos_ids(model, tokenizer) if eos_token_ids is None else [int(e) for e in eos_token_ids]
    if len(eos) > MAX_EOS_IDS:
        raise ValueError(f"generate(): at most {MAX_EOS_IDS} EOS ids are supported, got {len(eos)}.")
    greedy = temperature == 0.0
    mode = Mode("greedy") if greedy else Mode("sample", None if top_k is None else int(top_k), top_p is not None and top_p < 1.0)
    return _Request(
        max_new_tokens=int(max_new_tokens), mode=mode, nrs=int(num_return_sequences), seed=int(seed),
        temperature=1.0 if greedy else float(temperature), top_p=1.0 if top_p is None else float(top_p),
        stops=tuple(stops), batch_size=batch_size, eos=tuple(eos), skip_special_tokens=skip_special_tokens,
        stop_check_every=stop_check_every,
    )


def _finish(tokenizer, tokens_out, reasons, prompt_ids, request: _Request, return_tokens: bool):
    """Decode the rows, cut them at stop strings, and shape the return value."""
    nrs, stops = request.nrs, list(request.stops)
    final_tokens, final_texts = [], []
    for r, toks in enumerate(tokens_out):
        body = toks[:-1] if reasons[r] == "eos" else toks
        text = tokenizer.decode(body.tolist(), skip_special_tokens=request.skip_special_tokens)
        if stops:
            cut = _first_stop(text, stops)
            if cut is not None:
                text = text[:cut]
                toks = _tokens_through_stop(tokenizer, toks, stops, request.skip_special_tokens)
                reasons[r] = "stop"
        final_tokens.append(toks)
        final_texts.append(text)
    if not return_tokens:
        return final_texts
    return GenerationResult(
        texts=final_texts,
        tokens=final_tokens,
        prompt_tokens=[np.asarray(prompt_ids[r // nrs]) for r in range(len(tokens_out))],
        finish_reasons=reasons,
        num_return_sequences=nrs,
    )


def generate(
    model: CausalLM,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    *,
    max_new_tokens: Optional[int] = None,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    num_return_sequences: int = 1,
    seed: int = 0,
    stop: Optional[Union[str, Sequence[str]]] = None,
    return_tokens: bool = False,
    chat: bool = False,
    batch_size: Optional[int] = None,
    eos_token_ids: Optional[Sequence[int]] = None,
    skip_special_tokens: bool = True,
    stop_check_every: int = 32,
    mesh: Optional[jax.sharding.Mesh] = None,
    sharding_rules: Optional[shd.ShardingRules] = None,
    kv_cache_bytes: Optional[int] = None,
) -> Union[list[str], GenerationResult]:
    """Generate completions for ``prompts`` with a jaxsft model.

    ``prompts`` are strings (tokenized with the tokenizer's special tokens, as
    ``tokenizer(prompts)`` does), chat message lists (formatted with the chat
    template and a generation prompt; ``chat=True`` treats strings as one user
    message) or token ids (lists / 1-D arrays of ints, used as given). Without
    ``max_new_tokens`` the budget is HF's: the model's generation config
    (:func:`default_max_new_tokens`). ``temperature=0`` is greedy; otherwise sampling with optional
    ``top_k`` / ``top_p``. ``eos_token_ids`` overrides the EOS set (``[]`` never
    stops early). ``batch_size`` caps the rows (prompts x samples) run at once;
    ``kv_cache_bytes`` the KV memory the engine's slots hold (default: a quarter of
    the accelerator's memory), which sets how many rows decode together.
    ``mesh`` defaults to the mesh the model's params live on; another mesh moves
    them there first (per ``sharding_rules``, default the rules table).

    Returns the generated texts, prompt-major (``len(prompts) *
    num_return_sequences``), or a :class:`GenerationResult` with ``return_tokens``.

    The programs belong to a :class:`Sampler` kept for this model object (and dropped
    with it), so repeated calls on one model compile once; a loop that gets a new model
    object each time (``trainer.model``) should keep a ``Sampler`` or use ``trainer.generate``.
    A ``Seq2SeqLM`` (T5, BART) goes to :func:`jaxsft.generation.seq2seq.generate`.
    """
    from jaxsft.models.seq2seq import Seq2SeqLM

    if isinstance(model, Seq2SeqLM):  # T5 / BART: encoder once, then the decoder loop
        from jaxsft.generation import seq2seq as seq2seq_generation

        if sharding_rules is not None or kv_cache_bytes is not None:
            raise ValueError("generate(): sharding_rules and kv_cache_bytes are not supported for encoder-decoder "
                             "models yet.")
        return seq2seq_generation.generate(
            model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
            top_p=top_p, num_return_sequences=num_return_sequences, seed=seed, stop=stop, return_tokens=return_tokens,
            chat=chat, batch_size=batch_size, eos_token_ids=eos_token_ids, skip_special_tokens=skip_special_tokens,
            mesh=mesh,
        )
    if not isinstance(model, CausalLM):
        raise TypeError(f"generate(): model must be a jaxsft CausalLM or Seq2SeqLM, got {type(model).__name__}.")
    samplers = _SAMPLERS.setdefault(model, {})
    key = (mesh, sharding_rules)
    sampler = samplers.get(key)
    if sampler is None:
        sampler = samplers[key] = Sampler(model, tokenizer, mesh=mesh, sharding_rules=sharding_rules)
    sampler.tokenizer = tokenizer
    return sampler.generate(
        prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        num_return_sequences=num_return_sequences, seed=seed, stop=stop, return_tokens=return_tokens, chat=chat,
        batch_size=batch_size, eos_token_ids=eos_token_ids, skip_special_tokens=skip_special_tokens,
        stop_check_every=stop_check_every, kv_cache_bytes=kv_cache_bytes,
    )


# ---------------------------------------------------------------------------- host helpers
def default_max_new_tokens(model: CausalLM, prompt_length: int) -> int:
    """HF's budget when ``max_new_tokens`` is not given: the model's generation config ``max_new_tokens``,
    else its ``max_length`` less the (longest) prompt, else HF's default of 20 new tokens."""
    from transformers import GenerationConfig

    config = model.config
    gen = GenerationConfig.from_model_config(config) if config is not None else GenerationConfig()
    if gen.max_new_tokens is not None:
        return int(gen.max_new_tokens)
    if gen.max_length is None:
        return 20
    room = int(gen.max_length) - prompt_length
    if room < 1:
        raise ValueError(
            f"generate(): max_new_tokens was not given and the model's generation config (max_length="
            f"{gen.max_length}) leaves no room after the {prompt_length}-token prompt; pass max_new_tokens."
        )
    return room


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, stacklevel=3)


def _token_prompt(prompt: Any) -> Optional[list[int]]:
    """A prompt given as token ids (a list/tuple/1-D array of ints), else None."""
    if isinstance(prompt, np.ndarray) and prompt.ndim == 1 and np.issubdtype(prompt.dtype, np.integer):
        return [int(t) for t in prompt]
    if isinstance(prompt, (list, tuple)) and prompt and all(_is_int(t) for t in prompt):
        return [int(t) for t in prompt]
    return None


def prompt_token_ids(tokenizer: Any, prompts: Sequence[Any], chat: bool, vocab_size: int) -> list[list[int]]:
    """Every prompt as token ids: token-id prompts as given, strings and chats through the tokenizer."""
    out: list[Optional[list[int]]] = [None] * len(prompts)
    rest = []
    for i, prompt in enumerate(prompts):
        ids = _token_prompt(prompt)
        if ids is not None:
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                raise ValueError(f"generate(): prompts[{i}] holds token ids {bad[:5]!r} outside this model's vocabulary "
                                 f"(0 .. {vocab_size - 1}).")
            out[i] = ids
        elif isinstance(prompt, str) or (isinstance(prompt, (list, tuple)) and prompt
                                         and all(isinstance(m, dict) for m in prompt)):
            rest.append(i)
        else:
            raise TypeError(f"generate(): prompts[{i}]={prompt!r} must be a string, a chat (a list of "
                            "{'role': ..., 'content': ...} messages) or a non-empty list of token ids.")
    if rest:
        texts = format_prompts(tokenizer, [prompts[i] for i in rest], chat)
        is_chat = [chat or not isinstance(prompts[i], str) for i in rest]
        for i, ids in zip(rest, _tokenize(tokenizer, texts, is_chat)):
            out[i] = ids
    return out  # type: ignore[return-value]


def _tokenize(tokenizer: Any, texts: list[str], is_chat: list[bool]) -> list[list[int]]:
    out: list[Optional[list[int]]] = [None] * len(texts)
    for flag in (False, True):  # chat templates already hold their special tokens
        idx = [i for i, c in enumerate(is_chat) if c == flag]
        if not idx:
            continue
        ids = tokenizer([texts[i] for i in idx], add_special_tokens=not flag)["input_ids"]
        for i, row in zip(idx, ids):
            if len(row) == 0:
                raise ValueError(f"generate(): prompt {i} tokenizes to no tokens; give it some text.")
            out[i] = list(row)
    return out  # type: ignore[return-value]


def _eos_ids(model: CausalLM, tokenizer: Any) -> list[int]:
    ids: list[int] = []

    def add(value):
        if value is None:
            return
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None and int(v) not in ids:
                ids.append(int(v))

    add(getattr(tokenizer, "eos_token_id", None))
    add(model.spec.eos_token_id)
    return ids


def _pad_id(tokenizer: Any, spec, eos: list[int]) -> int:
    for value in (getattr(tokenizer, "pad_token_id", None), spec.pad_token_id, eos[0] if eos else None):
        if value is not None:
            return int(value)
    return 0


def _first_stop(text: str, stops: list[str]) -> Optional[int]:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _tokens_through_stop(tokenizer, toks: np.ndarray, stops, skip_special_tokens) -> np.ndarray:
    """The shortest prefix of ``toks`` whose decoding already contains a stop string (binary search)."""
    lo, hi = 1, len(toks)
    while lo < hi:
        mid = (lo + hi) // 2
        if _first_stop(tokenizer.decode(toks[:mid].tolist(), skip_special_tokens=skip_special_tokens), stops) is None:
            lo = mid + 1
        else:
            hi = mid
    return toks[:lo]


def _params_signature(state) -> tuple:
    return tuple((x.shape, str(x.dtype), x.sharding) for x in jax.tree.leaves(state))


generate.compiled_programs = compiled_programs  # type: ignore[attr-defined]
generate.clear_cache = clear_cache  # type: ignore[attr-defined]
