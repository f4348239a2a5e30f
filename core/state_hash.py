"""A content hash of a state dict: which frozen weights a checkpoint was trained against.

Surgery and AdaMerging checkpoints leave the frozen towers out (theta_0, the experts, the merge) and
refill them from the config on load; the hash recorded at save time lets the load refuse towers that
changed since (another expert file at the same path, a re-trained theta_0), instead of silently
resuming trained surgery modules on top of different weights.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch
from torch import Tensor


def state_hash(state: Mapping[str, Tensor]) -> str:
    """SHA-256 (hex, first 16 digits) over every entry's name, dtype, shape and bytes, in sorted key order."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
