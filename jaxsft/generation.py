"""Fast batched generation: one prefill program and one decode-loop program over a KV cache.

Design
------
* **Buckets.** Prompts are left-padded to a power-of-two length (>= 16), the
  number of prompts in a chunk is rounded up to a power of two, and the cache is
  sized for ``max_new_tokens`` rounded up to a power of two (>= 16). The true
  ``max_new_tokens`` is a run-time value of the loop, so calls of similar size
  (e.g. 5 or 7 prompts of 20 or 30 tokens, 20 or 30 new tokens) share programs.
* **Programs.** A :class:`Sampler` owns its compiled programs; each bucket gets
  exactly two ahead-of-time compiled programs:
  ``prefill`` (runs the prompts, writes the cache, samples the first token,
  repeats rows for ``num_return_sequences``) and ``decode`` (a
  ``lax.while_loop`` that runs one token per iteration and exits early once every
  row has finished). The cache key also holds the sampling *mode* (greedy or
  sampling, ``top_k`` value, top-p on/off); temperature, top-p value, seed, EOS
  ids and the token budget are run-time values (:class:`Sampling`); the loop carries
  a typed :class:`DecodeState`. :func:`compiled_programs` counts compilations
  process-wide so tests can assert that nothing recompiles. :func:`generate` keeps
  one Sampler per model object; ``trainer.generate`` uses the trainer's own.
* **Sampling** happens in-jit, per row, from ``fold_in(fold_in(key(seed), row),
  step)``, where ``row`` is the output row's global index, so a row's sample does
  not depend on the batch bucket or on ``batch_size``. Order as in HF:
  temperature -> top-k -> top-p. Temperature 0 is greedy (argmax).
* **Stopping.** A row finishes at any EOS id (the tokenizer's eos plus the model
  config's eos ids, which may be a list). Stop strings are checked on the host:
  with ``stop`` given, the decode program runs in chunks of ``stop_check_every``
  tokens; between chunks the host decodes the still-running rows and marks those
  that contain a stop string as finished (so the loop may exit early); at the end
  every text is cut before the first stop string. Without ``stop`` the whole
  generation is one device call and one host transfer.
* **Sharding.** Everything runs under the model's mesh and the sharding rules'
  activation table: rows ("batch") split over the data axes when their bucket
  divides them, else replicated; the cache [layers, batch, slots, kv_heads,
  head_dim] follows (KV heads on the tensor axis when it divides them). The cache
  uses the model's compute dtype.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxsft import chat as chat_format
from jaxsft import sharding as shd
from jaxsft.models.decoder import CausalLM, KVCache

__all__ = [
    "generate", "Sampler", "DecodeState", "Sampling", "Mode", "GenerationResult", "compiled_programs", "clear_cache",
    "format_prompts",
]

MIN_PROMPT_BUCKET = 16
MIN_NEW_TOKENS_BUCKET = 16
MAX_EOS_IDS = 8  # EOS ids are a padded run-time array of this size (no recompile per tokenizer)
DEFAULT_CACHE_BYTES = 4 << 30  # default batch_size keeps one chunk's KV cache under this

Prompt = Union[str, Sequence[dict]]

# Process-wide compile counter (telemetry, not a cache): every Sampler adds to it.
_COMPILES = {"prefill": 0, "decode": 0}
# The Sampler that :func:`generate` keeps per model object (and mesh/rules); an entry dies with its model.
_SAMPLERS: "weakref.WeakKeyDictionary[CausalLM, dict]" = weakref.WeakKeyDictionary()


def compiled_programs() -> int:
    """How many generation programs have been compiled in this process (prefill + decode), by any Sampler."""
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


class Mode(NamedTuple):
    """The compile-time part of a sampling request: programs are cached by it."""

    kind: str  # "greedy" | "sample"
    top_k: Optional[int] = None
    top_p: bool = False  # top-p filtering on (its value is a run-time scalar)


class Sampling(NamedTuple):
    """The run-time scalars of a request (device arrays, so new values never recompile)."""

    temperature: Any
    top_p: Any
    eos: Any  # [MAX_EOS_IDS] int32, -1 padded
    pad: Any
    max_new: Any
    seed: Any


class DecodeState(NamedTuple):
    """Everything the decode loop carries, per chunk of rows (a pytree; donated between calls)."""

    cache: KVCache  # [layers, rows, slots, kv_heads, head_dim]
    kv_mask: Any  # [rows, slots] bool: slots holding real tokens
    tokens: Any  # [rows, new_bucket] int32: generated so far (pad after the end)
    last: Any  # [rows] int32: the token the next step feeds in
    prompt_len: Any  # [rows] int32: real prompt tokens (positions continue from here)
    keys: Any  # [rows] PRNG keys, one per output row
    done: Any  # [rows] bool
    finished_by_eos: Any  # [rows] bool
    step: Any  # int32 scalar: tokens sampled so far


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
    """Batched generation from a jaxsft model; owns its compiled prefill and decode programs.

    Build one per model (the trainer keeps one for ``trainer.generate``) and call
    :meth:`generate` as often as you like: calls of similar size share programs (see the
    module doc), and ``model=`` hands in newer weights of the same model without recompiling.
    ``mesh`` defaults to the mesh the model's params live on; another mesh moves them there
    first, and ``sharding_rules`` (default ``jaxsft.sharding.DEFAULT_RULES``) lay out the
    params, the KV cache and the rows.
    """

    def __init__(
        self,
        model: CausalLM,
        tokenizer: Any,
        *,
        mesh: Optional[jax.sharding.Mesh] = None,
        sharding_rules: Optional[shd.ShardingRules] = None,
    ):
        if not isinstance(model, CausalLM):
            raise TypeError(f"generate(): model must be a jaxsft CausalLM, got {type(model).__name__}.")
        if sharding_rules is not None and not isinstance(sharding_rules, shd.ShardingRules):
            raise TypeError(f"sharding_rules must be a jaxsft.sharding.ShardingRules, got {type(sharding_rules).__name__}.")
        self.model = model
        self.tokenizer = tokenizer
        self.mesh = mesh
        self.sharding_rules = sharding_rules or shd.DEFAULT_RULES
        self._programs: dict[tuple, Any] = {}

    @property
    def compiled_programs(self) -> int:
        """How many programs this sampler has compiled (prefill + decode)."""
        return len(self._programs)

    def generate(
        self,
        prompts: Sequence[Prompt],
        *,
        max_new_tokens: int,
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
    ) -> Union[list[str], GenerationResult]:
        """Generate completions for ``prompts`` (see :func:`generate` for the arguments).

        ``model`` replaces the sampler's model from now on (e.g. the trainer's latest weights).
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
            model, tokenizer, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            num_return_sequences=num_return_sequences, seed=seed, stop=stop, batch_size=batch_size,
            eos_token_ids=eos_token_ids, skip_special_tokens=skip_special_tokens, stop_check_every=stop_check_every,
        )
        spec, nrs = model.spec, request.nrs
        texts = format_prompts(tokenizer, prompts, chat)
        is_chat = [chat or not isinstance(p, str) for p in prompts]
        prompt_ids = _tokenize(tokenizer, texts, is_chat)
        longest = max(len(p) for p in prompt_ids)
        if spec.position == "learned" and longest + request.max_new_tokens > spec.max_position_embeddings:
            raise ValueError(
                f"generate(): prompt ({longest} tokens) + max_new_tokens ({request.max_new_tokens}) exceeds the "
                f"model's {spec.max_position_embeddings} positions; shorten the prompts or lower max_new_tokens."
            )
        pad_id = _pad_id(tokenizer, spec, list(request.eos))
        sampling = Sampling(
            temperature=np.float32(request.temperature),
            top_p=np.float32(request.top_p),
            eos=np.asarray(list(request.eos) + [-1] * (MAX_EOS_IDS - len(request.eos)), np.int32),
            pad=np.int32(pad_id),
            max_new=np.int32(request.max_new_tokens),
            seed=np.uint32(request.seed % (1 << 32)),
        )
        new_bucket = pow2_at_least(request.max_new_tokens, MIN_NEW_TOKENS_BUCKET)
        batch = request.batch_size or _default_batch_size(spec, model.dtype, longest, new_bucket)
        prompts_per_chunk = max(1, batch // nrs)

        graphdef, state = nnx.split(model)
        mesh = self.mesh
        if mesh is not None:
            state = shd.place_state(state, mesh, self.sharding_rules)
        else:
            single_process = jax.process_count() == 1
            mesh = shd.mesh_of(state, shd.make_mesh(devices=jax.devices()[:1]) if single_process else None)
        order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))  # similar lengths share a chunk
        tokens_out: list[Optional[np.ndarray]] = [None] * (len(prompt_ids) * nrs)
        reasons: list[str] = [""] * len(tokens_out)
        with jax.set_mesh(mesh), shd.use_rules(self.sharding_rules):
            for start in range(0, len(order), prompts_per_chunk):
                chunk = order[start : start + prompts_per_chunk]
                plan = _Chunk.build([prompt_ids[i] for i in chunk], chunk, nrs, new_bucket, pad_id)
                results = self._run_chunk(graphdef, state, mesh, plan, request, sampling)
                for local, i in enumerate(chunk):
                    for j in range(nrs):
                        tokens_out[i * nrs + j], reasons[i * nrs + j] = results[local * nrs + j]
        return _finish(tokenizer, tokens_out, reasons, prompt_ids, request, return_tokens)

    # ------------------------------------------------------------------ programs
    def _program(self, key: tuple, build: Callable[[], Any]) -> Any:
        if key not in self._programs:
            self._programs[key] = build()
            _COMPILES[key[0]] += 1
        return self._programs[key]

    def _layouts(self, mesh, rows: int) -> DecodeState:
        """Shardings of a chunk's decode state, from the activation rules: rows split over the batch
        axes when they divide, the cache's KV heads over the tensor axis when it divides them."""
        spec = self.model.spec

        def named(axes, shape):
            return NamedSharding(mesh, shd.activation_spec(axes, shape, mesh, self.sharding_rules))

        cache_shape = (spec.num_layers, rows, 1, spec.num_kv_heads, spec.head_dim)
        cache = named((None, "batch", None, "kv_heads", None), cache_shape)
        row1, row2 = named(("batch",), (rows,)), named(("batch", None), (rows, 1))
        return DecodeState(
            cache=KVCache(cache, cache), kv_mask=row2, tokens=row2, last=row1, prompt_len=row1, keys=row1, done=row1,
            finished_by_eos=row1, step=NamedSharding(mesh, P()),
        )

    def _run_chunk(self, graphdef, state, mesh, plan: "_Chunk", request: _Request, sampling: Sampling):
        """Prefill + decode one chunk of prompts; returns (tokens, finish reason) per row, prompt-major."""
        rep = NamedSharding(mesh, P())
        layouts = self._layouts(mesh, plan.rows)
        prompt_rows = self._layouts(mesh, plan.prompt_rows)
        inputs = dict(
            input_ids=shd.place_array(plan.ids, prompt_rows.tokens),
            mask=shd.place_array(plan.mask, prompt_rows.tokens),
            row_ids=shd.place_array(plan.row_ids, layouts.last),
        )
        scalars = Sampling(*(shd.place_array(np.asarray(v), rep) for v in sampling))
        sig = _params_signature(state)
        model = self.model
        prefill = self._program(
            ("prefill", graphdef, sig, mesh, plan.prompt_rows, plan.prompt_bucket, plan.new_bucket, request.nrs, request.mode),
            lambda: jax.jit(
                _make_prefill(graphdef, model.dtype, plan.prompt_bucket, plan.new_bucket, request.nrs, request.mode, layouts),
                out_shardings=layouts,
            ).lower(state, inputs, scalars).compile(),
        )
        dstate = prefill(state, inputs, scalars)
        limit0 = shd.place_array(np.asarray(np.int32(request.max_new_tokens)), rep)
        decode = self._program(
            ("decode", graphdef, sig, mesh, plan.rows, plan.prompt_bucket, plan.new_bucket, request.mode),
            lambda: jax.jit(
                _make_decode(graphdef, model.dtype, plan.prompt_bucket, request.mode), donate_argnums=(1,),
                out_shardings=layouts,
            ).lower(state, dstate, scalars, limit0).compile(),
        )

        max_new = request.max_new_tokens
        stop_rows: set[int] = set()
        fields = ("tokens", "done", "finished_by_eos", "step")
        if not request.stops:
            dstate = decode(state, dstate, scalars, limit0)
            host = jax.device_get({k: getattr(dstate, k) for k in fields})
        else:
            step = 1
            while True:
                limit = min(max_new, step + max(1, request.stop_check_every))
                dstate = decode(state, dstate, scalars, shd.place_array(np.asarray(np.int32(limit)), rep))
                host = jax.device_get({k: getattr(dstate, k) for k in fields})
                step = int(host["step"])
                if step >= max_new or bool(host["done"].all()):
                    break
                done = np.asarray(host["done"]).copy()
                running = [r for r in range(plan.real_rows) if not done[r]]
                decoded = self.tokenizer.batch_decode(
                    [host["tokens"][r, :step].tolist() for r in running], skip_special_tokens=request.skip_special_tokens
                )
                for r, text in zip(running, decoded):
                    if _first_stop(text, list(request.stops)) is not None:
                        done[r] = True
                        stop_rows.add(r)
                if stop_rows and done.all():
                    break
                if done.any():
                    dstate = dstate._replace(done=shd.place_array(done, layouts.done))

        tokens = np.asarray(host["tokens"])
        by_eos = np.asarray(host["finished_by_eos"])
        step = int(host["step"])
        eos = np.asarray(request.eos, np.int32)
        results = []
        for r in range(plan.real_rows):
            row = tokens[r, :step]
            if by_eos[r]:
                n = int(np.argmax(np.isin(row, eos))) + 1
                results.append((row[:n].copy(), "eos"))
            elif r in stop_rows:
                results.append((row.copy(), "stop"))
            else:
                results.append((row.copy(), "length"))
        return results


