"""Host-side text <-> tokens for generation: prompts in (strings, chats, token ids), stop strings out."""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import numpy as np

from jaxsft.infra import chat as chat_format
from jaxsft.generation.params import is_int

Prompt = Union[str, Sequence[dict], Sequence[int]]


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


def is_chat(prompt: Any) -> bool:
    return isinstance(prompt, (list, tuple)) and bool(prompt) and all(isinstance(m, dict) for m in prompt)


def _token_prompt(prompt: Any) -> Optional[list[int]]:
    """A prompt given as token ids (a list/tuple/1-D array of ints), else None."""
    if isinstance(prompt, np.ndarray) and prompt.ndim == 1 and np.issubdtype(prompt.dtype, np.integer):
        return [int(t) for t in prompt]
    if isinstance(prompt, (list, tuple)) and prompt and all(is_int(t) for t in prompt):
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
        elif isinstance(prompt, str) or is_chat(prompt):
            rest.append(i)
        else:
            raise TypeError(f"generate(): prompts[{i}]={prompt!r} must be a string, a chat (a list of "
                            "{'role': ..., 'content': ...} messages) or a non-empty list of token ids.")
    if rest:
        texts = format_prompts(tokenizer, [prompts[i] for i in rest], chat)
        chats = [chat or not isinstance(prompts[i], str) for i in rest]
        for i, ids in zip(rest, _tokenize(tokenizer, texts, chats)):
            out[i] = ids
    return out  # type: ignore[return-value]


def _tokenize(tokenizer: Any, texts: list[str], chats: list[bool]) -> list[list[int]]:
    out: list[Optional[list[int]]] = [None] * len(texts)
    for flag in (False, True):  # chat templates already hold their special tokens
        idx = [i for i, c in enumerate(chats) if c == flag]
        if not idx:
            continue
        ids = tokenizer([texts[i] for i in idx], add_special_tokens=not flag)["input_ids"]
        for i, row in zip(idx, ids):
            if len(row) == 0:
                raise ValueError(f"generate(): prompt {i} tokenizes to no tokens; give it some text.")
            out[i] = list(row)
    return out  # type: ignore[return-value]


def eos_ids(spec: Any, tokenizer: Any) -> list[int]:
    """The default EOS set: the tokenizer's EOS plus the model config's (in that order, no repeats)."""
    ids: list[int] = []
    for value in (getattr(tokenizer, "eos_token_id", None), spec.eos_token_id):
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None and int(v) not in ids:
                ids.append(int(v))
    return ids


def pad_id(tokenizer: Any, spec: Any, eos: Sequence[int]) -> int:
    """What finished rows are padded with: the tokenizer's pad, the model's, the first EOS, else 0."""
    for value in (getattr(tokenizer, "pad_token_id", None), spec.pad_token_id, eos[0] if eos else None):
        if value is not None:
            return int(value)
    return 0


def first_stop(text: str, stops: Sequence[str]) -> Optional[int]:
    """Where the earliest stop string starts in ``text`` (None: none occurs)."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def tokens_through_stop(tokenizer, toks: np.ndarray, stops, skip_special_tokens) -> np.ndarray:
    """The shortest prefix of ``toks`` whose decoding already contains a stop string (binary search)."""
    lo, hi = 1, len(toks)
    while lo < hi:
        mid = (lo + hi) // 2
        if first_stop(tokenizer.decode(toks[:mid].tolist(), skip_special_tokens=skip_special_tokens), stops) is None:
            lo = mid + 1
        else:
            hi = mid
    return toks[:lo]
