"""Every module of every package imports cleanly on its own (no cycles, no import-time side effects)."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

import pytest
from conftest import REPO

PACKAGES = ["core", "node", "discovery", "placement", "shard", "engine", "dataplane", "gateway", "simulations"]
MODULES = sorted(
    f"{pkg}.{info.name}"
    for pkg in PACKAGES
    for info in pkgutil.walk_packages([str(REPO / pkg.replace(".", "/"))])
)


@pytest.mark.parametrize("module", MODULES)
def test_module_imports(module):
    importlib.import_module(module)


def test_a_gateway_only_node_does_not_import_torch_or_llama_cpp():
    code = "import sys, node.daemon, node.cli; print(sorted(m for m in ('torch', 'llama_cpp') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
