"""The module boundaries docs/ARCHITECTURE.md promises, checked on the source (static, no compilation).

* compat/ converts and keeps TRL's conventions: no optax, no jit or jax.numpy, no batching or padding code.
* jaxsft/ imports torch in one optional bridge module only.
* no import cycle between jaxsft modules at import time.
* no module reads another module's private names through the objects it is handed.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _sources(package: str) -> dict[str, ast.Module]:
    return {str(p.relative_to(ROOT)): ast.parse(p.read_text()) for p in sorted((ROOT / package).rglob("*.py"))}


def _imports(tree: ast.AST) -> set[str]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def test_compat_holds_no_optimizer_jit_or_batching_code():
    banned_modules = re.compile(r"^(optax|jax\.numpy|jaxsft\.step|jaxsft\.sharding|jaxsft\.batching\.plan)(\.|$)")
    banned_calls = {"jit", "pmap", "shard_map", "pad", "place_batch", "plan_microbatches", "group_into_updates"}
    problems = []
    for path, tree in _sources("compat").items():
        problems += [f"{path}: imports {m}" for m in sorted(_imports(tree)) if banned_modules.match(m)]
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in banned_calls:
                problems.append(f"{path}:{node.lineno}: uses .{node.attr}")
    assert not problems, problems


def test_torch_is_imported_by_the_bridge_only():
    offenders = [
        path for path, tree in _sources("jaxsft").items()
        if path != "jaxsft/torch_bridge.py" and any(m == "torch" or m.startswith("torch.") for m in _imports(tree))
    ]
    assert offenders == []


def test_no_import_cycle_at_import_time():
    modules = {
        path[:-3].replace("/", "."): tree for path, tree in _sources("jaxsft").items() if not path.endswith("__init__.py")
    }

    def top_level(tree: ast.Module) -> set[str]:
        found = set()
        for node in tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found |= _imports(node)
        return {m for m in found if m in modules}

    graph = {name: top_level(tree) - {name} for name, tree in modules.items()}
    state: dict[str, int] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in graph[name]:
            assert state.get(dep) != 1, f"import cycle: {' -> '.join(path + [dep])}"
            if dep not in state:
                visit(dep, path + [dep])
        state[name] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])


def test_no_private_names_across_modules():
    """``other._x`` where ``other`` is a trainer, model, core or facade handed in (self._x is a module's own)."""
    foreign = re.compile(r"\b(trainer|core|facade|model|torch_model|jax_model)\._[a-z]\w*")
    problems = []
    for package in ("jaxsft", "compat"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#", 1)[0]
                for match in foreign.finditer(code):
                    problems.append(f"{path.relative_to(ROOT)}:{number}: {match.group(0)}")
    allowed = {  # same module: the facade's own helpers reading the facade
        "compat/trainer.py": {"trainer._torch_model", "trainer._sync_torch_model"},
    }
    problems = [p for p in problems if p.split(": ", 1)[1] not in allowed.get(p.split(":", 1)[0], set())]
    assert not problems, problems
