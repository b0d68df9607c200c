"""Lay the source tree out as the installed package, with links: pyproject.toml maps
``defocus_vlm.kernels`` to ``kernels/`` (and so on), which a plain PYTHONPATH cannot express, and the
GPU machine has no project install. Usage: ``python mirror_package.py DEST``; then put DEST on
PYTHONPATH. Each package becomes a real folder holding links to its files and to its non-package
folders (data such as configs/classification/); the code that runs is always the tree's own."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10: the same parser under its PyPI name
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]


def source_dir(package: str, mapping: dict[str, str]) -> Path:
    """Where setuptools takes ``package`` from: its longest mapped prefix, then plain folders."""
    parts = package.split(".")
    for i in range(len(parts), -1, -1):
        prefix = ".".join(parts[:i])
        if prefix in mapping:
            return REPO / mapping[prefix] / Path(*parts[i:])
    return REPO / Path(*parts)


def mirror(dest: Path) -> list[str]:
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages, mapping = tool["packages"], tool.get("package-dir", {})
    shutil.rmtree(dest, ignore_errors=True)
    for package in sorted(packages, key=lambda p: p.count(".")):
        src, target = source_dir(package, mapping), dest / Path(*package.split("."))
        if not (src / "__init__.py").is_file():
            raise SystemExit(f"mirror_package: {package} maps to {src}, which has no __init__.py")
        target.mkdir(parents=True, exist_ok=False)
        subpackages = {p.split(".")[-1] for p in packages if p.rsplit(".", 1)[0] == package and "." in p}
        for entry in src.iterdir():
            if entry.name in subpackages or entry.name == "__pycache__":
                continue  # a subpackage gets its own folder, from wherever it is mapped
            (target / entry.name).symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
    return packages


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    done = mirror(Path(sys.argv[1]).resolve())
    print(f"mirror_package: {len(done)} packages under {sys.argv[1]}")
