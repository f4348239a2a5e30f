"""Offline English text: CPython's own documentation topics (PSF licence, ships with Python)."""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=1)
def english_corpus() -> str:
    """Return about 465 k characters of English prose from the CPython docs (``pydoc_data``).

    The 79 topics of ``pydoc_data.topics.topics`` (the text behind ``help("assert")`` etc.) are
    joined with a blank line between them, in sorted key order, so the result is deterministic for a
    given Python version (the text changes slightly between Python releases). Suitable as a small
    character- or BPE-level language-modelling corpus.

    Returns:
        One ``str`` (mostly ASCII, with newlines) of several hundred thousand characters.

    Raises:
        ImportError: If the Python installation was stripped of ``pydoc_data`` (some minimal
            distributions); install the full standard library (e.g. Debian's ``libpython3-stdlib``).
    """
    try:
        from pydoc_data.topics import topics
    except ImportError as err:  # pragma: no cover - only on stripped Pythons
        raise ImportError(
            "english_corpus() needs the standard-library module pydoc_data, which this Python "
            "installation lacks; install the full standard library for your Python."
        ) from err
    return "\n\n".join(topics[key] for key in sorted(topics))