@dataclasses.dataclass(frozen=True)
class _Chunk:
    """One chunk's host inputs: left-padded prompts in power-of-two buckets, and output row ids."""

    ids: np.ndarray  # [prompt_rows, prompt_bucket]
    mask: np.ndarray
    row_ids: np.ndarray  # [rows]: global output row index, -1 for filler rows
    prompt_rows: int
    rows: int
    prompt_bucket: int
    new_bucket: int
    real_rows: int  # prompts x num_return_sequences actually asked for

    @classmethod
    def build(cls, chunk_ids: list[list[int]], chunk_index: list[int], nrs: int, new_bucket: int, pad: int) -> "_Chunk":
        n_prompts = len(chunk_ids)
        prompt_rows = pow2_at_least(n_prompts)
        rows = prompt_rows * nrs
        prompt_bucket = pow2_at_least(max(len(p) for p in chunk_ids), MIN_PROMPT_BUCKET)
        ids = np.full((prompt_rows, prompt_bucket), pad, np.int32)
        mask = np.zeros((prompt_rows, prompt_bucket), np.int32)
        for r, p in enumerate(chunk_ids):
            ids[r, prompt_bucket - len(p):] = p
            mask[r, prompt_bucket - len(p):] = 1
        mask[n_prompts:, -1] = 1  # filler rows: one real token so no attention row is empty
        row_ids = np.full((rows,), -1, np.int32)
        for local, i in enumerate(chunk_index):
            row_ids[local * nrs : (local + 1) * nrs] = i * nrs + np.arange(nrs)
        return cls(ids, mask, row_ids, prompt_rows, rows, prompt_bucket, new_bucket, n_prompts * nrs)


