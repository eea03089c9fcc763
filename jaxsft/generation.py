"""Fast batched generation: one prefill program and one decode-loop program over a KV cache.

Design
------
* **Buckets.** Prompts are left-padded to a power-of-two length (>= 16), the
  number of prompts in a chunk is rounded up to a power of two, and the cache is
  sized for ``max_new_tokens`` rounded up to a power of two (>= 16). The true
  ``max_new_tokens`` is a run-time value of the loop, so calls of similar size
  (e.g. 5 or 7 prompts of 20 or 30 tokens, 20 or 30 new tokens) share programs.
* **Programs.** Each bucket gets exactly two ahead-of-time compiled programs:
  ``prefill`` (runs the prompts, writes the cache, samples the first token,
  repeats rows for ``num_return_sequences``) and ``decode`` (a
  ``lax.while_loop`` that runs one token per iteration and exits early once every
  row has finished). The cache key also holds the sampling *mode* (greedy or
  sampling, ``top_k`` value, top-p on/off); temperature, top-p value, seed, EOS
  ids and the token budget are run-time values. :func:`compiled_programs` counts
  compilations so tests can assert that nothing recompiles.
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
* **Sharding.** Everything runs under the model's mesh. Batch rows are split
  over the data axes when their bucket divides them, else replicated; the cache
  follows (kv heads on the tensor axis when it divides them). The cache uses the
  model's compute dtype.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxsft import sharding as shd
from jaxsft.models.decoder import CausalLM, KVCache

__all__ = ["generate", "GenerationResult", "compiled_programs", "clear_cache", "format_prompts"]

MIN_PROMPT_BUCKET = 16
MIN_NEW_TOKENS_BUCKET = 16
MAX_EOS_IDS = 8  # EOS ids are a padded run-time array of this size (no recompile per tokenizer)
DEFAULT_CACHE_BYTES = 4 << 30  # default batch_size keeps one chunk's KV cache under this

Prompt = Union[str, Sequence[dict]]

_PROGRAMS: dict[tuple, Any] = {}
_COMPILES = {"prefill": 0, "decode": 0}


def compiled_programs() -> int:
    """How many generation programs have been compiled in this process (prefill + decode)."""
    return sum(_COMPILES.values())


def clear_cache() -> None:
    """Drop every cached generation program (the compile counter keeps counting)."""
    _PROGRAMS.clear()


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
        out.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    return out


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
) -> Union[list[str], GenerationResult]:
    """Generate completions for ``prompts`` with a jaxsft model.

    ``prompts`` are strings (tokenized with the tokenizer's special tokens, as
    ``tokenizer(prompts)`` does) or chat message lists (formatted with the chat
    template and a generation prompt; ``chat=True`` treats strings as one user
    message). ``temperature=0`` is greedy; otherwise sampling with optional
    ``top_k`` / ``top_p``. ``eos_token_ids`` overrides the EOS set (``[]`` never
    stops early). ``batch_size`` caps the rows (prompts x samples) run at once.
    ``mesh`` defaults to the mesh the model's params live on; another mesh moves
    them there first (per the sharding rules table).

    Returns the generated texts, prompt-major (``len(prompts) *
    num_return_sequences``), or a :class:`GenerationResult` with ``return_tokens``.
    """
    if not isinstance(model, CausalLM):
        raise TypeError(f"generate(): model must be a jaxsft CausalLM, got {type(model).__name__}.")
    if isinstance(prompts, (str, dict)) or (
        isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], dict)
    ):
        raise TypeError("generate(): prompts must be a list of prompts (wrap a single prompt or chat in a list).")
    prompts = list(prompts)
    if not prompts:
        return GenerationResult([], [], [], [], num_return_sequences) if return_tokens else []
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
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not isinstance(s, str) or not s for s in stops):
        raise ValueError(f"generate(): stop={stop!r} must be a non-empty string or a list of them.")

    spec = model.spec
    nrs = int(num_return_sequences)
    texts = format_prompts(tokenizer, prompts, chat)
    is_chat = [chat or not isinstance(p, str) for p in prompts]
    prompt_ids = _tokenize(tokenizer, texts, is_chat)
    eos = _eos_ids(model, tokenizer) if eos_token_ids is None else [int(e) for e in eos_token_ids]
    if len(eos) > MAX_EOS_IDS:
        raise ValueError(f"generate(): at most {MAX_EOS_IDS} EOS ids are supported, got {len(eos)}.")
    pad_id = _pad_id(tokenizer, spec, eos)
    longest = max(len(p) for p in prompt_ids)
    if spec.position == "learned" and longest + max_new_tokens > spec.max_position_embeddings:
        raise ValueError(
            f"generate(): prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"{spec.max_position_embeddings} positions; shorten the prompts or lower max_new_tokens."
        )

    greedy = temperature == 0.0
    if greedy:
        mode: tuple = ("greedy",)
    else:
        mode = ("sample", None if top_k is None else int(top_k), top_p is not None and top_p < 1.0)
    scalars = dict(
        temperature=np.float32(1.0 if greedy else temperature),
        top_p=np.float32(1.0 if top_p is None else top_p),
        eos=np.asarray(eos + [-1] * (MAX_EOS_IDS - len(eos)), np.int32),
        pad=np.int32(pad_id),
        max_new=np.int32(max_new_tokens),
        seed=np.uint32(seed % (1 << 32)),
    )

    new_bucket = _pow2_at_least(max_new_tokens, MIN_NEW_TOKENS_BUCKET)
    if batch_size is None:
        batch_size = _default_batch_size(spec, model.dtype, longest, new_bucket)
    prompts_per_chunk = max(1, batch_size // nrs)

    graphdef, state = nnx.split(model)
    if mesh is not None:
        state = shd.place_state(state, mesh)
    else:
        single_process = jax.process_count() == 1
        mesh = shd.mesh_of(state, shd.make_mesh(devices=jax.devices()[:1]) if single_process else None)
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))  # similar lengths share a chunk
    tokens_out: list[Optional[np.ndarray]] = [None] * (len(prompt_ids) * nrs)
    reasons: list[str] = [""] * len(tokens_out)
    with jax.set_mesh(mesh):
        for start in range(0, len(order), prompts_per_chunk):
            chunk = order[start : start + prompts_per_chunk]
            results = _run_chunk(
                graphdef, state, spec, model.dtype, mesh, [prompt_ids[i] for i in chunk], chunk, nrs, new_bucket,
                mode, scalars, tokenizer, stops, stop_check_every, skip_special_tokens,
            )
            for local, i in enumerate(chunk):
                for j in range(nrs):
                    tokens_out[i * nrs + j], reasons[i * nrs + j] = results[local * nrs + j]

    final_tokens, final_texts = [], []
    for r, toks in enumerate(tokens_out):
        body = toks[:-1] if reasons[r] == "eos" else toks
        text = tokenizer.decode(body.tolist(), skip_special_tokens=skip_special_tokens)
        if stops:
            cut = _first_stop(text, stops)
            if cut is not None:
                text = text[:cut]
                toks = _tokens_through_stop(tokenizer, toks, stops, skip_special_tokens)
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


def _pow2_at_least(n: int, minimum: int = 1) -> int:
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def _default_batch_size(spec, dtype, prompt_len: int, new_bucket: int) -> int:
    """Rows per chunk so that the KV cache, and separately the prefill's attention scores, stay under a budget."""
    prompt_bucket = _pow2_at_least(prompt_len, MIN_PROMPT_BUCKET)
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


