"""Bad input in one short message: the config key, the value, the file it came from, and the fix.

jsonargparse reports a bad option of a subclass inside a dump of every Union member it tried, and a value
that a class's ``__init__`` refuses surfaces as a bare exception without the key of the callback that raised
it. :func:`explain` turns both into at most five lines:

    error: model.init_args.buffer_sise (command line): not an option of lit_modules.refresh.ContinualModule
      did you mean buffer_size?
      every option: train.py fit --model ContinualModule --print_config=comments

``--verbose`` (or ``LITZOO_DEBUG=1``) shows the full parser message or traceback instead.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
import traceback
from collections.abc import Sequence
from pathlib import Path

import yaml

from cli.discovery import registry

_CLASS_PROBLEM = re.compile(r"Problem with given class_path '([\w.]+)':\n((?:[ \t]+.*\n?)+)")
_PARSER_KEY = re.compile(r'Parser key "([\w.]+)":')
_NOT_ACCEPTED = re.compile(r"Option '([\w.]+)' is not accepted")
_NO_ATTRIBUTE = re.compile(r"module '([\w.]+)' has no attribute '(\w+)'")
_UNRECOGNIZED = re.compile(r"unrecognized arguments: (\S+)", re.IGNORECASE)
_SECTIONS = {"model": "model", "data": "data", "callback": "trainer.callbacks"}
_FLAG = {"model": "--model ", "data": "--data ", "trainer.callbacks": "--trainer.callbacks+="}


def config_files(argv: Sequence[str]) -> list[Path]:
    """The ``--config`` files named in ``argv``, in order."""
    files = []
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            files.append(Path(argv[i + 1]))
        elif arg.startswith("--config="):
            files.append(Path(arg.split("=", 1)[1]))
    return files


def _load(path: Path) -> dict:
    try:
        return yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def _source(section: str, key: str, argv: Sequence[str]) -> str:
    """Where ``section`` .. ``key`` was set: the last config file that sets it, else the command line."""
    short = key.split(".")[-1]
    if any(short in arg for arg in argv if arg.startswith("--") and not arg.startswith("--config")):
        return "command line"
    for path in reversed(config_files(argv)):
        if re.search(rf"^\s*-?\s*{re.escape(short)}\s*:", path.read_text(), flags=re.MULTILINE):
            return str(path)
    return "command line" if not config_files(argv) else ", ".join(map(str, config_files(argv)))


def _callback_index(class_path: str, argv: Sequence[str]) -> str:
    for path in reversed(config_files(argv)):
        callbacks = (_load(path).get("trainer") or {}).get("callbacks") or []
        for i, entry in enumerate(callbacks if isinstance(callbacks, list) else [callbacks]):
            if isinstance(entry, dict) and str(entry.get("class_path", "")).split(".")[-1] == class_path.split(".")[-1]:
                return f"[{i}]"
    return ""


def _init_parameters(class_path: str) -> list[str]:
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        return [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "args", "kwargs")]
    except (ImportError, AttributeError, TypeError, ValueError):
        return []


def _suggest(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=3, cutoff=0.6)
    return f"  did you mean {' or '.join(close)}?" if close else ""


def _section_of(class_path: str) -> str:
    name = class_path.split(".")[-1]
    kind = next((e.kind for e in registry() if e.name == name), "")
    return _SECTIONS.get(kind, "")


def explain_parse_error(message: str, argv: Sequence[str]) -> str:
    """Short form of a jsonargparse ``ArgumentError`` message."""
    top = _PARSER_KEY.search(message)
    section = top.group(1) if top else ""
    problems = [(c, body) for c, body in _CLASS_PROBLEM.findall(message) if not c.startswith("lightning.")]
    unknown_args = _UNRECOGNIZED.search(message)
    if unknown_args:
        option = unknown_args.group(1).split("=")[0]
        section, _, key = option.lstrip("-").rpartition(".")
        choices = _init_parameters("lightning.pytorch.Trainer") if section == "trainer" else []
        return "\n".join(filter(None, [f"error: {option.lstrip('-')} (command line): no such option",
                                       _suggest(key, choices), "  every option: train.py fit --help"]))
    if problems:
        class_path, body = problems[0]
        prefix = section + (_callback_index(class_path, argv) if section == "trainer.callbacks" else "")
        if (hit := _NOT_ACCEPTED.search(body)) is not None:
            key = hit.group(1)
            where = _source(section, key, argv)
            lines = [f"error: {prefix}.init_args.{key} ({where}): not an option of {class_path}",
                     _suggest(key, _init_parameters(class_path)),
                     f"  every option: train.py fit {_FLAG.get(section, '--' + section)}"
                     f"{class_path.split('.')[-1]} --print_config=comments"]
            return "\n".join(line for line in lines if line)
        if (hit := _NO_ATTRIBUTE.search(body)) is not None:
            names = [e.name for e in registry()]
            return "\n".join(filter(None, [
                f"error: {section} = {class_path} ({_source(section, section, argv)}): {hit.group(1)} has no class {hit.group(2)}",
                _suggest(hit.group(2), names), "  the classes: train.py --help"]))
        inner = _PARSER_KEY.search(body)
        detail = " ".join(line.strip() for line in body.strip().splitlines()[1 if inner else 0 :][:2])
        detail = detail.split(" - Expected a <class 'NoneType'>")[0]
        key = f"{prefix}.init_args.{inner.group(1)}" if inner else prefix
        return f"error: {key} ({_source(section, inner.group(1) if inner else section, argv)}): {detail}"
    if "Expected a dot import path" in message or "not accessible or invalid" in message:
        given = re.search(r"Given value: (\S+)", message)
        name = given.group(1) if given else "?"
        return "\n".join(filter(None, [f"error: {section} = {name}: no such class",
                                       _suggest(name.split(".")[-1], [e.name for e in registry()]),
                                       "  the classes: train.py --help"]))
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    return "error: " + " ".join(lines[:3])[:400]


def _unwrap(message: str) -> tuple[str, str | None]:
    """jsonargparse wraps an exception raised in a class's ``__init__`` in a Union report: keep the inner
    message and the class path it was building."""
    if "Does not validate against any of the Union subtypes" not in message:
        return message, None
    inner = re.search(r"Errors: - (.*?) - (?:Expected a <class 'NoneType'>|Not a valid subclass)", message)
    class_path = re.search(r"class_path='([\w.]+)'", message)
    return (inner.group(1) if inner else message), (class_path.group(1) if class_path else None)


def _raising_class(err: BaseException) -> str | None:
    """The project class whose ``__init__`` or ``setup`` raised ``err`` (or an exception it wraps)."""
    owner = None
    seen: BaseException | None = err
    while seen is not None:
        for frame, _ in traceback.walk_tb(seen.__traceback__):
            self = frame.f_locals.get("self")
            if self is not None and frame.f_code.co_name in ("__init__", "setup"):
                match = next((e for e in registry() if e.name == type(self).__name__), None)
                owner = match.class_path if match else owner
        seen = seen.__cause__ or seen.__context__
    return owner


def explain_exception(err: BaseException, argv: Sequence[str]) -> str:
    """Short form of an exception raised while building or running the classes of a config."""
    message, wrapped_class = _unwrap(" ".join(str(err).split()))
    if type(err).__name__ == "MisconfigurationException" and re.search(r"gpu|cuda|accelerator", message, re.I):
        return (f"error: trainer.accelerator ({_source('trainer', 'accelerator', argv)}): {message}\n"
                "  this machine has no GPU: pass --trainer.accelerator=cpu, or compose configs/_base/trainer_cpu.yaml last")
    if re.match(r"^[\w.\[\]]+(\.init_args\.|trainer\.)", message) or message.startswith("--config"):
        return f"error: {message}"
    class_path = _raising_class(err) or wrapped_class
    section = _section_of(class_path) if class_path else ""
    if not section:
        return f"error: {message}"
    if section == "trainer.callbacks":
        section += _callback_index(class_path, argv) or "[?]"
    params = _init_parameters(class_path)
    key = next((p for p in params if re.search(rf"\b{re.escape(p)}\b", message)), None)
    path = f"{section}.init_args.{key}" if key else section
    return f"error: {path} ({_source(section, key or section, argv)}): {message}"
