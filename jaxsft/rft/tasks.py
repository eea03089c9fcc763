"""Tasks with exact programmatic verifiers for the expert-iteration demo.

A task makes prompts (chat messages) with known answers and checks a model's
reply programmatically. A reply cut off by the token budget (no EOS) never
passes. Two verifiers:

* ``"number"``: the last integer in the reply equals the answer (GSM8K-style
  extraction, so "23 + 45 = 68" and "68" both pass, "The answer is 67" fails);
* ``"exact"``: the reply, stripped of surrounding whitespace and one trailing
  period, equals the answer string.
"""

from __future__ import annotations

import dataclasses
import random
import re
from typing import Callable, Optional

__all__ = ["Problem", "Task", "TASKS", "get_task", "check", "last_integer"]

_INT = re.compile(r"-?\d+")


@dataclasses.dataclass(frozen=True)
class Problem:
    question: str  # the user message
    answer: str  # the exact expected reply

    def messages(self, system: str | None = None) -> list[dict]:
        msgs = [{"role": "system", "content": system}] if system else []
        return msgs + [{"role": "user", "content": self.question}]


def check(completion: str, answer: str) -> bool:
    """The exact verifier: the reply, stripped of surrounding whitespace and one trailing period, equals ``answer``."""
    text = completion.strip()
    if text.endswith("."):
        text = text[:-1].rstrip()
    return text == answer


def last_integer(completion: str) -> Optional[str]:
    """The last integer written in ``completion`` (digits with an optional minus sign), or None."""
    found = _INT.findall(completion)
    return str(int(found[-1])) if found else None


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    description: str
    make: Callable[[random.Random], Problem]
    max_new_tokens: int = 16
    system: str | None = "You are a concise assistant."
    verifier: str = "exact"  # "exact" | "number"

    def verify(self, completion: str, problem: Problem, finish_reason: str = "eos") -> bool:
        """True when a finished reply (EOS, or a stop string) is right for ``problem``."""
        if finish_reason == "length":
            return False
        if self.verifier == "number":
            return last_integer(completion) == problem.answer
        return check(completion, problem.answer)

    def problems(self, n: int, seed: int, exclude: set[str] = frozenset()) -> list[Problem]:
        """``n`` distinct problems (none of whose questions are in ``exclude``)."""
        rng = random.Random(seed)
        out: list[Problem] = []
        seen = set(exclude)
        for _ in range(n * 200):
            p = self.make(rng)
            if p.question not in seen:
                seen.add(p.question)
                out.append(p)
                if len(out) == n:
                    return out
        raise ValueError(f"task {self.name!r} cannot make {n} distinct problems")

    def split(self, n_train: int, n_eval: int, seed: int) -> tuple[list[Problem], list[Problem]]:
        """Disjoint train and held-out problem sets."""
        held_out = self.problems(n_eval, seed + 1)
        train = self.problems(n_train, seed, exclude={p.question for p in held_out})
        return train, held_out

    def prompts(self, problems: list[Problem]) -> list[list[dict]]:
        return [p.messages(self.system) for p in problems]


def _addition(lo: int, hi: int) -> Callable[[random.Random], Problem]:
    def make(rng: random.Random) -> Problem:
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        return Problem(f"What is {a} + {b}? Reply with just the number.", str(a + b))

    return make


def _subtraction(rng: random.Random) -> Problem:
    a, b = sorted(rng.sample(range(10, 100), 2), reverse=True)
    return Problem(f"What is {a} - {b}? Reply with just the number.", str(a - b))


def _successor(rng: random.Random) -> Problem:
    n = rng.randint(10, 989)
    return Problem(f"What number comes right after {n}? Reply with just the number.", str(n + 1))


_WORDS = (
    "apple river stone cloud tiger pencil garden window candle rocket violin planet forest bottle mirror "
    "ladder orange silver winter basket dragon jacket island lemon marble needle ocean pepper rabbit saddle"
).split()


def _last_word(rng: random.Random) -> Problem:
    words = rng.sample(_WORDS, 4)
    return Problem(f"What is the last word in this list: {', '.join(words)}? Reply with just the word.", words[-1])


def _reverse3(rng: random.Random) -> Problem:
    words = rng.sample(_WORDS, 3)
    return Problem(
        f"Reverse the order of these words: {' '.join(words)}. Reply with just the reversed words.",
        " ".join(reversed(words)),
    )


def _sort3(rng: random.Random) -> Problem:
    nums = rng.sample(range(1, 100), 3)
    return Problem(
        f"Sort these numbers from smallest to largest: {', '.join(map(str, nums))}. Reply with just the sorted "
        "numbers, separated by commas.",
        ", ".join(map(str, sorted(nums))),
    )


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("add", "two-digit addition (last number in the reply)", _addition(10, 99), 16, verifier="number"),
        Task("add_small", "addition of numbers 10-49 (last number in the reply)", _addition(10, 49), 16,
             verifier="number"),
        Task("add1", "single-digit addition (last number in the reply)", _addition(0, 9), 16, verifier="number"),
        Task("sub", "two-digit subtraction (last number in the reply)", _subtraction, 16, verifier="number"),
        Task("successor", "the number after n (last number in the reply)", _successor, 16, verifier="number"),
        Task("add_exact", "two-digit addition, reply exactly the number", _addition(10, 99), 8),
        Task("sort3", "sort three numbers, exact reply", _sort3, 16),
        Task("reverse3", "reverse three words, exact reply", _reverse3, 16),
        Task("last_word", "last word of a list, exact reply", _last_word, 8),
    )
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of: {', '.join(TASKS)}")
    return TASKS[name]
