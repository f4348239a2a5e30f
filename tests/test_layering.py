"""Project rules that code review would otherwise have to catch, checked on the real tree.

Each rule is a function returning violations; the last tests show that each rule fires on a tree
that breaks it.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "lit_modules", "datamodules", "callbacks")
SLUGS = ("sae_debias", "llm_sc", "smi", "bds", "surgery", "refresh", "free", "tgr", "asp")
MAX_LINES = 400
FORBIDDEN_NAMES = {"utils.py", "helpers.py", "common.py"}
# package -> project packages it must not import
FORBIDDEN_IMPORTS = {
    "core": {"lightning", "pytorch_lightning", "lit_modules", "datamodules", "callbacks", "train", "benchmarks"},
    "datamodules": {"lit_modules", "callbacks", "train", "benchmarks"},
    "lit_modules": {"callbacks", "datamodules", "train", "benchmarks"},
    "callbacks": {"lit_modules", "datamodules", "train", "benchmarks"},
}


def _python_files(root: Path, packages: tuple[str, ...] = PACKAGES) -> list[Path]:
    return sorted(p for pkg in packages for p in (root / pkg).rglob("*.py"))


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def _slug(module_stem: str) -> str | None:
    return next((s for s in SLUGS if module_stem == s or module_stem.startswith(s + "_")), None)


def import_violations(root: Path) -> list[str]:
    """Imports that cross the layering of ARCHITECTURE.md."""
    found = []
    for path in _python_files(root):
        package = path.relative_to(root).parts[0]
        for name in _imports(path):
            top = name.split(".")[0]
            if top in FORBIDDEN_IMPORTS[package]:
                found.append(f"{path.relative_to(root)} imports {name}")
            elif package == "lit_modules" and top == "lit_modules":
                other = name.split(".")[1] if "." in name else ""
                if _slug(other) != _slug(path.stem):
                    found.append(f"{path.relative_to(root)} imports another method's module {name}")
    return found


def size_violations(root: Path) -> list[str]:
    """Files over the line budget and files named utils/helpers/common."""
    files = _python_files(root, PACKAGES + ("benchmarks", "tests")) + list(root.glob("*.py"))
    found = [f"{p.relative_to(root)}: {n} lines" for p in files if (n := len(p.read_text().splitlines())) > MAX_LINES]
    found += [f"{p.relative_to(root)}: name a file after its concept" for p in files if p.name in FORBIDDEN_NAMES]
    return found


def _documented_args(doc: str) -> set[str]:
    if "Args:" not in doc:
        return set()
    lines = doc.split("Args:", 1)[1].splitlines()
    return {ln.strip().split(":")[0].strip() for ln in lines if ln.startswith(" " * 4) and not ln.startswith(" " * 5) and ":" in ln}


def signature_violations(root: Path) -> list[str]:
    """``__init__`` arguments of modules, datamodules and callbacks that are untyped, undefaulted or undocumented."""
    found = []
    for path in _python_files(root, ("lit_modules", "datamodules", "callbacks")):
        tree = ast.parse(path.read_text())
        for cls in (n for n in tree.body if isinstance(n, ast.ClassDef) and not n.name.startswith("_")):
            init = next((f for f in cls.body if isinstance(f, ast.FunctionDef) and f.name == "__init__"), None)
            if init is None:
                continue
            args = init.args.args[1:] + init.args.kwonlyargs
            defaults = [None] * (len(init.args.args[1:]) - len(init.args.defaults)) + list(init.args.defaults)
            defaults += list(init.args.kw_defaults)
            documented = _documented_args(inspect.cleandoc(ast.get_docstring(cls) or ""))
            where = f"{path.relative_to(root)}::{cls.name}"
            for arg, default in zip(args, defaults):
                if arg.annotation is None:
                    found.append(f"{where}: argument {arg.arg} has no type annotation")
                if default is None and not any(isinstance(b, ast.Name) and b.id == "Dataset" for b in cls.bases):
                    found.append(f"{where}: argument {arg.arg} has no default")
                if arg.arg not in documented:
                    found.append(f"{where}: argument {arg.arg} is not documented under Args:")
            if init.args.vararg or (init.args.kwarg and init.args.kwarg.annotation is None):
                found.append(f"{where}: untyped *args/**kwargs are dropped by the CLI")
    return found


@pytest.mark.parametrize("rule", [import_violations, size_violations, signature_violations], ids=lambda f: f.__name__)
def test_repository_follows_rule(rule) -> None:
    assert rule(REPO) == []


def test_project_packages_come_from_this_checkout() -> None:
    import callbacks
    import core
    import datamodules
    import lit_modules

    for package in (core, lit_modules, datamodules, callbacks):
        assert Path(package.__file__).resolve().is_relative_to(REPO), package.__file__


# ----------------------------------------------------------------------------- rules fire
def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (tmp_path / name).write_text(inspect.cleandoc(text) + "\n")
    return tmp_path


def test_import_rule_fires(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "core/bad.py": "import lightning",
        "callbacks/bad.py": "from lit_modules.smi import SMIModule",
        "lit_modules/bds.py": "from lit_modules.smi import SMIModule",
        "lit_modules/smi_kd.py": "from lit_modules.smi import SMIModule",  # same method family: allowed
    })
    assert sorted(import_violations(root)) == [
        "callbacks/bad.py imports lit_modules.smi",
        "core/bad.py imports lightning",
        "lit_modules/bds.py imports another method's module lit_modules.smi",
    ]


def test_size_rule_fires(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"core/long.py": "x = 1\n" * (MAX_LINES + 1), "core/utils.py": "x = 1"})
    assert size_violations(root) == [f"core/long.py: {MAX_LINES + 1} lines", "core/utils.py: name a file after its concept"]


def test_signature_rule_fires(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"callbacks/bad.py": '''
        class Bad:
            """A callback.

            Args:
                typed: documented.
            """

            def __init__(self, typed: int = 1, untyped=2, nodefault: int = None, *, hidden: int) -> None:
                pass
    '''})
    assert signature_violations(root) == [
        "callbacks/bad.py::Bad: argument untyped has no type annotation",
        "callbacks/bad.py::Bad: argument untyped is not documented under Args:",
        "callbacks/bad.py::Bad: argument nodefault is not documented under Args:",
        "callbacks/bad.py::Bad: argument hidden has no default",
        "callbacks/bad.py::Bad: argument hidden is not documented under Args:",
    ]
