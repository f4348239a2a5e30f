"""Find every LightningModule, LightningDataModule and Callback of the project without importing them.

``train.py --help`` lists them with the first line of their docstrings, and a short class name
(``--model SMIModule``, ``class_path: ClassIncrementalStream``) resolves: jsonargparse accepts the bare name
of any subclass that has been imported, so the modules whose classes a command names are imported first.
Reading the sources with :mod:`ast` keeps ``--help`` fast (no torch model code runs).
"""

from __future__ import annotations

import ast
import functools
import importlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KINDS = {"LightningModule": "model", "LightningDataModule": "data", "Callback": "callback"}
_PACKAGES = ("lit_modules", "datamodules", "callbacks")


@dataclass(frozen=True)
class Entry:
    """One discoverable class: its kind (model, data, callback), import path and one-line summary."""

    kind: str
    name: str
    module: str
    summary: str

    @property
    def class_path(self) -> str:
        return f"{self.module}.{self.name}"


def _base_names(node: ast.ClassDef) -> list[str]:
    names = []
    for base in node.bases:
        if isinstance(base, ast.Name):
            names.append(base.id)
        elif isinstance(base, ast.Attribute):
            names.append(base.attr)
    return names


@functools.cache
def registry() -> tuple[Entry, ...]:
    """Every public LightningModule / LightningDataModule / Callback subclass defined in the project's packages."""
    entries = []
    for package in _PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            module = ".".join(path.relative_to(REPO).with_suffix("").parts)
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in tree.body:
                if not isinstance(node, ast.ClassDef) or node.name.startswith("_"):
                    continue
                kind = next((KINDS[b] for b in _base_names(node) if b in KINDS), None)
                if kind is None or node.name == "LoggerSaveConfigCallback":
                    continue
                doc = (ast.get_docstring(node) or "").strip().splitlines()
                entries.append(Entry(kind, node.name, module, doc[0] if doc else ""))
    return tuple(entries)


def help_epilog() -> str:
    """The listing appended to ``--help``: every class by kind, with its summary and import path."""
    lines = ["Methods and building blocks (give a class by its short name or full class_path):"]
    for kind, title in (("model", "--model"), ("data", "--data"), ("callback", "--trainer.callbacks+=")):
        lines.append(f"  {title}")
        for entry in sorted((e for e in registry() if e.kind == kind), key=lambda e: e.class_path):
            summary = entry.summary if len(entry.summary) <= 76 else entry.summary[:73] + "..."
            lines.append(f"    {entry.name:26s} {summary}")
    lines.append("Every option of a class with its documentation: train.py fit --model <Name> --print_config=comments")
    return "\n".join(lines)


def import_named(texts: Iterable[str]) -> list[str]:
    """Import the project modules whose classes are named, by short name, anywhere in ``texts``.

    Args:
        texts: command-line arguments and the contents of the config files given.

    Returns:
        The modules imported.
    """
    words = set()
    for text in texts:
        words.update(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", text))
    modules = sorted({e.module for e in registry() if e.name in words})
    for module in modules:
        importlib.import_module(module)
    return modules