def check_sampling_arguments(max_new_tokens, temperature, top_k, top_p, num_return_sequences, batch_size) -> None:
    """The argument checks every sampler shares (decoder-only and encoder-decoder), before any work."""
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"generate(): max_new_tokens={max_new_tokens!r} must be an integer >= 1.")
    if temperature is None or temperature < 0 or not math.isfinite(temperature):
        raise ValueError(f"generate(): temperature={temperature!r} must be a finite number >= 0 (0 = greedy).")
    if top_k is not None and (not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise ValueError(f"generate(): top_k={top_k!r} must be None or an integer >= 1.")
    if top_p is not None and not (0.0 < top_p <= 1.0):
        raise ValueError(f"generate(): top_p={top_p!r} must lie in (0, 1].")
    if not isinstance(num_return_sequences, (int, np.integer)) or num_return_sequences < 1:
        raise ValueError(f"generate(): num_return_sequences={num_return_sequences!r} must be an integer >= 1.")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"generate(): batch_size={batch_size!r} must be None or >= 1.")


def _request(model, tokenizer, *, max_new_tokens, temperature, top_k, top_p, num_return_sequences, seed, stop,
             batch_size, eos_token_ids, skip_special_tokens, stop_check_every) -> _Request:
    """Validate one call's arguments (every check before any work)."""
    check_sampling_arguments(max_new_tokens, temperature, top_k, top_p, num_return_sequences, batch_size)
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not isinstance(s, str) or not s for s in stops):
        raise ValueError(f"generate(): stop={stop!r} must be a non-empty string or a list of them.")
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
    max_new_tokens: int,
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
) -> Union[list[str], GenerationResult]:
    """Generate completions for ``prompts`` with a jaxsft model.

    ``prompts`` are strings (tokenized with the tokenizer's special tokens, as
    ``tokenizer(prompts)`` does) or chat message lists (formatted with the chat
    template and a generation prompt; ``chat=True`` treats strings as one user
    message). ``temperature=0`` is greedy; otherwise sampling with optional
    ``top_k`` / ``top_p``. ``eos_token_ids`` overrides the EOS set (``[]`` never
    stops early). ``batch_size`` caps the rows (prompts x samples) run at once.
    ``mesh`` defaults to the mesh the model's params live on; another mesh moves
    them there first (per ``sharding_rules``, default the rules table).

    Returns the generated texts, prompt-major (``len(prompts) *
    num_return_sequences``), or a :class:`GenerationResult` with ``return_tokens``.

    The programs belong to a :class:`Sampler` kept for this model object (and dropped
    with it), so repeated calls on one model compile once; a loop that gets a new model
    object each time (``trainer.model``) should keep a ``Sampler`` or use ``trainer.generate``.
    A ``Seq2SeqLM`` (T5, BART) goes to :func:`jaxsft.seq2seq_generation.generate`.
    """
    from jaxsft.models.seq2seq import Seq2SeqLM

    if isinstance(model, Seq2SeqLM):  # T5 / BART: encoder once, then the decoder loop
        from jaxsft import seq2seq_generation

        if sharding_rules is not None:
            raise ValueError("generate(): sharding_rules is not supported for encoder-decoder models yet.")
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
        stop_check_every=stop_check_every,
    )