# ---------------------------------------------------------------------------- one chunk
def _row_sharding(mesh, rows: int, ndim: int) -> NamedSharding:
    if rows % shd.batch_rows_multiple(mesh) == 0:
        return shd.batch_sharding(mesh, ndim)
    return NamedSharding(mesh, P(*([None] * ndim)))


def _cache_sharding(mesh, spec, rows: int) -> NamedSharding:
    batch_axes = shd.BATCH_AXES if rows % shd.batch_rows_multiple(mesh) == 0 else None
    tensor = mesh.shape["tensor"]
    heads = "tensor" if tensor > 1 and spec.num_kv_heads % tensor == 0 else None
    return NamedSharding(mesh, P(None, batch_axes, None, heads, None))


def _state_shardings(mesh, spec, rows: int, new_bucket: int) -> dict:
    row1, row2 = _row_sharding(mesh, rows, 1), _row_sharding(mesh, rows, 2)
    cache = _cache_sharding(mesh, spec, rows)
    rep = NamedSharding(mesh, P())
    return {
        "cache": KVCache(cache, cache),
        "kv_mask": row2,
        "tokens": row2,
        "last": row1,
        "prompt_len": row1,
        "keys": row1,
        "done": row1,
        "finished_by_eos": row1,
        "step": rep,
    }


