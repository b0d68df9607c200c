"""The import layering holds: kernels <- encoders <- models <- data <- training / eval <- CLI.

Every module of the package is parsed (not imported) and each ``import`` of another ``defocus_vlm``
module, at any depth (lazy imports inside functions count too), must point to its own layer or one
below. training and eval share a layer, but only training may use eval (its evaluation hooks call the
evaluators); eval never imports training, so the two cannot form a cycle."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("kernels", "encoders", "models", "data", "training", "eval", "cli")
RANK = {"kernels": 0, "encoders": 1, "models": 2, "data": 3, "training": 4, "eval": 4, "cli": 5}
# Top-level modules of defocus_vlm that sit above the models: the command line and the benchmarks.
CLI_MODULES = ("cli", "commands", "demo", "config_reference", "gpu_check", "bench")


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "defocus_vlm":
        return None
    if len(parts) == 1:
        return "models"
    if parts[1] in ("kernels", "encoders", "data", "training", "eval"):
        return parts[1]
    return "cli" if parts[1] in CLI_MODULES else "models"


def package_modules() -> dict[str, Path]:
    """Module name -> file, following pyproject's package-dir mapping."""
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = {package: ROOT / setup.get("package-dir", {}).get(package, package.replace(".", "/"))
            for package in setup["packages"]}
    modules = {}
    for package, folder in dirs.items():
        for path in folder.glob("*.py"):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            modules[name] = path
    return modules


def imports_of(module: str, path: Path) -> list[str]:
    package = module if path.stem == "__init__" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                found.append(".".join(base + ([node.module] if node.module else [])))
            else:
                found.append(node.module or "")
    return found


def upward_imports() -> list[str]:
    bad = []
    for module, path in sorted(package_modules().items()):
        source = layer_of(module)
        for target in imports_of(module, path):
            to = layer_of(target)
            if source is None or to is None:
                continue
            if RANK[to] > RANK[source] or (source == "eval" and to == "training"):
                bad.append(f"{module} ({source}) imports {target} ({to})")
    return bad


def test_the_package_is_found():
    modules = package_modules()
    layers = {layer_of(name) for name in modules}
    assert set(LAYERS) <= layers, f"layers without modules: {set(LAYERS) - layers}"
    assert len(modules) > 60


def test_imports_point_downward_only():
    assert upward_imports() == []


@pytest.mark.parametrize("module, target, upward", [
    ("defocus_vlm.kernels.attention", "defocus_vlm.encoders.model", True),
    ("defocus_vlm.modeling_clip", "defocus_vlm.training.loop", True),
    ("defocus_vlm.eval.vqa", "defocus_vlm.training.config", True),
    ("defocus_vlm.training.clip", "defocus_vlm.eval.zeroshot", False),
    ("defocus_vlm.commands.train", "defocus_vlm.training", False),
    ("defocus_vlm.data.vqa", "defocus_vlm.constants", False),
])
def test_the_rule_itself(module, target, upward):
    source, to = layer_of(module), layer_of(target)
    assert (RANK[to] > RANK[source] or (source == "eval" and to == "training")) == upward


def test_each_package_is_listed_once():
    """Two branches adding the same package left it twice in pyproject, which the GPU check's package
    mirror (benchmarks/gpu/mirror_package.py) refuses."""
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert len(packages) == len(set(packages)), sorted(p for p in packages if packages.count(p) > 1)
