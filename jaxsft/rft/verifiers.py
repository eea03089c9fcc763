"""Verifiers for the rft command: a reply and the reference answer in, a reward out (correct when > 0).

Built-in: ``exact``, ``last-number``, ``contains``, ``regex:PATTERN``; or ``module:function`` for your
own, a function ``(reply: str, answer: str) -> bool | float`` importable from the current folder
or the Python path. :func:`get_verifier` resolves and checks a spec before any model loads.
"""

from __future__ import annotations

import importlib
import math
import re
import sys
from typing import Callable

from jaxsft.rft.tasks import check

Verifier = Callable[[str, str], float]
BUILT_IN = ("exact", "last-number", "contains", "regex:PATTERN", "module:function")
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")


class VerifierError(ValueError):
    """A --verifier spec that cannot be used; the message says why and what to pass."""


def last_number(text: str) -> float | None:
    """The last number written in ``text`` (thousands commas allowed, one decimal point), or None."""
    found = _NUMBER.findall(text)
    return float(found[-1].replace(",", "")) if found else None


def exact(reply: str, answer: str) -> float:
    """The reply, stripped of surrounding space and one trailing period, is the answer."""
    return float(check(reply, answer.strip()))


def last_number_matches(reply: str, answer: str) -> float:
    """The last number in the reply equals the answer's number (GSM8K-style: "23 + 45 = 68" passes for 68)."""
    got, want = last_number(reply), last_number(answer)
    return float(got is not None and want is not None and math.isclose(got, want, rel_tol=0, abs_tol=1e-9))


def contains(reply: str, answer: str) -> float:
    """The answer (stripped) appears in the reply."""
    return float(answer.strip() in reply)


def regex(pattern: str) -> Verifier:
    """The first match of ``pattern`` in the reply (its first group, if it has one), stripped, is the answer."""
    compiled = re.compile(pattern)

    def verify(reply: str, answer: str) -> float:
        match = compiled.search(reply)
        if match is None:
            return 0.0
        found = match.group(1) if compiled.groups else match.group(0)
        return float((found or "").strip() == answer.strip())

    verify.__name__ = f"regex:{pattern}"
    return verify


def get_verifier(spec: str) -> Verifier:
    """The verifier a ``--verifier`` spec names; a :class:`VerifierError` says what is wrong."""
    if spec == "exact":
        return exact
    if spec == "last-number":
        return last_number_matches
    if spec == "contains":
        return contains
    if spec.startswith("regex:"):
        pattern = spec[len("regex:"):]
        if not pattern:
            raise VerifierError("regex: needs a pattern, e.g. regex:'answer: (\\S+)'")
        try:
            return regex(pattern)
        except re.error as err:
            raise VerifierError(f"the pattern {pattern!r} is not a regular expression: {err}") from None
    if ":" in spec:
        module_name, _, name = spec.partition(":")
        if "" not in sys.path and "." not in sys.path:
            sys.path.insert(0, "")  # the user's own module in the current folder
        try:
            module = importlib.import_module(module_name)
        except Exception as err:  # ImportError, or the module's own error
            raise VerifierError(f"cannot import {module_name!r} ({type(err).__name__}: {err}); run from the folder "
                                "that holds it or put it on PYTHONPATH") from None
        function = getattr(module, name, None)
        if not callable(function):
            raise VerifierError(f"{module_name} has no function {name!r}")
        return function
    raise VerifierError(f"unknown verifier; use one of: {', '.join(BUILT_IN)}")


def reward(verifier: Verifier, reply: str, answer: str, finish_reason: str = "eos") -> float:
    """The verifier's reward as a float; a reply cut by the token budget never passes (0)."""
    if finish_reason == "length":
        return 0.0
    value = verifier(reply, answer)
    if isinstance(value, bool) or isinstance(value, (int, float)):
        value = float(value)
        return value if math.isfinite(value) else 0.0
    raise TypeError(f"the verifier {getattr(verifier, '__name__', verifier)!r} returned {type(value).__name__}; "
                    "it must return a bool or a number (the reward: > 0 counts as correct)")