def _run_chunk(graphdef, state, spec, dtype, mesh, chunk_ids, chunk_index, nrs, new_bucket, mode, scalars,
               tokenizer, stops, stop_check_every, skip_special_tokens):
    """Prefill + decode one chunk of prompts; returns (tokens, finish reason) per row, prompt-major."""
    n_prompts = len(chunk_ids)
    prompt_rows = _pow2_at_least(n_prompts)
    rows = prompt_rows * nrs
    prompt_bucket = _pow2_at_least(max(len(p) for p in chunk_ids), MIN_PROMPT_BUCKET)

    ids = np.full((prompt_rows, prompt_bucket), scalars["pad"], np.int32)
    mask = np.zeros((prompt_rows, prompt_bucket), np.int32)
    for r, p in enumerate(chunk_ids):
        ids[r, prompt_bucket - len(p):] = p
        mask[r, prompt_bucket - len(p):] = 1
    mask[n_prompts:, -1] = 1  # filler rows: one real token so no attention row is empty
    row_ids = np.full((rows,), -1, np.int32)
    for local, i in enumerate(chunk_index):
        row_ids[local * nrs : (local + 1) * nrs] = i * nrs + np.arange(nrs)

    rep = NamedSharding(mesh, P())
    args_prefill = dict(
        input_ids=shd.place_array(ids, _row_sharding(mesh, prompt_rows, 2)),
        mask=shd.place_array(mask, _row_sharding(mesh, prompt_rows, 2)),
        row_ids=shd.place_array(row_ids, _row_sharding(mesh, rows, 1)),
        **{k: shd.place_array(np.asarray(v), rep) for k, v in scalars.items()},
    )
    sig = _params_signature(state)
    out_sh = _state_shardings(mesh, spec, rows, new_bucket)
    key = ("prefill", graphdef, sig, mesh, prompt_rows, prompt_bucket, new_bucket, nrs, mode)
    prefill = _PROGRAMS.get(key)
    if prefill is None:
        fn = _make_prefill(graphdef, spec, dtype, prompt_bucket, new_bucket, nrs, mode, out_sh)
        prefill = jax.jit(fn, out_shardings=out_sh).lower(state, args_prefill).compile()
        _PROGRAMS[key] = prefill
        _COMPILES["prefill"] += 1
    dstate = prefill(state, args_prefill)

    dkey = ("decode", graphdef, sig, mesh, rows, prompt_bucket, new_bucket, mode)
    decode = _PROGRAMS.get(dkey)
    args_decode = {k: args_prefill[k] for k in ("temperature", "top_p", "eos", "pad", "max_new", "seed")}
    limit0 = shd.place_array(np.asarray(np.int32(scalars["max_new"])), rep)
    if decode is None:
        fn = _make_decode(graphdef, spec, dtype, prompt_bucket, mode)
        decode = (
            jax.jit(fn, donate_argnums=(1,), out_shardings=out_sh).lower(state, dstate, args_decode, limit0).compile()
        )
        _PROGRAMS[dkey] = decode
        _COMPILES["decode"] += 1

    max_new = int(scalars["max_new"])
    stop_rows: set[int] = set()
    if not stops:
        dstate = decode(state, dstate, args_decode, limit0)
        host = jax.device_get({k: dstate[k] for k in ("tokens", "done", "finished_by_eos", "step")})
    else:
        step = 1
        while True:
            limit = min(max_new, step + max(1, stop_check_every))
            dstate = decode(state, dstate, args_decode, shd.place_array(np.asarray(np.int32(limit)), rep))
            host = jax.device_get({k: dstate[k] for k in ("tokens", "done", "finished_by_eos", "step")})
            step = int(host["step"])
            if step >= max_new or bool(host["done"].all()):
                break
            done = np.asarray(host["done"]).copy()
            running = [r for r in range(n_prompts * nrs) if not done[r]]
            decoded = tokenizer.batch_decode(
                [host["tokens"][r, :step].tolist() for r in running], skip_special_tokens=skip_special_tokens
            )
            for r, text in zip(running, decoded):
                if _first_stop(text, stops) is not None:
                    done[r] = True
                    stop_rows.add(r)
            if stop_rows and done.all():
                break
            if done.any():
                dstate = dict(dstate)
                dstate["done"] = shd.place_array(done, out_sh["done"])

    tokens = np.asarray(host["tokens"])
    by_eos = np.asarray(host["finished_by_eos"])
    step = int(host["step"])
    results = []
    for r in range(n_prompts * nrs):
        row = tokens[r, :step]
        if by_eos[r]:
            n = int(np.argmax(np.isin(row, scalars["eos"][scalars["eos"] >= 0]))) + 1
            results.append((row[:n].copy(), "eos"))
        elif r in stop_rows:
            results.append((row.copy(), "stop"))
        else:
            results.append((row.copy(), "length"))
    return results


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


