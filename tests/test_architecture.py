"""The module boundaries docs/ARCHITECTURE.md promises, checked on the source (static, no compilation).

One declaration below (``LAYERS``, ``ALLOWED``, ``NEVER``) is the picture: which layer each module
belongs to, which layers it may import, and the finer bans. Every import counts, the ones inside
functions (late imports) too.

* every import follows an allowed arrow, and no import matches a ban;
* compat/ converts and keeps TRL's conventions: no optax, no jit or jax.numpy, no batching or padding code,
  no optimizer or schedule builder (the core builds both from compat's description);
* jaxsft/ imports torch in one optional bridge module only;
* no import cycle between modules, late imports included;
* every module imports first, before any other of the project's (a package's ``__init__`` can close a cycle
  the module graph does not show);
* no module reads another module's private names through the objects it is handed.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_compat_holds_no_jit_or_batching_calls():
    """Beyond the import bans (NEVER): no jit, sharding or padding call on whatever compat was handed."""
    banned_calls = {"jit", "pmap", "shard_map", "pad", "place_batch", "plan_microbatches", "group_into_updates"}
    problems = []
    for path, tree in _sources("compat").items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in banned_calls:
                problems.append(f"{path}:{node.lineno}: uses .{node.attr}")
    assert not problems, problems


def test_torch_is_imported_by_the_bridge_only():
    offenders = [
        path for path, tree in _sources("jaxsft").items()
        if path != "jaxsft/infra/torch_bridge.py" and any(m == "torch" or m.startswith("torch.") for m in _imports(tree))
    ]
    assert offenders == []


# ----------------------------------------------------------------------------- the declaration
# Layer -> module name prefixes (the longest matching prefix wins). "api" is the package's re-export file.
LAYERS = {
    "facade": ("compat",),
    "app": ("jaxsft.__main__", "jaxsft.rft", "jaxsft.testing"),
    "api": ("jaxsft.__init__",),
    "trainer": ("jaxsft.training.trainer", "jaxsft.training.programs", "jaxsft.training.train_state",
                "jaxsft.training.train_log", "jaxsft.training.callbacks", "jaxsft.training.argument_checks",
                "jaxsft.training.buffers"),
    "generation": ("jaxsft.generation",),
    # objectives, step, loss, optim, batching, agreement, fast_path
    "training": ("jaxsft.training",),
    # config, sharding, distributed, checkpoint, metrics, diagnostics, ...: they know the trainer only by shape
    # (checkpoint's Checkpointable protocol, metrics' callback hooks), never by import
    "infrastructure": ("jaxsft.infra",),
    "models": ("jaxsft.models", "jaxsft.kernels"),  # kernels: fused forms of the models' layer functions
}
# The arrows of the picture: which layers each layer may import (its own always). Data flows one way:
# facade -> trainer -> objectives/batching -> step -> models; generation beside the trainer.
ALLOWED = {
    "facade": {"api", "trainer", "generation", "training", "infrastructure", "models"},
    "app": {"api", "trainer", "generation", "training", "infrastructure", "models"},
    "api": {"trainer", "generation", "training", "infrastructure", "models"},
    "trainer": {"generation", "training", "infrastructure", "models", "api"},
    "generation": {"infrastructure", "models", "api"},
    "training": {"infrastructure", "models"},  # the jitted step runs the model (batching may not: see NEVER)
    "infrastructure": set(),
    "models": {"infrastructure", "api"},
}
# Finer bans (importer prefix, imported-module regex, why).
NEVER = (
    ("compat", r"^(optax|jax\.numpy|jaxsft\.training\.step|jaxsft\.infra\.sharding|jaxsft\.training\.batching\.plan)(\.|$)",
     "compat converts; it holds no optimizer, jit or batching code"),
    ("compat", r"^jaxsft\.training\.optim(\.|$)", "compat describes the optimizer and schedule; the core builds them"),
    ("jaxsft", r"^compat(\.|$)", "the core never reaches up into the facade"),
    ("jaxsft.training.batching", r"^(jax|flax|optax|jaxsft\.models)(\.|$)", "batching is host-side numpy, model-independent"),
    ("jaxsft.infra.config", r"^jaxsft\.models(\.|$)", "the config is plain values; the model reads it, not the reverse"),
    ("jaxsft.infra", r"^jaxsft\.(training|generation)(\.|$)",
     "the infrastructure stands under both sides: it imports neither the training side nor generation"),
)
ALLOWED_TOP_LEVEL_IMPORTS_OF_API = ("jaxsft.__init__",)  # ``import jaxsft`` inside a module: the api layer


def _module_name(path: str) -> str:
    return path[:-3].replace("/", ".")


def _all_modules() -> dict[str, ast.Module]:
    out = {}
    for package in ("jaxsft", "compat"):
        for path, tree in _sources(package).items():
            out[_module_name(path)] = tree
    return out


def _resolved_imports(name: str, tree: ast.Module, modules: set[str]) -> set[str]:
    """Every module ``name`` imports (any depth in the file), as module names present in ``modules``.

    ``from pkg import sub`` counts as importing ``pkg.sub`` when that is a module (the package's
    ``__init__`` runs first, but that is the package importing itself, not an arrow of the picture);
    ``import pkg`` / ``from pkg import name`` count as importing ``pkg.__init__``.
    """
    package = name.rsplit(".", 1)[0] if not name.endswith(".__init__") else name[: -len(".__init__")]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.add(alias.name if alias.name in modules else f"{alias.name}.__init__")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in modules:
                    found.add(sub)
                elif base in modules:
                    found.add(base)
                else:
                    found.add(f"{base}.__init__")
    return {m for m in found if m in modules} - {name}


def _import_graph() -> dict[str, set[str]]:
    modules = _all_modules()
    return {name: _resolved_imports(name, tree, set(modules)) for name, tree in modules.items()}


def _all_imported_names(tree: ast.Module) -> set[str]:
    """Every imported module name, third-party ones included (for the bans)."""
    return _imports(tree)


def _layer(module: str) -> str:
    best, layer = -1, None
    for name, prefixes in LAYERS.items():
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, layer = len(prefix), name
    assert layer is not None, f"{module} is in no layer of LAYERS; add it where it belongs"
    return layer


def test_every_import_follows_an_allowed_arrow():
    problems = []
    for importer, imported in _import_graph().items():
        source = _layer(importer)
        for dep in sorted(imported):
            target = _layer(dep)
            if target != source and target not in ALLOWED[source]:
                problems.append(f"{importer} ({source}) imports {dep} ({target})")
    assert not problems, problems


def test_no_import_matches_a_ban():
    problems = []
    for name, tree in _all_modules().items():
        for prefix, pattern, why in NEVER:
            if name == prefix or name.startswith(prefix + "."):
                problems += [f"{name} imports {m}: {why}" for m in sorted(_imports(tree)) if re.match(pattern, m)]
    assert not problems, problems


def test_the_infrastructure_ban_sees_what_it_must():
    """The infra ban catches a late import of the training side (the micro-batch agreement once lived in
    infra.distributed and reached into batching) and of generation, and leaves infra-to-infra imports alone."""
    (ban,) = [entry for entry in NEVER if entry[0] == "jaxsft.infra"]
    late = ast.parse("def f():\n    from jaxsft.training import batching\n    import jaxsft.generation.engine\n")
    assert sorted(m for m in _imports(late) if re.match(ban[1], m)) == [
        "jaxsft.generation.engine", "jaxsft.training", "jaxsft.training.batching"]
    assert not [m for m in _imports(ast.parse("from jaxsft.infra import distributed\n")) if re.match(ban[1], m)]
    assert _layer("jaxsft.infra.distributed") == _layer("jaxsft.infra.metrics") == "infrastructure"


def test_the_ban_check_sees_late_imports():
    """A function-level import is found like a top-level one (the bans and arrows would miss nothing)."""
    tree = ast.parse("def f():\n    from jaxsft.training.optim import make_optimizer\n")
    assert any(re.match(NEVER[1][1], m) for m in _imports(tree))
    graph = _resolved_imports("compat.x", tree, {"compat.x", "jaxsft.training.optim"})
    assert graph == {"jaxsft.training.optim"}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected group of modules (Tarjan), as a path."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


def test_no_import_cycle_late_imports_included():
    cycles = _cycles(_import_graph())
    assert not cycles, f"import cycles (late imports included): {cycles}"


def test_the_cycle_check_sees_a_late_import_cycle():
    a = ast.parse("import jaxsft.b\n")
    b = ast.parse("def f():\n    from jaxsft import a\n")
    modules = {"jaxsft.a", "jaxsft.b"}
    graph = {"jaxsft.a": _resolved_imports("jaxsft.a", a, modules), "jaxsft.b": _resolved_imports("jaxsft.b", b, modules)}
    assert _cycles(graph) == [["jaxsft.a", "jaxsft.b"]]


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


_IMPORT_EACH_FIRST = """
import importlib, pkgutil, sys
names = []
for package in ("jaxsft", "compat"):
    names += [package] + [m.name for m in pkgutil.walk_packages(importlib.import_module(package).__path__, package + ".")]
failed = []
for name in names:
    for loaded in [k for k in sys.modules if k.split(".")[0] in ("jaxsft", "compat")]:
        del sys.modules[loaded]  # jax, flax and torch stay loaded: only the project's own import order is tested
    try:
        importlib.import_module(name)
    except Exception as error:
        failed.append(f"{name}: {error!r}")
print(len(names))
print("\\n".join(failed))
"""


@pytest.mark.slow
def test_every_module_imports_first():
    """``python -c "import jaxsft.kernels.add_rms_norm"`` once failed: the kernel imported jaxsft.models.layers, whose
    package __init__ imports the decoder, which imports the kernel. The module graph above has no edge for a package's
    __init__, so this imports every module of jaxsft and compat first: in one fresh interpreter, each after clearing
    the project's modules from ``sys.modules`` (jax, flax and torch stay loaded)."""
    done = subprocess.run([sys.executable, "-c", _IMPORT_EACH_FIRST], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    count, *failed = done.stdout.strip().split("\n")
    assert int(count) > 80  # the walk found the packages' modules
    assert [line for line in failed if line] == []
