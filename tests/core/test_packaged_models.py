"""Model aliases resolve to the same folders that datamodules.sources builds and locates."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.packaged_models import resolve_model
from datamodules import sources
from datamodules.sources import models as models_module


def test_smollm2_alias_follows_the_cache_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LITZOO_CACHE", str(tmp_path / "cache"))
    assert resolve_model("smollm2") == str(tmp_path / "cache" / models_module.SMOLLM2_FOLDER)
    assert sources.default_cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("LITZOO_CACHE")
    assert resolve_model("smollm2") == str(Path.home() / ".cache" / "litzoo" / models_module.SMOLLM2_FOLDER)


def test_minilm_alias_is_the_packaged_folder_and_other_names_pass_through() -> None:
    assert Path(resolve_model("minilm")) == sources.minilm_path()
    assert resolve_model("meta-llama/Llama-2-7b-hf") == "meta-llama/Llama-2-7b-hf"
    assert resolve_model("~/models/llm") == str(Path.home() / "models" / "llm")
    assert resolve_model("./relative") == "./relative"
