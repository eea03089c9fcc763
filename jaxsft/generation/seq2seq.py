"""Generation for encoder-decoder models (T5, BART): the encoder once, then a decoder loop over a KV cache.

One ahead-of-time compiled program per bucket runs the whole thing on device:
the encoder over the (right-padded) prompts, the cross-attention keys and values
of every decoder layer (computed once), then a ``lax.while_loop`` that feeds one
decoder token per iteration, appends its self-attention keys/values to a cache
that grows one slot per token, and samples the next token. Buckets as in
``jaxsft.generation``: prompt length and new-token budget rounded up to powers of
two (>= 16), rows to a power of two; temperature, top-p, seed, EOS ids and the
true token budget are run-time values. Sampling is per row from
``fold_in(fold_in(key(seed), row), step)``, temperature -> top-k -> top-p as HF;
temperature 0 is greedy. No dropout is ever applied here.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsft.infra import sharding as shd
from jaxsft.generation.common import GenerationResult, check_sampling_arguments
from jaxsft.generation.engine import MAX_EOS_IDS, pow2_at_least
from jaxsft.generation.sampling import Mode, sample
from jaxsft.models.seq2seq import Seq2SeqLM

MIN_BUCKET = 16

_PROGRAMS: dict[tuple, Any] = {}
_COMPILES = {"seq2seq": 0}


def compiled_programs() -> int:
    """How many encoder-decoder generation programs this process has compiled."""
    return _COMPILES["seq2seq"]


def generate(
    model: Seq2SeqLM,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    num_return_sequences: int = 1,
    seed: int = 0,
    return_tokens: bool = False,
    batch_size: Optional[int] = None,
    eos_token_ids: Optional[Sequence[int]] = None,
    skip_special_tokens: bool = True,
    mesh: Optional[jax.sharding.Mesh] = None,
    stop: Any = None,
    chat: bool = False,
    **unsupported: Any,
):
    """Generate targets for ``prompts`` (encoder inputs, tokenized with the tokenizer's special tokens).

    Same arguments and return values as :func:`jaxsft.generate` (which calls this for a
    ``Seq2SeqLM``); generated tokens start after the decoder start token, which is not returned.
    """

    if unsupported:
        raise TypeError(f"generate(): unexpected keyword argument(s) {sorted(unsupported)} for an encoder-decoder model.")
    if stop is not None or chat:
        raise ValueError("generate(): stop strings and chat prompts are not supported for encoder-decoder models yet.")
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise TypeError("generate(): prompts for an encoder-decoder must be a list of strings.")
    prompts = list(prompts)
    if not prompts:
        return GenerationResult([], [], [], [], num_return_sequences) if return_tokens else []
    check_sampling_arguments(max_new_tokens, temperature, top_k, top_p, num_return_sequences, batch_size)
    spec = model.spec
    if spec.position == "learned" and max_new_tokens > spec.max_position_embeddings:
        raise ValueError(
            f"generate(): max_new_tokens ({max_new_tokens}) exceeds the decoder's {spec.max_position_embeddings} "
            "positions; lower max_new_tokens."
        )
    prompt_ids = [list(row) for row in tokenizer(prompts)["input_ids"]]
    for i, row in enumerate(prompt_ids):
        if not row:
            raise ValueError(f"generate(): prompt {i} tokenizes to no tokens; give it some text.")
        if spec.position == "learned" and len(row) > spec.max_position_embeddings:
            raise ValueError(
                f"generate(): prompts[{i}] is {len(row)} tokens, over the encoder's {spec.max_position_embeddings} "
                "positions; shorten it (or truncate with the tokenizer)."
            )
    if spec.position == "relative":
        longest = max(len(row) for row in prompt_ids)
        if longest > spec.max_position_embeddings:
            _warn_once(f"generate(): a {longest}-token prompt runs past the {spec.max_position_embeddings} tokens "
                       "this encoder was trained on; quality may drop.")
    if eos_token_ids is not None and any(
        isinstance(e, bool) or not isinstance(e, (int, np.integer)) or not 0 <= int(e) < spec.vocab_size
        for e in eos_token_ids
    ):
        raise ValueError(f"generate(): eos_token_ids={list(eos_token_ids)!r} must be token ids of this model's "
                         f"vocabulary (0 .. {spec.vocab_size - 1}).")
    eos = _eos_ids(spec, tokenizer) if eos_token_ids is None else [int(e) for e in eos_token_ids]
    if len(eos) > MAX_EOS_IDS:
        raise ValueError(f"generate(): at most {MAX_EOS_IDS} EOS ids are supported, got {len(eos)}.")
    nrs = int(num_return_sequences)
    greedy = temperature == 0.0
    mode: tuple = ("greedy",) if greedy else ("sample", None if top_k is None else int(top_k), top_p is not None and top_p < 1.0)
    scalars = dict(
        temperature=np.float32(1.0 if greedy else temperature),
        top_p=np.float32(1.0 if top_p is None else top_p),
        eos=np.asarray(eos + [-1] * (MAX_EOS_IDS - len(eos)), np.int32),
        max_new=np.int32(max_new_tokens),
        seed=np.uint32(seed % (1 << 32)),
    )
    new_bucket = pow2_at_least(max_new_tokens, MIN_BUCKET)
    prompts_per_chunk = max(1, (batch_size or 64) // nrs)

    graphdef, state = nnx.split(model)
    if mesh is not None:
        state = shd.place_state(state, mesh)
    else:
        mesh = shd.mesh_of(state, shd.make_mesh(devices=jax.devices()[:1]))
    tokens_out: list[np.ndarray] = []
    reasons: list[str] = []
    with jax.set_mesh(mesh):
        for start in range(0, len(prompt_ids), prompts_per_chunk):
            chunk = prompt_ids[start : start + prompts_per_chunk]
            toks, done = _run_chunk(graphdef, state, spec, model.dtype, chunk, start, nrs, new_bucket, mode, scalars)
            tokens_out += toks
            reasons += done
    texts = []
    for toks, reason in zip(tokens_out, reasons):
        body = toks[:-1] if reason == "eos" else toks
        texts.append(tokenizer.decode(body.tolist(), skip_special_tokens=skip_special_tokens))
    if not return_tokens:
        return texts
    return GenerationResult(
        texts=texts, tokens=tokens_out, prompt_tokens=[np.asarray(prompt_ids[r // nrs]) for r in range(len(texts))],
        finish_reasons=reasons, num_return_sequences=nrs,
    )


def _eos_ids(spec, tokenizer) -> list[int]:
    ids: list[int] = []
    for value in (getattr(tokenizer, "eos_token_id", None), spec.eos_token_id):
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None and int(v) not in ids:
                ids.append(int(v))
    return ids


def _run_chunk(graphdef, state, spec, dtype, chunk, first_prompt, nrs, new_bucket, mode, scalars):
    """Right-pad the chunk's prompts to their bucket, run the program, cut each row at its EOS or budget."""

    longest = max(len(p) for p in chunk)
    enc_bucket = pow2_at_least(longest, MIN_BUCKET)
    rows = pow2_at_least(len(chunk) * nrs)
    ids = np.full((rows, enc_bucket), spec.pad_token_id, np.int32)
    mask = np.zeros((rows, enc_bucket), np.int32)
    for i, p in enumerate(chunk):
        for j in range(nrs):
            ids[i * nrs + j, : len(p)] = p
            mask[i * nrs + j, : len(p)] = 1
    # Filler rows get one token so their softmax is well defined; their outputs are dropped.
    mask[len(chunk) * nrs :, 0] = 1
    row_ids = np.arange(rows, dtype=np.int32) + first_prompt * nrs
    key = (graphdef, _signature(state), spec, str(dtype), rows, enc_bucket, new_bucket, mode)
    program = _PROGRAMS.get(key)
    args = (state, ids, mask, row_ids, scalars)
    if program is None:
        _COMPILES["seq2seq"] += 1
        program = jax.jit(_make_program(graphdef, spec, dtype, new_bucket, mode)).lower(*args).compile()
        _PROGRAMS[key] = program
    tokens, lengths, finished = jax.device_get(program(*args))
    out, reasons = [], []
    for r in range(len(chunk) * nrs):
        out.append(np.asarray(tokens[r, : int(lengths[r])], np.int64))
        reasons.append("eos" if finished[r] else "length")
    return out, reasons


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, stacklevel=3)


