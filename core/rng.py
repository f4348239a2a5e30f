"""Keyed random generators: randomness that is a pure function of (seed, role, step, rank).

Continual-learning runs draw random numbers in several places (augmentation, replay sampling,
reservoir insertion, refresh noise). Drawing each from a generator seeded by a key of the
situation, instead of from one advancing stream, makes a run resumable from any checkpoint without
saving generator states, keeps the global RNG untouched (so switching a plug-in on or off does not
shift anything else), and gives DDP ranks distinct or identical streams on purpose.
"""

from __future__ import annotations

import torch

_MIX = (0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F)  # odd constants of common integer hashes


def keyed_seed(*keys: int) -> int:
    """A 63-bit seed that depends on every key and on their order."""
    seed = 0x165667B1
    for i, key in enumerate(keys):
        seed = (seed * 31 + (int(key) + 1) * _MIX[i % len(_MIX)]) % (2**63 - 1)
    return seed


def keyed_generator(*keys: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh ``torch.Generator`` on ``device`` seeded with :func:`keyed_seed` of ``keys``."""
    return torch.Generator(device=device).manual_seed(keyed_seed(*keys))
