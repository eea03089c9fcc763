"""The public generation API: :func:`generate`, :class:`Sampler`, :class:`GenerationResult`.

Host side only: turn a call's keywords into one :class:`SamplingParams` (checked before any
work), tokenize, hand the prompts to the engine (:mod:`jaxsft.generation.engine`: fixed row
slots refilled from a queue, a cache holding each prompt once for its samples) through the
model kind's adapter (decoder-only or encoder-decoder), and shape its rows into texts or a result.

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
from typing import Any, Callable, Optional, Sequence, Union

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxsft.infra import compile_options, sharding as shd
from jaxsft.infra.side_by_side import compile_side_by_side, lowered_here
from jaxsft.generation import engine
from jaxsft.generation.causal import CausalAdapter
from jaxsft.generation.engine import MIN_NEW_TOKENS_BUCKET, MIN_PROMPT_BUCKET, DecodeState, pow2_at_least
from jaxsft.generation.params import MAX_EOS_IDS, SamplingParams, is_int
from jaxsft.generation.prompts import Prompt, eos_ids, first_stop, format_prompts, is_chat, pad_id
from jaxsft.generation.prompts import prompt_token_ids, tokens_through_stop
from jaxsft.generation.sampling import Mode, Sampling
from jaxsft.generation.seq2seq import Seq2SeqAdapter
from jaxsft.models.decoder import CausalLM
from jaxsft.models.seq2seq import Seq2SeqLM

__all__ = [
    "generate", "Sampler", "SamplingParams", "DecodeState", "Sampling", "Mode", "GenerationResult",
    "compiled_programs", "clear_cache", "format_prompts", "pow2_at_least",
]

CPU_KV_CACHE_BYTES = 2 << 30  # the default KV budget where the device reports no memory size
PREFILL_SCORE_BYTES = 2 << 30  # a prefill call's attention scores stay under this
# The fewest rows a call's shape holds (budget and batch_size permitting). A decode step of a few rows reads
# every weight anyway, so 8 rows cost about what 1 does on an accelerator; small calls then share shapes.
MIN_ROWS = 8

# Process-wide compile counter (telemetry, not a cache): every Sampler adds to it.
_COMPILES = {"init": 0, "prefill": 0, "decode": 0}
# The Sampler that :func:`generate` keeps per model object (and mesh/rules); an entry dies with its model.
_SAMPLERS: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def compiled_programs() -> int:
    """How many generation programs have been compiled in this process (init, prefill, decode), by any Sampler."""
    return sum(_COMPILES.values())


def clear_cache() -> None:
    """Forget the samplers :func:`generate` keeps per model (the compile counter keeps counting)."""
    _SAMPLERS.clear()


@dataclasses.dataclass
class GenerationResult:
    """What :func:`generate` returns with ``return_tokens=True``.

    Rows are prompt-major: row ``i * num_return_sequences + j`` is sample ``j`` of
    prompt ``i``. ``tokens[r]`` holds the generated ids (an EOS that ended the row
    included, as HF does; for a stop string, up to the token that completed it);
    ``texts[r]`` is their decoding without special tokens, cut before the first
    stop string.
    """

    texts: list[str]
    tokens: list[np.ndarray]
    prompt_tokens: list[np.ndarray]
    finish_reasons: list[str]  # "eos" | "stop" | "length"
    num_return_sequences: int = 1

    @property
    def num_generated_tokens(self) -> int:
        return int(sum(len(t) for t in self.tokens))

    def grouped(self) -> list[list[str]]:
        """Texts as one list of ``num_return_sequences`` samples per prompt."""
        n = self.num_return_sequences
        return [self.texts[i : i + n] for i in range(0, len(self.texts), n)]


def adapter_for(model: Any) -> engine.DecodeModel:
    """The engine's adapter for a jaxsft model: the one place generation tells the model kinds apart."""
    if isinstance(model, CausalLM):
        return CausalAdapter(model.spec, model.dtype)
    if isinstance(model, Seq2SeqLM):
        return Seq2SeqAdapter(model.spec, model.dtype)
    raise TypeError(f"generate(): model must be a jaxsft CausalLM or Seq2SeqLM, got {type(model).__name__}.")