# ---------------------------------------------------------------------------- host helpers
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


def pow2_at_least(n: int, minimum: int = 1) -> int:
    """The smallest power of two >= ``n`` (and >= ``minimum``): the generation programs' bucket sizes."""
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def _default_batch_size(spec, dtype, prompt_len: int, new_bucket: int) -> int:
    """Rows per chunk so that the KV cache, and separately the prefill's attention scores, stay under a budget."""
    prompt_bucket = pow2_at_least(prompt_len, MIN_PROMPT_BUCKET)
    slots = prompt_bucket + new_bucket
    cache = 2 * spec.num_layers * slots * spec.num_kv_heads * spec.head_dim * jnp.dtype(dtype).itemsize
    scores = spec.num_heads * prompt_bucket * slots * 4
    per_row = max(cache, scores)
    rows = max(1, DEFAULT_CACHE_BYTES // per_row)
    return 1 << (int(rows).bit_length() - 1)


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


# ---------------------------------------------------------------------------- jitted bodies
def _compute_view(state, dtype):
    """Parameters cast to the compute dtype once per program (the model casts them at use anyway).

    Without this, a model keeping fp32 parameters with bf16 compute would re-cast every
    weight on every decode step. The final norm is left alone: a LayerNorm reads it in fp32.
    """
    dtype = jnp.dtype(dtype)

    def cast(path, x):
        floating = jnp.issubdtype(x.dtype, jnp.floating)
        if floating and x.dtype != dtype and "final_norm" not in jax.tree_util.keystr(path):
            return x.astype(dtype)
        return x

    return jax.tree_util.tree_map_with_path(cast, state)


def _sample(logits: jax.Array, keys: jax.Array, step: jax.Array, mode: Mode, temperature, top_p) -> jax.Array:
    """One token per row from fp32 logits [B, V]: greedy, or temperature -> top-k -> top-p (HF's order)."""
    if mode.kind == "greedy":
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    neg = jnp.finfo(logits.dtype).min
    if mode.top_k is not None and mode.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, mode.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)  # HF TopKLogitsWarper: ties with the k-th survive
    if mode.top_p:
        # HF TopPLogitsWarper: ascending sort, drop tokens whose cumulative probability <= 1 - top_p,
        # always keep the most likely one. Here as a threshold on the logit value.
        sorted_logits = jnp.sort(logits, axis=-1)
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        remove = cum <= (1.0 - top_p)
        remove = remove.at[:, -1].set(False)
        n_removed = jnp.sum(remove, axis=-1, keepdims=True)
        threshold = jnp.take_along_axis(sorted_logits, n_removed, axis=-1)
        logits = jnp.where(logits < threshold, neg, logits)
    step_keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(keys)
    return jax.vmap(lambda k, l: jax.random.categorical(k, l))(step_keys, logits).astype(jnp.int32)


