"""Chat messages → the exact strings the tokenizer's chat template writes, for generate and for step.

``generate`` formats a chat prompt with :func:`prompt_text`; ``step(texts=chats,
texts_labels=replies)`` formats the same prompt the same way and the reply as the
assistant turn that follows it (:func:`assistant_turn`), so training sees exactly
the tokens generation produced and stops where generation stops.
"""

from __future__ import annotations

from typing import Any, Sequence

Messages = Sequence[dict]


def is_chat(value: Any) -> bool:
    """A chat is a list (or tuple) of message dicts; a string is not."""
    return isinstance(value, (list, tuple)) and all(isinstance(m, dict) for m in value) and len(value) > 0


def check_messages(messages: Any, name: str) -> list[dict]:
    """The messages as a list, or a TypeError naming ``name`` when they are not ``{'role', 'content'}`` dicts."""
    if not is_chat(messages) or not all("role" in m and "content" in m for m in messages):
        raise TypeError(
            f"{name} must be a string or a non-empty list of {{'role': ..., 'content': ...}} messages, got {messages!r}."
        )
    return list(messages)


def _require_template(tokenizer: Any, name: str) -> None:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"{name} is a chat (list of messages) but the tokenizer has no chat_template; pass plain strings.")


def prompt_text(tokenizer: Any, messages: Messages, name: str = "prompt") -> str:
    """The chat formatted for the model to answer next (the template's generation prompt appended)."""
    _require_template(tokenizer, name)
    return tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)


def assistant_turn(tokenizer: Any, messages: Messages, reply: str, name: str = "texts") -> str:
    """What the template writes after :func:`prompt_text` when the assistant answers ``reply``.

    That is the reply plus the template's end-of-turn marker. Text after the last EOS token
    (e.g. ChatML's newline after ``<|im_end|>``) is dropped: generation stops at EOS, so the
    model never produces it and should not learn it.
    """
    prompt = prompt_text(tokenizer, messages, name)
    full = tokenizer.apply_chat_template(
        list(messages) + [{"role": "assistant", "content": reply}], tokenize=False
    )
    if not full.startswith(prompt):
        raise ValueError(
            f"{name}: the tokenizer's chat template does not write the assistant reply after its generation prompt, "
            "so the reply tokens cannot be found; pass strings (texts=prompt strings, texts_labels=replies)."
        )
    turn = full[len(prompt):]
    eos = getattr(tokenizer, "eos_token", None)
    if eos and eos in turn:
        turn = turn[: turn.rindex(eos) + len(eos)]
    return turn
