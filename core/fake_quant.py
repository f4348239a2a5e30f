"""Uniform fake-quantisation primitives with a straight-through gradient (used by ``core.quantization``).

Weights: symmetric k-bit, one scale per output channel (PSAQ) or per tensor. Activations: asymmetric k-bit
on the grid of a recorded range ``[x_min, x_max]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

_EPS = 1e-8


def check_bits(bits: int, name: str) -> int:
    """``bits`` if it is an integer bit width in [2, 16]; otherwise a ValueError naming ``name``."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ValueError(f"{name} must be an integer in [2, 16], got {bits!r}")
    return bits


def _ste(x: Tensor, x_q: Tensor) -> Tensor:
    """Forward value ``x_q`` exactly, gradient of the identity (straight-through estimator)."""
    return x_q.detach() + (x - x.detach())


def fake_quant_weight(w: Tensor, bits: int, per_channel: bool = True) -> Tensor:
    """Symmetric uniform fake quantisation of a weight, one scale per output channel (row =
    ``w[c].flatten()``, PSAQ) or, with ``per_channel=False``, one scale for the whole tensor (harder)."""
    rows = w.detach().reshape(w.shape[0] if per_channel else 1, -1)
    q_max = 2 ** (bits - 1) - 1
    # s_c = max(|min_c|, |max_c|) / (2^(k-1) - 1)
    scale = torch.maximum(rows.amin(1).abs(), rows.amax(1).abs()).clamp_min(_EPS) / q_max
    scale = scale.reshape(-1, *([1] * (w.dim() - 1)))
    # q = clamp(round(w / s), -2^(k-1), 2^(k-1) - 1);  w_hat = q * s
    q = torch.clamp(torch.round(w.detach() / scale), -q_max - 1, q_max)
    return _ste(w, q * scale)


def act_qparams(x_min: Tensor, x_max: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Scale and zero point of the asymmetric k-bit grid over ``[x_min, x_max]``."""
    # s = (max - min) / (2^k - 1);  z = round(-min / s)
    scale = (x_max - x_min).clamp_min(_EPS) / (2**bits - 1)
    return scale, torch.round(-x_min / scale)


def fake_quant_act(x: Tensor, x_min: Tensor, x_max: Tensor, bits: int) -> Tensor:
    """Asymmetric uniform per-tensor fake quantisation of ``x`` on the grid of ``[x_min, x_max]``."""
    scale, zero = act_qparams(x_min.to(x.dtype), x_max.to(x.dtype), bits)
    # q = clamp(round(x / s) + z, 0, 2^k - 1);  x_hat = (q - z) * s
    q = torch.clamp(torch.round(x.detach() / scale) + zero, 0, 2**bits - 1)
    return _ste(x, (q - zero) * scale)