def _record(st: DecodeState, tok: jax.Array, sampling: Sampling) -> DecodeState:
    done = st.done
    tok = jnp.where(done, sampling.pad, tok)
    hit = jnp.any(tok[:, None] == sampling.eos[None, :], axis=-1) & ~done
    tokens = jax.lax.dynamic_update_slice_in_dim(st.tokens, tok[:, None], st.step, axis=1)
    return st._replace(
        tokens=tokens, last=tok, done=done | hit, finished_by_eos=st.finished_by_eos | hit, step=st.step + 1
    )


def _make_prefill(graphdef, dtype, prompt_bucket, new_bucket, nrs, mode: Mode, layouts: DecodeState):
    slots = prompt_bucket + new_bucket

    def prefill(state, inputs, sampling: Sampling) -> DecodeState:
        model = nnx.merge(graphdef, _compute_view(state, dtype))
        ids, mask = inputs["input_ids"], inputs["mask"].astype(bool)
        rows_p = ids.shape[0]
        positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0).astype(jnp.int32)
        cache = model.init_cache(rows_p, slots, dtype)
        kv_mask = jnp.concatenate([mask, jnp.zeros((rows_p, new_bucket), bool)], axis=1)
        hidden, cache = model.forward_with_cache(ids, positions, cache, jnp.int32(0), kv_mask)
        logits = model.logits(hidden[:, -1:])[:, 0]
        if nrs > 1:
            cache = KVCache(jnp.repeat(cache.k, nrs, axis=1), jnp.repeat(cache.v, nrs, axis=1))
            kv_mask = jnp.repeat(kv_mask, nrs, axis=0)
            logits = jnp.repeat(logits, nrs, axis=0)
            mask = jnp.repeat(mask, nrs, axis=0)
        rows = logits.shape[0]
        cache = jax.lax.with_sharding_constraint(cache, layouts.cache)
        base = jax.random.key(sampling.seed)
        keys = jax.vmap(lambda r: jax.random.fold_in(base, r))(inputs["row_ids"])
        st = DecodeState(
            cache=cache,
            kv_mask=kv_mask,
            tokens=jnp.full((rows, new_bucket), sampling.pad, jnp.int32),
            last=jnp.zeros((rows,), jnp.int32),
            prompt_len=jnp.sum(mask, axis=-1).astype(jnp.int32),
            keys=keys,
            done=inputs["row_ids"] < 0,
            finished_by_eos=jnp.zeros((rows,), bool),
            step=jnp.int32(0),
        )
        tok = _sample(logits, keys, jnp.int32(0), mode, sampling.temperature, sampling.top_p)
        return _record(st, tok, sampling)

    return prefill


