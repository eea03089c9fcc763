"""Keep rules: which of a prompt's correct samples are trained on.

Only correct samples (reward > 0) are kept, and never one already kept for the same prompt
(replies that differ only in surrounding space or a final period count as one).
- ``all``: every such sample;
- ``first``: the first such sample of each prompt (one per prompt);
- ``top:K``: the K highest-reward such samples of each prompt (ties in sampling order).
"""

from __future__ import annotations

from typing import Sequence


class KeepRuleError(ValueError):
    pass


def parse_keep(spec: str) -> tuple[str, int]:
    """``("all", 0)``, ``("first", 1)`` or ``("top", K)`` from a --keep spec."""
    if spec in ("all", "first"):
        return spec, 0 if spec == "all" else 1
    if spec.startswith("top:"):
        try:
            k = int(spec[4:])
        except ValueError:
            k = 0
        if k >= 1:
            return "top", k
        raise KeepRuleError(f"top:K needs a whole number K >= 1, e.g. top:2")
    raise KeepRuleError("use all, first or top:K (e.g. top:2)")


def normalise(reply: str) -> str:
    """Replies that differ only in surrounding space or a final period count as one sample."""
    text = reply.strip()
    return text[:-1].rstrip() if text.endswith(".") else text


def select(rule: tuple[str, int], replies: Sequence[str], rewards: Sequence[float], seen: set[str]) -> list[int]:
    """Indices (into ``replies``) of the samples to keep for one prompt; adds their normalised text to ``seen``."""
    name, k = rule
    candidates = [i for i, r in enumerate(rewards) if r > 0]
    if name == "top":
        candidates.sort(key=lambda i: -rewards[i])  # stable: ties keep sampling order
    kept: list[int] = []
    for i in candidates:
        text = normalise(replies[i])
        if text in seen:
            continue
        seen.add(text)
        kept.append(i)
        if name != "all" and len(kept) == k:
            break
    return kept
