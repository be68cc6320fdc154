"""The layers import only downwards: a table of allowed imports, checked on every module's AST.

core < shard < engine < discovery < placement < dataplane; gateway speaks HTTP over core and engine
types only; node composes (the only package importing both gateway and the data plane).
"""

from __future__ import annotations

import ast

import pytest
from conftest import REPO

ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "shard": {"core"},
    "engine": {"core", "shard"},
    "discovery": {"core", "shard"},  # shard.spec: the layer-range type of adverts
    "placement": {"core", "discovery"},
    "dataplane": {"core", "shard", "engine", "discovery", "placement"},
    "gateway": {"core", "engine"},
    "node": {"core", "shard", "engine", "discovery", "placement", "dataplane", "gateway"},
    "simulations": {"core", "discovery", "placement", "dataplane"},
}


def _imported_packages(path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & set(ALLOWED)


MODULES = sorted((pkg, path) for pkg in ALLOWED for path in (REPO / pkg).rglob("*.py"))


@pytest.mark.parametrize(("package", "path"), MODULES, ids=[str(p.relative_to(REPO)) for _, p in MODULES])
def test_imports_only_downwards(package, path):
    upward = _imported_packages(path) - ALLOWED[package] - {package}
    assert not upward, f"{path.relative_to(REPO)} imports {sorted(upward)}: {package} may import {sorted(ALLOWED[package])}"


def test_only_node_imports_both_gateway_and_the_data_plane():
    assert [pkg for pkg, allowed in ALLOWED.items() if {"gateway", "dataplane"} <= allowed] == ["node"]