def _make_decode(graphdef, dtype, prompt_bucket, mode: Mode):
    def decode(state, st: DecodeState, sampling: Sampling, limit) -> DecodeState:
        model = nnx.merge(graphdef, _compute_view(state, dtype))  # cast once, outside the loop
        end = jnp.minimum(limit, sampling.max_new)

        def cond(st: DecodeState):
            return (st.step < end) & ~jnp.all(st.done)

        def body(st: DecodeState):
            s = st.step  # tokens sampled so far; the last one goes into the cache now
            write = prompt_bucket + s - 1
            kv_mask = jax.lax.dynamic_update_slice_in_dim(st.kv_mask, jnp.ones((st.kv_mask.shape[0], 1), bool), write, axis=1)
            positions = (st.prompt_len + s - 1)[:, None]
            hidden, cache = model.forward_with_cache(st.last[:, None], positions, st.cache, write, kv_mask)
            logits = model.logits(hidden)[:, 0]
            tok = _sample(logits, st.keys, s, mode, sampling.temperature, sampling.top_p)
            return _record(st._replace(cache=cache, kv_mask=kv_mask), tok, sampling)

        return jax.lax.while_loop(cond, body, st)

    return decode


generate.compiled_programs = compiled_programs  # type: ignore[attr-defined]
generate.clear_cache = clear_cache  # type: ignore[attr-defined]
