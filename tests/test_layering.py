"""The code's shape, held by test: imports flow one way, packages expose a chosen API,
and no module reaches into another's private names (DESIGN.md, "Layout")."""

from __future__ import annotations

import ast
import importlib
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Folder -> package, as pyproject's package-dir maps them (checked below).
FOLDERS = {
    "crossmodal": "xmodal.crossmodal",
    "indexer": "xmodal.indexer",
    "search": "xmodal.search",
    "web": "xmodal.web",
    "training": "xmodal.training",
    "xmodal": "xmodal",
}
# Which of our packages each may import (besides itself). Search reads bundles only
# through the indexer's bundle module; nothing at run time imports training.
ALLOWED = {
    "xmodal.crossmodal": set(),
    "xmodal.indexer": {"xmodal.crossmodal"},
    "xmodal.search": {"xmodal.crossmodal", "xmodal.indexer.bundle"},
    "xmodal.web": {"xmodal.crossmodal", "xmodal.search"},
    "xmodal.training": {"xmodal.crossmodal", "xmodal.search"},
    "xmodal": set(FOLDERS.values()),  # the CLI sits on top
}


def _modules() -> list[tuple[str, str, Path]]:
    """(package, module name, file) of every module we ship."""
    out = []
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            out.append((package, name, path))
    return out


def _package_of(target: str) -> str:
    """The package (in FOLDERS) a module name belongs to: the longest prefix."""
    best = ""
    for package in FOLDERS.values():
        if (target == package or target.startswith(package + ".")) and len(package) > len(best):
            best = package
    return best


def _imports(module: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(target module, imported names, line) of every ``from ... import`` of ours."""
    is_package = path.stem == "__init__"
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = module if is_package else module.rsplit(".", 1)[0]
                for _ in range(node.level - 1):
                    base = base.rsplit(".", 1)[0]
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            names = [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            target, names = "", []
            for alias in node.names:
                if alias.name.split(".")[0] == "xmodal":
                    out.append((alias.name, [], node.lineno))
            continue
        else:
            continue
        if target == "xmodal" or target.startswith("xmodal."):
            out.append((target, names, node.lineno))
    return out


def test_pyproject_maps_the_folders_into_one_namespace() -> None:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = {pkg: folder for pkg, folder in cfg["package-dir"].items()}
    for folder, package in FOLDERS.items():
        assert dirs[package] == folder
    assert all(p == "xmodal" or p.startswith("xmodal.") for p in cfg["packages"])


def test_imports_flow_one_way() -> None:
    bad = []
    for package, module, path in _modules():
        for target, names, line in _imports(module, path):
            tpkg = _package_of(target)
            if tpkg == package:
                continue
            allowed = ALLOWED[package]
            submodules = {f"{target}.{n}" for n in names}
            ok = tpkg in allowed or target in allowed or submodules & allowed
            if not ok:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {package} imports {target}")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_no_module_imports_another_modules_private_names() -> None:
    bad = []
    for _, module, path in _modules():
        for target, names, line in _imports(module, path):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and target != module:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {', '.join(private)} of {target}")
    assert not bad, "private names used across modules:\n" + "\n".join(bad)


@pytest.mark.parametrize("package", sorted(set(FOLDERS.values()) - {"xmodal"}))
def test_each_package_exposes_its_chosen_api(package: str) -> None:
    mod = importlib.import_module(package)
    assert mod.__all__, f"{package} names no public API"
    for name in mod.__all__:
        assert getattr(mod, name) is not None  # every exported name resolves


def test_other_packages_use_only_the_public_api() -> None:
    """A name imported from another package is one its ``__all__`` offers."""
    bad = []
    for package, module, path in _modules():
        for target, names, line in _imports(module, path):
            tpkg = _package_of(target)
            if tpkg in (package, "xmodal") or not names:
                continue
            offered = set(importlib.import_module(tpkg).__all__)
            submodules = {n for n in names if f"{target}.{n}" in _submodule_names(tpkg)}
            for name in set(names) - offered - submodules:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {target}.{name}")
    assert not bad, "names outside their package's __all__:\n" + "\n".join(sorted(bad))


def _submodule_names(package: str) -> set[str]:
    """Module names of a package's files (importing a submodule itself is allowed)."""
    folder = next(f for f, p in FOLDERS.items() if p == package)
    return {f"{package}.{p.stem}" for p in (ROOT / folder).glob("*.py")}
