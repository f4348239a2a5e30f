"""The README's commands and links point at things that exist."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
CODE = "\n".join(re.findall(r"```(?:bash|sh|console)?\n(.*?)```", README, flags=re.DOTALL))


def _commands() -> list[list[str]]:
    joined = CODE.replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in joined.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_shows_make_demo_and_make_test_first() -> None:
    first = [c for c in _commands() if c][:2]
    assert first == [["make", "demo"], ["make", "test"]]


def test_make_targets_exist() -> None:
    makefile = (REPO / "Makefile").read_text()
    for command in _commands():
        if command and command[0] == "make":
            for target in command[1:]:
                assert re.search(rf"^{re.escape(target)}:", makefile, flags=re.MULTILINE), target


def test_config_files_and_scripts_exist() -> None:
    checked = 0
    for command in _commands():
        for i, word in enumerate(command):
            if word == "--config" or word.endswith((".py", ".yaml")) and "/" in word:
                path = command[i + 1] if word == "--config" else word
                assert (REPO / path).exists(), f"README names {path}, which does not exist"
                checked += 1
    assert checked >= 3


def test_relative_links_exist() -> None:
    links = [t for t in re.findall(r"\]\(([^)#]+)\)", README) if "://" not in t]
    assert links
    for target in links:
        assert (REPO / target).exists(), f"README links to missing {target}"


def test_the_test_command_is_pytest() -> None:
    assert any(c[:1] == ["pytest"] or c[1:2] == ["-m"] and "pytest" in c for c in _commands())
