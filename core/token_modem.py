"""Token ids -> fixed-length bit words -> constellation symbols, and back by hard decision.

The transmitter of LLM-SC (Wang et al., arXiv 2407.14112): the tokenizer is the semantic encoder,
each token id is written as N = ceil(log2 V) bits (natural binary, most significant bit first, not
Gray across ids) and the bits are mapped onto a constellation without a channel code. Here N is
padded with zero bits up to a multiple of the bits per symbol k, so a token uses L = N_pad / k
complex channel uses; the rate is N / L information bits per channel use.

Constellations (index = bit label read MSB first):
    ``bpsk``   +-1
    ``qpsk``   (+-1 +-j), Gray
    ``8qam``   the release's star 8-QAM, d_min = 2 (``modulate_8QAM`` in the official notebook)
    ``16qam``  {+-1, +-3}^2, Gray per axis
Energy ``raw`` keeps these integer-grid points (the release), ``unit`` scales to E_s = 1.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
from torch import Tensor

Modulation = Literal["bpsk", "qpsk", "8qam", "16qam"]
Energy = Literal["raw", "unit"]

_SQ3 = 1.0 + math.sqrt(3.0)
# Release star 8-QAM: 000->1+j, 001->-1+j, 010->-1-j, 011->1-j, 100->1+sqrt3, 101->j(1+sqrt3),
# 110->-j(1+sqrt3), 111->-(1+sqrt3).
_STAR_8QAM = [(1, 1), (-1, 1), (-1, -1), (1, -1), (_SQ3, 0), (0, _SQ3), (0, -_SQ3), (-_SQ3, 0)]
_GRAY_4PAM = [-3.0, -1.0, 1.0, 3.0]  # index = Gray label (00, 01, 11, 10) -> level, so label 0b10 -> 3


def _gray_pam4(label: int) -> float:
    # Gray sequence 00, 01, 11, 10 along the axis: label -> position.
    return _GRAY_4PAM[{0: 0, 1: 1, 3: 2, 2: 3}[label]]


def constellation(name: str, energy: str = "raw") -> Tensor:
    """Complex points ``(M,)`` indexed by their bit label (MSB first).

    Args:
        name: ``bpsk``, ``qpsk``, ``8qam`` (release star) or ``16qam`` (Gray).
        energy: ``raw`` (release scale: d_min = 2) or ``unit`` (mean |s|^2 = 1).
    """
    if name not in get_args(Modulation):
        raise ValueError(f"modulation must be one of {', '.join(get_args(Modulation))}, got {name!r}")
    if energy not in get_args(Energy):
        raise ValueError(f"energy must be 'raw' or 'unit', got {energy!r}")
    if name == "bpsk":
        pts = [(1.0, 0.0), (-1.0, 0.0)]
    elif name == "qpsk":  # first bit -> sign of I, second -> sign of Q: neighbours differ in one bit
        pts = [(1 - 2 * (m >> 1), 1 - 2 * (m & 1)) for m in range(4)]
    elif name == "8qam":
        pts = _STAR_8QAM
    else:  # first two bits -> I level, last two -> Q level
        pts = [(_gray_pam4(m >> 2), _gray_pam4(m & 3)) for m in range(16)]
    s = torch.tensor(pts, dtype=torch.float64)
    points = torch.complex(s[:, 0], s[:, 1]).to(torch.complex64)
    if energy == "unit":
        points = points / points.abs().pow(2).mean().sqrt()
    return points


def bits_per_token(vocab_size: int) -> int:
    """N = ceil(log2 V) (at least 1)."""
    return max(1, math.ceil(math.log2(vocab_size)))


def ids_to_bits(ids: Tensor, n_bits: int) -> Tensor:
    """``(...,)`` int ids -> ``(..., n_bits)`` 0/1 int64, natural binary, MSB first."""
    shifts = torch.arange(n_bits - 1, -1, -1, device=ids.device)
    return (ids.long().unsqueeze(-1) >> shifts) & 1


def bits_to_ids(bits: Tensor) -> Tensor:
    """Inverse of :func:`ids_to_bits` over the last dimension."""
    n = bits.shape[-1]
    weights = 2 ** torch.arange(n - 1, -1, -1, device=bits.device)
    return (bits.long() * weights).sum(-1)


class TokenModem:
    """Maps token ids of a vocabulary of size V onto L complex symbols each, and back.

    Args:
        vocab_size: V of the tokenizer (SmolLM2: 49152 -> N = 16 bits).
        modulation: ``bpsk``, ``qpsk``, ``8qam`` or ``16qam``.
        energy: ``raw`` (release scale) or ``unit``.
        pad_bits: append zero bits up to a multiple of the bits per symbol; False requires that
            the bits per symbol divide N (the release's check).
    """

    def __init__(self, vocab_size: int, modulation: str = "8qam", energy: str = "raw", pad_bits: bool = True) -> None:
        self.vocab_size = vocab_size
        self.points = constellation(modulation, energy)
        self.bits_per_symbol = int(math.log2(self.points.numel()))
        self.n_bits = bits_per_token(vocab_size)
        k = self.bits_per_symbol
        if not pad_bits and self.n_bits % k:
            raise ValueError(f"modulation {modulation!r} carries {k} bits per symbol, which do not divide the "
                             f"{self.n_bits}-bit token word of a {vocab_size}-token vocabulary; set pad_bits true "
                             "or choose a modulation whose bits per symbol divide it")
        self.padded_bits = -(-self.n_bits // k) * k  # zero bits appended after the id's N bits
        self.symbols_per_token = self.padded_bits // k
        self.es = float(self.points.abs().pow(2).mean())  # nominal E_s of equiprobable points
        ids = torch.arange(vocab_size)
        self.table = self.modulate(ids)  # (V, L): the received word of every candidate token

    @property
    def rate(self) -> float:
        """Information bits per complex channel use (N / L)."""
        return self.n_bits / self.symbols_per_token

    def ebn0_db(self, esn0_db: float) -> float:
        """E_b/N0 per information bit for a given E_s/N0: E_b = L E_s / N."""
        return esn0_db - 10.0 * math.log10(self.rate)

    def _labels(self, ids: Tensor) -> Tensor:
        bits = ids_to_bits(ids, self.n_bits)
        pad = self.padded_bits - self.n_bits
        if pad:
            bits = torch.cat([bits, bits.new_zeros(*bits.shape[:-1], pad)], -1)
        return bits_to_ids(bits.unflatten(-1, (self.symbols_per_token, self.bits_per_symbol)))

    def modulate(self, ids: Tensor) -> Tensor:
        """``(...,)`` token ids -> ``(..., L)`` complex symbols."""
        return self.points.to(ids.device)[self._labels(ids)]

    def hard_bits(self, y: Tensor, h: Tensor | None = None) -> Tensor:
        """Per-symbol minimum-distance decisions ``(..., L)`` -> the token's ``(..., N)`` bits.

        With perfect CSI the distance is |y - h s|^2 (coherent detection, no equalisation).
        """
        pts = self.points.to(y.device)
        hs = pts if h is None else h.unsqueeze(-1) * pts
        labels = (y.unsqueeze(-1) - hs).abs().argmin(-1)  # (..., L)
        k = self.bits_per_symbol
        bits = ids_to_bits(labels, k).flatten(-2)
        return bits[..., : self.n_bits]

    def hard_decision(self, y: Tensor, h: Tensor | None = None) -> Tensor:
        """Uncoded detection: token ids from per-symbol hard decisions (may be >= V: an invalid id)."""
        return bits_to_ids(self.hard_bits(y, h))

    def distances(self, y: Tensor, h: Tensor | None = None) -> Tensor:
        """||y - h * s(v)||^2 summed over the L symbols, for every token v: ``(B, L)`` -> ``(B, V)``.

        Expanded as |y|^2 - 2 Re(<y conj(h), s>) + <|h|^2, |s|^2> so that it is two matmuls over
        the (V, L) table instead of a (B, V, L) tensor.
        """
        table = self.table.to(y.device)
        hy = y if h is None else y * h.conj()
        h2 = torch.ones_like(y.real) if h is None else h.abs().pow(2)
        cross = hy.real @ table.real.T + hy.imag @ table.imag.T
        return y.abs().pow(2).sum(-1, keepdim=True) - 2 * cross + h2 @ table.abs().pow(2).T
