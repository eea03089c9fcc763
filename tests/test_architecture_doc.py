"""docs/ARCHITECTURE.md's module table lists every module and names only things that exist."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "ARCHITECTURE.md"


def table_rows() -> list[tuple[list[str], str]]:
    """(module paths named in the first column, the key-API column) per table row."""
    rows = []
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        names = re.findall(r"`([^`]+)`|(\b\w+\.py\b)", cells[0])
        paths, folder = [], None
        for quoted, bare in names:
            name = quoted or bare
            if "/" in name:
                folder = name.rsplit("/", 1)[0]
                paths.append(name)
            elif folder:
                paths.append(f"{folder}/{name}")
        rows.append((paths, cells[2]))
    return rows


def test_every_module_is_in_the_table():
    listed = {p for paths, _ in table_rows() for p in paths}
    modules = {str(p.relative_to(REPO)) for pkg in ("jaxsft", "compat") for p in (REPO / pkg).rglob("*.py")
               if p.name != "__init__.py"}
    assert sorted(modules - listed) == [], "modules missing from docs/ARCHITECTURE.md's table"
    assert sorted(listed - modules - {"compat/"}) == [], "the table names modules that do not exist"


def test_key_api_names_exist():
    missing = []
    for paths, api in table_rows():
        mods = [importlib.import_module(p[:-3].replace("/", ".")) for p in paths if p.endswith(".py")]
        if not mods:
            continue
        # a module-level name, or a method of a class the row's modules define (`CausalLM`'s `hidden_states`)
        owners = mods + [v for m in mods for v in vars(m).values() if isinstance(v, type)]
        owners += [importlib.import_module("jaxsft.training.trainer").IterativeSFTTrainer,  # `trainer.<method>` rows
                   importlib.import_module("jaxsft")]  # package-level names (`from_pretrained(base, adapter=)`)
        for token in re.findall(r"`([^`]+)`", api):
            name = re.match(r"([A-Za-z_]\w*)(\(|$)", token)
            if name and not any(hasattr(o, name.group(1)) for o in owners):
                missing.append(f"{', '.join(paths)}: {name.group(1)}")
    assert not missing, missing
