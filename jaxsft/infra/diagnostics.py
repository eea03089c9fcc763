"""Read a compiled program's cross-device traffic: which collectives XLA emitted, their bytes, and where.

Why: scaling is decided by how many bytes cross devices per update and whether that traffic sits
inside the layer loop (where it can overlap the backward pass) or after it (where it cannot). Tests
use this to pin layouts (e.g. that the embedding gradient is never all-reduced densely);
``benchmarks/collectives.py`` prints it for a trainer's real update program.
"""

from __future__ import annotations

import re
from collections import defaultdict

_COLLECTIVE = re.compile(
    r"^\s*(?:ROOT\s+)?%[\w.\-]+\s*=\s*(?P<types>.*?)\s(?P<op>all-reduce-start|all-reduce|reduce-scatter|"
    r"all-gather-start|all-gather|all-to-all|collective-permute-start|collective-permute)\("
)
_ARRAY = re.compile(r"(pred|s8|u8|s16|u16|bf16|f16|s32|u32|f32|s64|u64|f64)\[([0-9,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8}


def _array_bytes(dtype: str, dims: str) -> int:
    count = 1
    for d in filter(None, dims.split(",")):
        count *= int(d)
    return count * _BYTES[dtype]


def collectives(hlo_text: str) -> list[dict]:
    """One record per collective op in optimized HLO text (``compiled.as_text()``).

    Each has the op, its result bytes, dtypes, array shapes, the JAX op it came from, the
    enclosing computation, and ``in_loop``: whether that computation is the body of a ``while``
    (a scanned layer loop). Async ``*-start`` ops are counted once, by their results.
    """
    loop_bodies = set(re.findall(r"\bbody=%?([\w.\-]+)", hlo_text))
    found, computation = [], "?"
    for line in hlo_text.splitlines():
        header = re.match(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if header and not line.startswith(" "):
            computation = ("ENTRY " if header.group(1) else "") + header.group(2)
            continue
        match = _COLLECTIVE.match(line)
        if not match:
            continue
        arrays = _ARRAY.findall(match.group("types"))
        op = match.group("op")
        if op.endswith("-start") and len(arrays) % 2 == 0 and arrays[: len(arrays) // 2] == arrays[len(arrays) // 2:]:
            arrays = arrays[: len(arrays) // 2]  # an async start's type lists (operands..., results...) of equal shapes
        elif op in ("all-gather-start", "collective-permute-start") and len(arrays) > 1:
            # (operands..., results...): count the results
            arrays = arrays[len(arrays) // 2:] if len(arrays) % 2 == 0 else arrays[1:]
        nbytes = sum(_array_bytes(dtype, dims) for dtype, dims in arrays)
        origin = re.search(r'op_name="([^"]*)"', line)
        found.append({"op": match.group("op").replace("-start", ""), "bytes": nbytes,
                      "dtypes": sorted({d for d, _ in arrays}), "computation": computation,
                      "in_loop": computation in loop_bodies,
                      "shapes": [f"{d}[{dims}]" for d, dims in arrays],
                      "origin": origin.group(1) if origin else ""})
    return found


def summarize(records: list[dict]) -> str:
    """A table of collectives grouped by op, place (loop body or computation) and dtype."""
    table = defaultdict(lambda: [0, 0])
    for r in records:
        where = "loop body (per iteration)" if r["in_loop"] else r["computation"]
        key = (r["op"], where, ",".join(r["dtypes"]))
        table[key][0] += 1
        table[key][1] += r["bytes"]
    lines = [f"{'op':<20}{'where':<40}{'dtypes':<12}{'count':>6}{'MB':>10}"]
    for (op, where, dtypes), (count, nbytes) in sorted(table.items(), key=lambda kv: -kv[1][1]):
        lines.append(f"{op:<20}{where[:39]:<40}{dtypes:<12}{count:>6}{nbytes / 1e6:>10.1f}")
    return "\n".join(lines)


def largest(records: list[dict], count: int = 5) -> str:
    """The ``count`` largest collectives with their array shapes and the JAX op they came from."""
    lines = []
    for r in sorted(records, key=lambda r: -r["bytes"])[:count]:
        shapes = ", ".join(r["shapes"][:12]) + (" ..." if len(r["shapes"]) > 12 else "")
        lines.append(f"{r['op']} {r['bytes'] / 1e6:.1f} MB {'in loop' if r['in_loop'] else r['computation']}: {shapes}\n"
                     f"    from {r['origin'][:300]}")
    return "\n".join(lines)


def update_program_text(trainer, rows: int, length: int) -> str:
    """Optimized HLO of ``trainer``'s one-micro-batch update for a [rows, length] batch (compiled, not run).

    ``rows`` is the global micro-batch (``trainer.rows``); the program is the one ``step()`` would
    run with gradient_accumulation_steps == 1, with the trainer's shardings and XLA options.
    """
    import numpy as np

    from jaxsft.infra import sharding as shd

    ids = np.ones((rows, length), np.int32)
    batch = {"input_ids": shd.place_batch(ids, trainer.mesh), "labels": shd.place_batch(ids, trainer.mesh)}
    return trainer.compile_update(batch).as_text()