def _sample(logits: jax.Array, keys: jax.Array, step: jax.Array, mode: tuple, temperature, top_p) -> jax.Array:
    """One token per row from fp32 logits [B, V]: greedy, or temperature -> top-k -> top-p (HF's order)."""
    if mode[0] == "greedy":
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    _, top_k, use_top_p = mode
    logits = logits / temperature
    neg = jnp.finfo(logits.dtype).min
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)  # HF TopKLogitsWarper: ties with the k-th survive
    if use_top_p:
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


def _record(st: dict, tok: jax.Array, eos: jax.Array, pad: jax.Array) -> dict:
    done = st["done"]
    tok = jnp.where(done, pad, tok)
    hit = jnp.any(tok[:, None] == eos[None, :], axis=-1) & ~done
    tokens = jax.lax.dynamic_update_slice_in_dim(st["tokens"], tok[:, None], st["step"], axis=1)
    return dict(
        st, tokens=tokens, last=tok, done=done | hit, finished_by_eos=st["finished_by_eos"] | hit, step=st["step"] + 1
    )


def _make_prefill(graphdef, spec, dtype, prompt_bucket, new_bucket, nrs, mode, out_sh):
    slots = prompt_bucket + new_bucket

    def prefill(state, a):
        model = nnx.merge(graphdef, _compute_view(state, dtype))
        ids, mask = a["input_ids"], a["mask"].astype(bool)
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
        cache = jax.lax.with_sharding_constraint(cache, out_sh["cache"])
        base = jax.random.key(a["seed"])
        keys = jax.vmap(lambda r: jax.random.fold_in(base, r))(a["row_ids"])
        st = dict(
            cache=cache,
            kv_mask=kv_mask,
            tokens=jnp.full((rows, new_bucket), a["pad"], jnp.int32),
            last=jnp.zeros((rows,), jnp.int32),
            prompt_len=jnp.sum(mask, axis=-1).astype(jnp.int32),
            keys=keys,
            done=a["row_ids"] < 0,
            finished_by_eos=jnp.zeros((rows,), bool),
            step=jnp.int32(0),
        )
        tok = _sample(logits, keys, jnp.int32(0), mode, a["temperature"], a["top_p"])
        return _record(st, tok, a["eos"], a["pad"])

    return prefill


def _make_decode(graphdef, spec, dtype, prompt_bucket, mode):
    def decode(state, st, a, limit):
        model = nnx.merge(graphdef, _compute_view(state, dtype))  # cast once, outside the loop
        end = jnp.minimum(limit, a["max_new"])

        def cond(st):
            return (st["step"] < end) & ~jnp.all(st["done"])

        def body(st):
            s = st["step"]  # tokens sampled so far; the last one goes into the cache now
            write = prompt_bucket + s - 1
            kv_mask = jax.lax.dynamic_update_slice_in_dim(
                st["kv_mask"], jnp.ones((st["kv_mask"].shape[0], 1), bool), write, axis=1
            )
            positions = (st["prompt_len"] + s - 1)[:, None]
            hidden, cache = model.forward_with_cache(st["last"][:, None], positions, st["cache"], write, kv_mask)
            logits = model.logits(hidden)[:, 0]
            tok = _sample(logits, st["keys"], s, mode, a["temperature"], a["top_p"])
            return _record(dict(st, cache=cache, kv_mask=kv_mask), tok, a["eos"], a["pad"])

        return jax.lax.while_loop(cond, body, st)

    return decode


generate.compiled_programs = compiled_programs  # type: ignore[attr-defined]
generate.clear_cache = clear_cache  # type: ignore[attr-defined]