def _signature(state) -> tuple:
    return tuple((tuple(x.shape), str(x.dtype), str(getattr(x, "sharding", ""))) for x in jax.tree.leaves(state))


def _make_program(graphdef, spec, dtype, new_bucket: int, mode: tuple):
    def program(state, ids, mask, row_ids, a):
        model = nnx.merge(graphdef, state)
        enc = model.encode(ids, mask)  # once
        cache = model.init_cache(enc, new_bucket, dtype)  # cross-attention K/V: once
        rows = ids.shape[0]
        keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.PRNGKey(a["seed"]), r))(row_ids)

        def cond(st):
            return (st["t"] < a["max_new"]) & ~jnp.all(st["done"])

        def body(st):
            t = st["t"]
            hidden, new_cache = model.decode_step(st["token"][:, None], st["cache"], t, mask)
            logits = model.logits(hidden)[:, 0]
            nxt = sample(logits.astype(jnp.float32), keys, jnp.full((rows,), t, jnp.int32), Mode(*mode),
                         a["temperature"], a["top_p"])  # the decoder engine's sampling
            nxt = jnp.where(st["done"], 0, nxt)
            tokens = st["tokens"].at[:, t].set(nxt)
            is_eos = jnp.any(nxt[:, None] == a["eos"][None, :], axis=-1) & ~st["done"]
            lengths = jnp.where(st["done"], st["lengths"], t + 1)
            return dict(t=t + 1, token=nxt, cache=new_cache, tokens=tokens, lengths=lengths,
                        done=st["done"] | is_eos, finished=st["finished"] | is_eos)

        st = dict(
            t=jnp.int32(0), token=jnp.full((rows,), spec.decoder_start_token_id, jnp.int32), cache=cache,
            tokens=jnp.zeros((rows, new_bucket), jnp.int32), lengths=jnp.zeros((rows,), jnp.int32),
            done=jnp.zeros((rows,), bool), finished=jnp.zeros((rows,), bool),
        )
        st = jax.lax.while_loop(cond, body, st)
        return st["tokens"], st["lengths"], st["finished"]

    return program