class Sampler:
    """Batched generation from a jaxsft model (decoder-only or encoder-decoder); owns its engine's programs.

    Build one per model (the trainer keeps one for ``trainer.generate``) and call
    :meth:`generate` as often as you like: calls of similar size share programs (see the
    module doc), and ``model=`` hands in newer weights of the same model without recompiling.
    ``mesh`` defaults to the mesh the model's params live on; another mesh moves them there
    first, and ``sharding_rules`` (default ``jaxsft.infra.sharding.DEFAULT_RULES``) lay out the
    params, the KV cache and the rows.
    """

    def __init__(
        self,
        model: Union[CausalLM, Seq2SeqLM],
        tokenizer: Any,
        *,
        mesh: Optional[jax.sharding.Mesh] = None,
        sharding_rules: Optional[shd.ShardingRules] = None,
        kv_cache_bytes: Optional[int] = None,
        xla_options: Optional[dict[str, Any]] = None,
    ):
        adapter_for(model)  # refuses other model types
        if sharding_rules is not None and not isinstance(sharding_rules, shd.ShardingRules):
            raise TypeError(f"sharding_rules must be a jaxsft.infra.sharding.ShardingRules, got {type(sharding_rules).__name__}.")
        self.model = model
        self.tokenizer = tokenizer
        self.mesh = mesh
        self.sharding_rules = sharding_rules or shd.DEFAULT_RULES
        # The KV memory the engine's slots may hold (None: default_kv_cache_bytes()); the slot count follows.
        self.kv_cache_bytes = _check_budget(kv_cache_bytes, "Sampler()")
        # The XLA options the engine's programs compile with: None takes the backend's measured defaults for
        # this model's width (jaxsft.infra.compile_options: on GPU, models >= 768 wide give every matmul to
        # cuBLAS, which decodes faster there too: benchmarks/RESULTS.md), {} XLA's own; the trainer passes its own.
        self.xla_options = compile_options.resolve(xla_options, hidden_size=model.spec.hidden_size)
        if xla_options:
            compile_options.check(self.xla_options, "Sampler(xla_options=...)")
        self._programs: dict[tuple, Any] = {}

    @property
    def compiled_programs(self) -> int:
        """How many programs this sampler has compiled (init, prefill, decode)."""
        return len(self._programs)

    def generate(
        self,
        prompts: Sequence[Prompt],
        *,
        sampling: Optional[SamplingParams] = None,
        return_tokens: bool = False,
        chat: bool = False,
        batch_size: Optional[int] = None,
        model: Optional[Union[CausalLM, Seq2SeqLM]] = None,
        kv_cache_bytes: Optional[int] = None,
        **options: Any,
    ) -> Union[list[str], GenerationResult]:
        """Generate completions for ``prompts`` (see :func:`generate` for the arguments).

        ``model`` replaces the sampler's model from now on (e.g. the trainer's latest weights);
        ``kv_cache_bytes`` overrides the sampler's KV budget for this call.
        """
        params = SamplingParams.of(sampling, options)
        if batch_size is not None and (not is_int(batch_size) or batch_size < 1):
            raise ValueError(f"generate(): batch_size={batch_size!r} must be None or an integer >= 1.")
        call_budget = _check_budget(kv_cache_bytes, "generate()")
        if model is not None:
            if type(adapter_for(model)) is not type(adapter_for(self.model)):
                raise TypeError(f"generate(): model={type(model).__name__} is another kind of model than this "
                                f"Sampler's {type(self.model).__name__}; build a Sampler for it.")
            self.model = model
        model, tokenizer = self.model, self.tokenizer
        if tokenizer is None:  # it decodes every completion (and tokenizes string prompts): fail before any work
            raise ValueError("generate(): tokenizer is None; pass the model's tokenizer (it decodes the completions "
                             "and tokenizes string prompts, also when the prompts are token ids).")
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, (list, tuple)) and prompts and
                                                isinstance(prompts[0], dict)):
            raise TypeError("generate(): prompts must be a list of prompts (wrap a single prompt or chat in a list).")
        prompts = list(prompts)
        nrs = params.num_return_sequences
        if not prompts:
            return GenerationResult([], [], [], [], nrs) if return_tokens else []
        adapter = adapter_for(model)
        if not adapter.accepts_chat and (chat or any(is_chat(p) for p in prompts)):
            raise ValueError(f"generate(): chat prompts are not supported by an encoder-decoder model "
                             f"({type(model).__name__}); pass strings or token ids.")
        call = self._resolve(params, prompts, chat, adapter)
        prompt_ids = call.prompt_ids
        budget = call_budget or self.kv_cache_bytes or default_kv_cache_bytes()
        longest = max(len(p) for p in prompt_ids)
        warning = adapter.check_lengths(prompt_ids, call.max_new_tokens)
        self._check_memory(adapter, longest, nrs, call.max_new_tokens, budget)
        if warning:
            _warn_once(warning)
        pad = pad_id(tokenizer, model.spec, list(call.eos))
        scalars = Sampling(
            temperature=np.float32(1.0 if params.greedy else params.temperature),
            top_p=np.float32(1.0 if params.top_p is None else params.top_p),
            eos=np.asarray(list(call.eos) + [-1] * (MAX_EOS_IDS - len(call.eos)), np.int32),
            pad=np.int32(pad),
            max_new=np.int32(call.max_new_tokens),
            seed=np.uint32(call.seed % (1 << 32)),
        )
        graphdef, state = nnx.split(model)
        mesh = self.mesh
        if mesh is not None:
            state = shd.place_state(state, mesh, self.sharding_rules)
        else:
            single_process = jax.process_count() == 1
            mesh = shd.mesh_of(state, shd.make_mesh(devices=jax.devices()[:1]) if single_process else None)
        shape = _shape(adapter, len(prompt_ids), longest, nrs, call.max_new_tokens, batch_size, budget)
        with jax.set_mesh(mesh), shd.use_rules(self.sharding_rules):
            results = self._run_engine(adapter, graphdef, state, mesh, shape, prompt_ids, params, call, scalars)
        return _finish(tokenizer, results, prompt_ids, params, return_tokens)

    # ------------------------------------------------------------------ host side
    def _resolve(self, params: SamplingParams, prompts, chat: bool, adapter) -> "_Resolved":
        """The call's facts that need the model and tokenizer: EOS ids, token ids, the token budget."""
        model, tokenizer = self.model, self.tokenizer
        vocab = model.spec.vocab_size
        if params.eos_token_ids is not None:
            bad = [e for e in params.eos_token_ids if not 0 <= e < vocab]
            if bad:
                raise ValueError(f"generate(): eos_token_ids contains {bad!r}, not token ids of this model's vocabulary "
                                 f"(0 .. {vocab - 1}).")
            eos = list(params.eos_token_ids)
        else:
            eos = eos_ids(model.spec, tokenizer)
            if len(eos) > MAX_EOS_IDS:
                raise ValueError(f"generate(): the tokenizer and model name {len(eos)} EOS ids; at most {MAX_EOS_IDS} "
                                 "are supported (pass eos_token_ids=).")
        prompt_ids = prompt_token_ids(tokenizer, prompts, chat, vocab)
        longest = max(len(p) for p in prompt_ids)
        max_new = params.max_new_tokens
        if max_new is None:
            max_new = default_max_new_tokens(model, adapter.tokens_before_new(longest))
        seed = 0 if params.seed is None else params.seed
        return _Resolved(max_new, tuple(eos), seed, prompt_ids)

    def _check_memory(self, adapter, longest: int, nrs: int, max_new: int, budget: int) -> None:
        """Refuse, before any work, a call whose single prompt group cannot fit the KV budget."""
        need = adapter.kv_bytes_per_group(nrs, pow2_at_least(longest, MIN_PROMPT_BUCKET),
                                          pow2_at_least(max_new, MIN_NEW_TOKENS_BUCKET))
        if need > budget:
            raise ValueError(
                f"generate(): max_new_tokens={max_new} with num_return_sequences={nrs} and a "
                f"{longest}-token prompt needs {_size(need)} of KV cache for one prompt, over the "
                f"{_size(budget)} budget (Sampler(kv_cache_bytes=...)); lower max_new_tokens or "
                "num_return_sequences, or raise the budget."
            )

    def _program(self, key: tuple, build: Callable[[], Any]) -> Any:
        if key not in self._programs:
            self._programs[key] = build()
            _COMPILES[key[0]] += 1
        return self._programs[key]

    def _compile_missing(self, lowerings: dict[tuple, Callable[[], Any]], compile_one: Callable[[Any], Any]) -> None:
        """The programs of ``lowerings`` this sampler lacks, compiled side by side (jaxsft.infra.side_by_side)."""
        missing = {key: lower for key, lower in lowerings.items() if key not in self._programs}
        for key, program in compile_side_by_side(missing, compile_one).items():
            self._programs[key] = program
            _COMPILES[key[0]] += 1

    def _run_engine(self, adapter, graphdef, state, mesh, shape: engine.Shape, prompt_ids, params: SamplingParams,
                    call: "_Resolved", sampling: Sampling) -> list[tuple[np.ndarray, str]]:
        mode, rules = params.mode(), self.sharding_rules
        rep = NamedSharding(mesh, P())
        layouts = engine.layouts(adapter, mesh, shape, rules)
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

        options = self.xla_options or None

        def compiled(lowered):
            return lowered.compile(compiler_options=options)

        def example():  # the engine state's abstract value, for compiling (traced only then)
            abstract = jax.eval_shape(engine.make_init(adapter, shape))
            return jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), abstract, layouts)

        def lower_init():
            return jax.jit(engine.make_init(adapter, shape), out_shardings=layouts).lower()

        def lower_prefill(gp: int):
            inputs = place_inputs(np.zeros((gp, shape.prompt_slots), np.int32), np.zeros((gp, shape.prompt_slots), np.int32),
                                  np.zeros((gp,), np.int32), np.zeros((gp * shape.n,), np.int32))
            return jax.jit(engine.make_prefill(adapter, graphdef, shape, mode), donate_argnums=(1,),
                           out_shardings=layouts).lower(state, example(), inputs, scalars)

        def lower_decode():
            return jax.jit(engine.make_decode(adapter, graphdef, shape, mode), donate_argnums=(1,),
                           out_shardings=layouts).lower(state, example(), scalars, place_scalar(0), place_scalar(0))

        def prefill_key(gp: int) -> tuple:
            return ("prefill",) + base + (gp,)

        # What every call runs first (init, the first fill's prefill, decode) compiles side by side; a later fill's
        # other prompt count compiles when first met.
        cap = adapter.prefill_group_cap(shape.prompt_slots, PREFILL_SCORE_BYTES)
        first_gp = engine.first_fill_size(shape, cap)
        init_key, decode_key = ("init", graphdef, sig, mesh, shape), ("decode",) + base
        self._compile_missing({init_key: lower_init, prefill_key(first_gp): lambda: lower_prefill(first_gp),
                               decode_key: lower_decode}, compiled)

        def prefill(gp: int):
            return self._program(prefill_key(gp), lambda: compiled(lowered_here(lambda: lower_prefill(gp))))

        programs = engine.Programs(init=self._programs[init_key], prefill=prefill, decode=self._programs[decode_key])
        on_chunk, step_limit = None, None
        if params.stop:
            stops = params.stop
            step_limit = params.stop_check_every

            def on_chunk(host, running):
                decoded = self.tokenizer.batch_decode(
                    [host["tokens"][r, : int(host["gen_len"][r])].tolist() for r in running],
                    skip_special_tokens=params.skip_special_tokens)
                return [r for r, text in zip(running, decoded) if first_stop(text, stops) is not None]

        return engine.run(
            programs, state, engine.Queue(prompt_ids), shape, int(sampling.pad), call.max_new_tokens, cap,
            place_inputs, place_scalar, lambda done: shd.place_array(done, layouts.done), scalars,
            left_pad=adapter.prompt_padding == "left", step_limit=step_limit, on_chunk=on_chunk,
        )


