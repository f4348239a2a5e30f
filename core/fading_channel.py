"""AWGN and Rayleigh-fading channels with perfect CSI, plus the uncoded-BER theory they are checked against.

SNR definition (one for every system compared here): E_s/N0 per complex symbol, with E_s the
constellation's nominal mean energy (equiprobable points) and N0 the complex noise variance,
n ~ CN(0, N0), i.e. N0/2 per real dimension. Rayleigh fading h ~ CN(0, 1) keeps the mean received
energy at E_s. The release measures E_s on the actual (faded) signal instead and hands the decoder a
fixed 4.70 for E_s; here the same N0 generates the noise and enters the decoder.

    y = h * s + n,  h = 1 (``awgn``), one h per symbol (``fast``) or per sentence (``block``).
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
from torch import Tensor

Fading = Literal["awgn", "fast", "block"]


def noise_variance(es: float, snr_db: float) -> float:
    """N0 = E_s / 10^(SNR/10)."""
    return es / 10.0 ** (snr_db / 10.0)


def complex_normal(shape: tuple[int, ...], generator: torch.Generator, device: torch.device | str = "cpu") -> Tensor:
    """CN(0, 1) samples (variance 1/2 per real dimension)."""
    re_im = torch.randn(*shape, 2, generator=generator, device=device) * math.sqrt(0.5)
    return torch.complex(re_im[..., 0], re_im[..., 1])


def transmit(symbols: Tensor, snr_db: float, es: float, fading: str = "awgn",
             generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, float]:
    """Send ``(S, ..., L)`` symbols (S sentences) through the channel.

    Args:
        symbols: complex symbols, first dimension = sentences (block fading draws one h per sentence).
        snr_db: E_s/N0 in dB.
        es: nominal symbol energy E_s of the constellation.
        fading: ``awgn``, ``fast`` (Rayleigh, i.i.d. per symbol) or ``block`` (Rayleigh, per sentence).
        generator: seeded ``torch.Generator`` (one per condition gives reproducible curves).

    Returns:
        ``(y, h, n0)``: received symbols, the channel gains (perfect CSI, same shape), N0.
    """
    if fading not in get_args(Fading):
        raise ValueError(f"channel must be one of {', '.join(get_args(Fading))}, got {fading!r}")
    gen = generator if generator is not None else torch.Generator(device=symbols.device).manual_seed(0)
    shape = tuple(symbols.shape)
    if fading == "awgn":
        h = torch.ones_like(symbols)
    elif fading == "fast":
        h = complex_normal(shape, gen, symbols.device)
    else:
        h = complex_normal((shape[0],) + (1,) * (len(shape) - 1), gen, symbols.device).expand(shape)
    n0 = noise_variance(es, snr_db)
    y = h * symbols + math.sqrt(n0) * complex_normal(shape, gen, symbols.device)
    return y, h, n0


def q_function(x: Tensor) -> Tensor:
    """Gaussian tail Q(x) = P(N(0,1) > x)."""
    return 0.5 * torch.erfc(x / math.sqrt(2.0))


def uncoded_ber_awgn(modulation: str, snr_db: Tensor) -> Tensor:
    """Exact bit error rate of Gray BPSK / QPSK / 16-QAM over AWGN at E_s/N0 = ``snr_db``.

    BPSK Q(sqrt(2 E_s/N0)); QPSK Q(sqrt(E_s/N0)); 16-QAM (two Gray 4-PAM axes, x = sqrt(E_s/(5 N0)))
    (3 Q(x) + 2 Q(3x) - Q(5x)) / 4.
    """
    g = 10.0 ** (snr_db.double() / 10.0)
    if modulation == "bpsk":
        return q_function((2 * g).sqrt())
    if modulation == "qpsk":
        return q_function(g.sqrt())
    if modulation == "16qam":
        x = (g / 5).sqrt()
        return (3 * q_function(x) + 2 * q_function(3 * x) - q_function(5 * x)) / 4
    raise ValueError(f"no closed-form BER here for {modulation!r} (bpsk, qpsk, 16qam)")
