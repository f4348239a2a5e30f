"""One LLM-SC link end to end on token ids: modulate, channel, detect with a chosen receiver.

Receivers (``system``), all on the same transmitted words and the same noise draw:
    ``llm_sc``    MAP beam search with the LM prior, width ``beam_width`` (paper 10)
    ``greedy``    the same rule with one beam
    ``ml``        prior off: per-token maximum likelihood over the V valid words
    ``uncoded``   per-symbol hard decisions, bits read back directly (the traditional system)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from core.fading_channel import transmit
from core.map_beam_decoder import map_beam_decode
from core.sequence_priors import TokenPrior, UniformPrior
from core.token_modem import TokenModem, ids_to_bits

System = Literal["llm_sc", "greedy", "ml", "uncoded"]
SYSTEMS: tuple[str, ...] = ("llm_sc", "greedy", "ml", "uncoded")


@dataclass
class LinkResult:
    """Decoded ids ``(S, T)`` (pad after each length), bit errors and bits per sentence ``(S,)``,
    token errors and tokens per sentence ``(S,)``."""

    ids: Tensor
    bit_errors: Tensor
    bits: Tensor
    token_errors: Tensor
    tokens: Tensor


def count_errors(modem: TokenModem, sent: Tensor, bits_hat: Tensor, ids_hat: Tensor,
                 lengths: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-sentence bit and token error counts over the first ``lengths`` tokens."""
    valid = torch.arange(sent.shape[1], device=sent.device) < lengths[:, None]
    bit_err = (ids_to_bits(sent, modem.n_bits) != bits_hat).sum(-1)
    tok_err = (ids_hat != sent) & valid
    return (bit_err * valid).sum(1), lengths * modem.n_bits, tok_err.sum(1), lengths.clone()


def run_link(system: str, modem: TokenModem, prior: TokenPrior | None, ids: Tensor, lengths: Tensor,
             prompt: Tensor, snr_db: float, fading: str, generator: torch.Generator, beam_width: int = 10,
             candidate_topk: int | None = None, n0_scaled: bool = False, pad_id: int = 0) -> LinkResult:
    """Transmit ``(S, T)`` token ids (``lengths`` valid each) and decode them with ``system``.

    The generator is consumed identically by every system, so seeding it the same way (e.g.
    ``core.rng.keyed_generator(seed, batch, snr)``) gives every receiver the same channel realisation.
    """
    if system not in SYSTEMS:
        raise ValueError(f"system must be one of {', '.join(SYSTEMS)}, got {system!r}")
    y, h, n0 = transmit(modem.modulate(ids), snr_db, modem.es, fading, generator)
    h_csi = None if fading == "awgn" else h
    if system == "uncoded":
        bits_hat = modem.hard_bits(y, h_csi)
        ids_hat = modem.hard_decision(y, h_csi)
    else:
        if system == "ml":
            prior, width = UniformPrior(modem.vocab_size), 1
        else:
            if prior is None:
                raise ValueError(f"system {system!r} needs a prior (the LM)")
            width = 1 if system == "greedy" else beam_width
        ids_hat, _ = map_beam_decode(prior, modem, y, h_csi, n0, lengths, prompt, beam_width=width,
                                     candidate_topk=candidate_topk, n0_scaled=n0_scaled, pad_id=pad_id)
        bits_hat = ids_to_bits(ids_hat, modem.n_bits)
    valid = torch.arange(ids.shape[1], device=ids.device) < lengths[:, None]
    ids_hat = torch.where(valid, ids_hat, torch.full_like(ids_hat, pad_id))
    return LinkResult(ids_hat, *count_errors(modem, ids, bits_hat, ids_hat, lengths))