@dataclasses.dataclass(frozen=True)
class _Resolved:
    """One call's facts resolved against the model and tokenizer."""

    max_new_tokens: int
    eos: tuple[int, ...]
    seed: int
    prompt_ids: list


def _shape(adapter, n_prompts: int, longest: int, nrs: int, max_new: int, batch_size: Optional[int],
           budget: int) -> engine.Shape:
    """Slot groups from the KV budget (and ``batch_size``), no more than the call needs (powers of two), but
    at least ``MIN_ROWS`` rows: small calls then share one shape instead of one each for 1, 2, 4 prompts."""
    prompt_slots = pow2_at_least(longest, MIN_PROMPT_BUCKET)
    new_slots = pow2_at_least(max_new, MIN_NEW_TOKENS_BUCKET)
    groups = max(1, budget // adapter.kv_bytes_per_group(nrs, prompt_slots, new_slots))
    if batch_size is not None:
        groups = min(groups, max(1, batch_size // nrs))
    wanted = max(pow2_at_least(n_prompts), engine.pow2_at_most(max(1, MIN_ROWS // nrs)))
    groups = min(engine.pow2_at_most(groups), wanted)
    return engine.Shape(groups=groups, n=nrs, prompt_slots=prompt_slots, new_slots=new_slots)


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB" if n >= 2**18 else f"{n:,} bytes"


def _check_budget(value: Any, where: str) -> Optional[int]:
    if value is None:
        return None
    if not is_int(value) or value < 1:
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


def _finish(tokenizer, results, prompt_ids, params: SamplingParams, return_tokens: bool):
    """Decode the rows, cut them at stop strings, and shape the return value."""
    nrs, stops = params.num_return_sequences, params.stop
    final_tokens, final_texts, reasons = [], [], []
    for toks, reason in results:
        body = toks[:-1] if reason == "eos" else toks
        text = tokenizer.decode(body.tolist(), skip_special_tokens=params.skip_special_tokens)
        if stops:
            cut = first_stop(text, stops)
            if cut is not None:
                text = text[:cut]
                toks = tokens_through_stop(tokenizer, toks, stops, params.skip_special_tokens)
                reason = "stop"
        final_tokens.append(toks)
        final_texts.append(text)
        reasons.append(reason)
    if not return_tokens:
        return final_texts
    return GenerationResult(
        texts=final_texts,
        tokens=final_tokens,
        prompt_tokens=[np.asarray(prompt_ids[r // nrs]) for r in range(len(final_tokens))],
        finish_reasons=reasons,
        num_return_sequences=nrs,
    )


def generate(
    model: Union[CausalLM, Seq2SeqLM],
    tokenizer: Any,
    prompts: Sequence[Prompt],
    *,
    sampling: Optional[SamplingParams] = None,
    return_tokens: bool = False,
    chat: bool = False,
    batch_size: Optional[int] = None,
    mesh: Optional[jax.sharding.Mesh] = None,
    sharding_rules: Optional[shd.ShardingRules] = None,
    kv_cache_bytes: Optional[int] = None,
    xla_options: Optional[dict[str, Any]] = None,
    **options: Any,
) -> Union[list[str], GenerationResult]:
    """Generate completions for ``prompts`` with a jaxsft model (decoder-only or T5 / BART).

    What to sample is a :class:`SamplingParams`: pass ``sampling=SamplingParams(...)`` or its
    fields as keywords (``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``,
    ``num_return_sequences``, ``seed``, ``stop``, ``eos_token_ids``, ``skip_special_tokens``,
    ``stop_check_every``; both only where they agree). Without ``max_new_tokens`` the budget is
    HF's: the model's generation config (:func:`default_max_new_tokens`).

    ``prompts`` are strings (tokenized with the tokenizer's special tokens, as
    ``tokenizer(prompts)`` does), chat message lists (formatted with the chat template and a
    generation prompt; ``chat=True`` treats strings as one user message; decoder-only models)
    or token ids (lists / 1-D arrays of ints, used as given). ``batch_size`` caps the rows
    (prompts x samples) run at once; ``kv_cache_bytes`` the KV memory the engine's slots hold
    (default: a quarter of the accelerator's memory), which sets how many rows decode together.
    ``mesh`` defaults to the mesh the model's params live on; another mesh moves them there
    first (per ``sharding_rules``, default the rules table). ``xla_options``: what the programs compile with
    (:class:`Sampler`'s argument; None: the backend's measured defaults).

    Returns the generated texts, prompt-major (``len(prompts) * num_return_sequences``), or a
    :class:`GenerationResult` with ``return_tokens``. An encoder-decoder's tokens start after
    its decoder start token, which is not returned.

    The programs belong to a :class:`Sampler` kept for this model object (and dropped
    with it), so repeated calls on one model compile once; a loop that gets a new model
    object each time (``trainer.model``) should keep a ``Sampler`` or use ``trainer.generate``.
    """
    adapter_for(model)
    samplers = _SAMPLERS.setdefault(model, {})
    key = (mesh, sharding_rules, None if xla_options is None else tuple(sorted(xla_options.items())))
    sampler = samplers.get(key)
    if sampler is None:
        sampler = samplers[key] = Sampler(model, tokenizer, mesh=mesh, sharding_rules=sharding_rules,
                                          xla_options=xla_options)
    sampler.tokenizer = tokenizer
    return sampler.generate(prompts, sampling=sampling, return_tokens=return_tokens, chat=chat, batch_size=batch_size,
                            kv_cache_bytes=kv_cache_bytes, **options)


# ---------------------------------------------------------------------------- host helpers
def default_max_new_tokens(model: Any, prompt_length: int) -> int:
    """HF's budget when ``max_new_tokens`` is not given: the model's generation config ``max_new_tokens``,
    else its ``max_length`` less ``prompt_length`` (what HF counts in it: a decoder's prompt, an
    encoder-decoder's start token), else HF's default of 20 new tokens."""
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


def _params_signature(state) -> tuple:
    return tuple((x.shape, str(x.dtype), x.sharding) for x in jax.tree.leaves(state))


generate.compiled_programs = compiled_programs  # type: ignore[attr-defined]
generate.clear_cache = clear_cache  # type: ignore[attr-defined]
