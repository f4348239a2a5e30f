"""Token modem and channel of LLM-SC: bit words, Gray mapping, SNR definition, uncoded BER vs theory."""

from __future__ import annotations

import math

import pytest
import torch

from core.fading_channel import noise_variance, transmit, uncoded_ber_awgn
from core.token_modem import TokenModem, bits_to_ids, constellation, ids_to_bits


def test_bits_are_natural_binary_msb_first() -> None:
    assert ids_to_bits(torch.tensor([5]), 4).tolist() == [[0, 1, 0, 1]]
    ids = torch.randint(0, 49152, (100,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(bits_to_ids(ids_to_bits(ids, 16)), ids)


@pytest.mark.parametrize("name", ["qpsk", "16qam"])
def test_gray_nearest_neighbours_differ_in_one_bit(name: str) -> None:
    pts = constellation(name)
    dist = (pts[:, None] - pts[None]).abs()
    dmin = dist[dist > 0].min()
    for a, b in (dist - dmin).abs().lt(1e-5).nonzero().tolist():
        assert bin(a ^ b).count("1") == 1, (a, b)


def test_release_star_8qam_and_energies() -> None:
    pts = constellation("8qam")
    s3 = 1 + math.sqrt(3)
    expected = [1 + 1j, -1 + 1j, -1 - 1j, 1 - 1j, s3, 1j * s3, -1j * s3, -s3]
    assert torch.allclose(pts, torch.tensor(expected, dtype=torch.complex64))
    assert math.isclose(float(pts.abs().pow(2).mean()), (8 + 4 * s3**2) / 8, rel_tol=1e-6)
    for name in ("bpsk", "qpsk", "8qam", "16qam"):
        assert math.isclose(float(constellation(name, "unit").abs().pow(2).mean()), 1.0, rel_tol=1e-5)


def test_word_padding_rate_and_modulate_roundtrip() -> None:
    modem = TokenModem(49152, "8qam")
    assert (modem.n_bits, modem.padded_bits, modem.symbols_per_token) == (16, 18, 6)
    assert math.isclose(modem.rate, 16 / 6)
    ids = torch.randint(0, 49152, (3, 7), generator=torch.Generator().manual_seed(1))
    sym = modem.modulate(ids)
    assert sym.shape == (3, 7, 6)
    assert torch.equal(modem.hard_decision(sym), ids)  # noiseless hard decision inverts the mapping
    with pytest.raises(ValueError, match="do not divide the 16-bit token word"):
        TokenModem(49152, "8qam", pad_bits=False)


def test_distances_match_naive_reference() -> None:
    modem = TokenModem(300, "16qam")
    g = torch.Generator().manual_seed(2)
    y = torch.randn(4, modem.symbols_per_token, dtype=torch.complex64, generator=g)
    h = torch.randn(4, modem.symbols_per_token, dtype=torch.complex64, generator=g)
    naive = (y[:, None] - h[:, None] * modem.table[None]).abs().pow(2).sum(-1)
    assert torch.allclose(modem.distances(y, h), naive, atol=1e-4)
    assert torch.allclose(modem.distances(y), (y[:, None] - modem.table[None]).abs().pow(2).sum(-1), atol=1e-4)


def test_empirical_noise_variance_matches_snr_definition() -> None:
    modem = TokenModem(256, "qpsk")
    s = modem.modulate(torch.zeros(200, 500, dtype=torch.long))
    y, h, n0 = transmit(s, 7.0, modem.es, "awgn", torch.Generator().manual_seed(3))
    assert math.isclose(n0, noise_variance(modem.es, 7.0))
    assert math.isclose(float((y - s).abs().pow(2).mean()), modem.es / 10**0.7, rel_tol=0.01)
    assert math.isclose(float((y - s).real.pow(2).mean()), n0 / 2, rel_tol=0.02)
    _, h_fast, _ = transmit(s, 7.0, modem.es, "fast", torch.Generator().manual_seed(4))
    assert math.isclose(float(h_fast.abs().pow(2).mean()), 1.0, rel_tol=0.01)
    _, h_block, _ = transmit(s, 7.0, modem.es, "block", torch.Generator().manual_seed(5))
    assert torch.equal(h_block, h_block[:, :1].expand_as(h_block))  # one gain per sentence
    assert not torch.equal(h_block[0, 0], h_block[1, 0])


@pytest.mark.parametrize("name,snr", [("bpsk", 4.0), ("qpsk", 6.0), ("16qam", 12.0)])
def test_uncoded_ber_matches_theory(name: str, snr: float) -> None:
    modem = TokenModem(2**12, name)
    ids = torch.randint(0, 2**12, (400, 100), generator=torch.Generator().manual_seed(6))
    y, _, _ = transmit(modem.modulate(ids), snr, modem.es, "awgn", torch.Generator().manual_seed(7))
    ber = float((modem.hard_bits(y) != ids_to_bits(ids, 12)).float().mean())
    theory = float(uncoded_ber_awgn(name, torch.tensor(snr)))
    assert abs(ber - theory) < 5 * math.sqrt(theory / 480_000), (ber, theory)
