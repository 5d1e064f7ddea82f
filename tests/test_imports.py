"""The import direction of ../shared/ARCHITECTURE.md, checked on the source of every module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("data", "envs", "policies", "rl", "deploy", "cli")
ALLOWED = {
    "data": set(),
    "envs": {"data"},
    "policies": {"data", "envs"},
    "rl": {"policies", "envs", "data"},
    "deploy": {"policies", "envs", "data"},
    "cli": set(PACKAGES) - {"cli"},
}
DEPLOY_FORBIDDEN = {"hydra", "omegaconf", "wandb", "policies.train"}


def imports_of(package: str) -> dict[str, set[str]]:
    found = {}
    for path in (ROOT / package).rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
        found[str(path.relative_to(ROOT))] = names
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_import_direction(package):
    for path, names in imports_of(package).items():
        ours = {n.split(".")[0] for n in names} & set(PACKAGES)
        bad = ours - ALLOWED[package] - {package}
        assert not bad, f"{path} imports {sorted(bad)}; {package} may import only {sorted(ALLOWED[package])}"


def test_deploy_never_imports_training_hydra_or_wandb():
    for path, names in imports_of("deploy").items():
        bad = {n for n in names if any(n == f or n.startswith(f + ".") for f in DEPLOY_FORBIDDEN)}
        assert not bad, f"{path} imports {sorted(bad)}"


def test_envs_pusht_does_not_need_torch():
    # Simulator workers import envs.pusht; keeping torch out of it keeps worker start-up fast and light.
    assert not any(n.split(".")[0] == "torch" for n in imports_of("envs")["envs/pusht.py"])
