"""The rft command's data: JSONL files of prompts with reference answers, checked line by line before any model loads.

One JSON object a line: ``"prompt"`` (a string, used as given, or a list of chat messages, formatted
by the model's chat template) and ``"answer"`` (a string, what the verifier compares the reply with).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Union

Prompt = Union[str, list]


class DataError(ValueError):
    """A data file that cannot be used; the message names the argument, the line and the fix."""


@dataclasses.dataclass(frozen=True)
class Example:
    prompt: Prompt  # a string, or chat messages [{"role": ..., "content": ...}, ...]
    answer: str

    def key(self) -> str:
        """A stable identity of the prompt (for de-duplicating kept samples and for results files)."""
        return self.prompt if isinstance(self.prompt, str) else json.dumps(self.prompt, sort_keys=True)


def _check_messages(messages: list, where: str) -> None:
    if not messages:
        raise DataError(f"{where}: \"prompt\" is an empty list; give a string or chat messages")
    for m in messages:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise DataError(f"{where}: a chat message must be an object with string \"role\" and \"content\", "
                            f"got {json.dumps(m)[:80]}")


def parse_example(obj: Any, where: str) -> Example:
    """One line's object as an :class:`Example`, or a :class:`DataError` naming ``where``."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: each line must be a JSON object with \"prompt\" and \"answer\"")
    missing = [k for k in ("prompt", "answer") if k not in obj]
    if missing:
        raise DataError(f"{where}: missing {' and '.join(repr(k) for k in missing)} (each line needs \"prompt\" "
                        "and \"answer\")")
    prompt, answer = obj["prompt"], obj["answer"]
    if isinstance(prompt, list):
        _check_messages(prompt, where)
    elif not isinstance(prompt, str) or not prompt:
        raise DataError(f"{where}: \"prompt\" must be a non-empty string or a list of chat messages")
    if not isinstance(answer, str):
        raise DataError(f"{where}: \"answer\" must be a string, got {json.dumps(answer)[:40]}; write it in quotes")
    return Example(prompt, answer)


def load_jsonl(path: Union[str, Path], argument: str) -> list[Example]:
    """Every example of a JSONL file; any bad line raises a :class:`DataError` naming ``argument`` and the line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{argument} {path}: no such file; pass a JSONL file with one "
                        "{\"prompt\": ..., \"answer\": ...} object a line")
    examples = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{argument} {path} line {number}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: not JSON ({err.msg})") from None
            examples.append(parse_example(obj, where))
    if not examples:
        raise DataError(f"{argument} {path}: the file holds no examples")
    return examples
