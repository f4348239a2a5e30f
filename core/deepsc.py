"""DeepSC (Xie, Qin, Li, Juang, "Deep Learning Enabled Semantic Communication Systems", IEEE TSP 2021).

A word-level Transformer joint source-channel code: semantic encoder (Transformer encoder) ->
channel encoder (Linear 128->256, ReLU, Linear 256->16: 8 complex symbols per word) -> power
normalisation -> channel -> zero-forcing with perfect CSI -> channel decoder (16->128->512->128 with a
residual LayerNorm) -> semantic decoder (Transformer decoder, greedy at test time). Sizes follow the
authors' PyTorch code (``13274086/DeepSC``, ``models/transceiver.py``); here every sentence is
normalised to E_s = 1 per complex symbol over its own words (the released ``PowerNormalize`` only
scales a batch down when its power exceeds 1; with a trained encoder both coincide), pad positions
are not sent, and the channel is ``core.fading_channel.transmit`` so every system shares one SNR
definition (E_s/N0 per complex symbol).
"""

from __future__ import annotations

import math
from collections import Counter

import torch
from torch import Tensor, nn

from core.fading_channel import transmit

PAD, START, END, UNK = "<PAD>", "<START>", "<END>", "<UNK>"


class WordVocab:
    """Closed word vocabulary; ids 0-3 are ``<PAD> <START> <END> <UNK>``."""

    def __init__(self, words: list[str]) -> None:
        self.words = [PAD, START, END, UNK] + [w for w in words if w not in (PAD, START, END, UNK)]
        self.index = {w: i for i, w in enumerate(self.words)}
        self.pad_id, self.start_id, self.end_id, self.unk_id = 0, 1, 2, 3

    @classmethod
    def build(cls, sentences: list[str], min_count: int = 1) -> WordVocab:
        counts = Counter(w for s in sentences for w in s.split())
        return cls(sorted(w for w, c in counts.items() if c >= min_count))

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, sentence: str) -> Tensor:
        ids = [self.index.get(w, self.unk_id) for w in sentence.split()]
        return torch.tensor([self.start_id, *ids, self.end_id])

    def decode(self, ids: list[int]) -> str:
        out = []
        for i in ids:
            if i == self.end_id:
                break
            if i not in (self.pad_id, self.start_id):
                out.append(self.words[i])
        return " ".join(out)


def sinusoid_positions(length: int, dim: int) -> Tensor:
    pos = torch.arange(length)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
    return pe


class DeepSC(nn.Module):
    """DeepSC transceiver.

    Args:
        vocab_size: words in the closed vocabulary.
        d_model: Transformer width (paper 128).
        num_heads: attention heads (paper 8).
        dff: feed-forward width (paper 512).
        num_layers: encoder and decoder layers each (paper 4).
        symbols: real channel uses per word (paper 16 = 8 complex symbols).
        dropout: dropout (paper 0.1).
        max_len: longest sequence (with ``<START>``/``<END>``).
    """

    def __init__(self, vocab_size: int, d_model: int = 128, num_heads: int = 8, dff: int = 512, num_layers: int = 4,
                 symbols: int = 16, dropout: float = 0.1, max_len: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.register_buffer("pos", sinusoid_positions(max_len, d_model), persistent=False)
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(d_model, num_heads, dff, dropout, batch_first=True), num_layers,
            enable_nested_tensor=False)
        self.channel_encoder = nn.Sequential(nn.Linear(d_model, 256), nn.ReLU(), nn.Linear(256, symbols))
        self.cd1, self.cd2, self.cd3 = nn.Linear(symbols, d_model), nn.Linear(d_model, 512), nn.Linear(512, d_model)
        self.cd_norm = nn.LayerNorm(d_model)
        self.decoder = nn.TransformerDecoder(
            nn.TransformerDecoderLayer(d_model, num_heads, dff, dropout, batch_first=True), num_layers)
        self.head = nn.Linear(d_model, vocab_size)
        self.scale = math.sqrt(d_model)

    def _embed(self, ids: Tensor) -> Tensor:
        return self.embed(ids) * self.scale + self.pos[: ids.shape[1]]

    def transmit_words(self, src: Tensor, pad_id: int, snr_db: float, fading: str,
                       generator: torch.Generator | None) -> Tensor:
        """Source ids ``(B, T)`` -> channel-decoded features ``(B, T, d_model)`` after the channel."""
        pad = src == pad_id
        z = self.channel_encoder(self.encoder(self._embed(src), src_key_padding_mask=pad))
        s = torch.complex(z[..., 0::2], z[..., 1::2]) * (~pad)[..., None]
        count = (~pad).sum(1).clamp_min(1)[:, None, None] * s.shape[-1]
        s = s / (s.abs().pow(2).sum((1, 2), keepdim=True) / count).sqrt().clamp_min(1e-12)  # E_s = 1
        y, h, _ = transmit(s, snr_db, 1.0, fading, generator)
        r = y / h  # zero forcing with perfect CSI
        x1 = self.cd1(torch.stack([r.real, r.imag], -1).flatten(-2))
        return self.cd_norm(x1 + self.cd3(torch.relu(self.cd2(torch.relu(x1)))))

    def decode_step(self, memory: Tensor, memory_pad: Tensor, tgt: Tensor) -> Tensor:
        causal = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1], device=tgt.device)
        out = self.decoder(self._embed(tgt), memory, tgt_mask=causal, tgt_is_causal=True,
                           memory_key_padding_mask=memory_pad)
        return self.head(out)

    def forward(self, src: Tensor, pad_id: int, snr_db: float, fading: str = "awgn",
                generator: torch.Generator | None = None) -> Tensor:
        """Teacher-forced logits ``(B, T-1, V)`` for targets ``src[:, 1:]``."""
        memory = self.transmit_words(src, pad_id, snr_db, fading, generator)
        return self.decode_step(memory, src == pad_id, src[:, :-1])

    @torch.no_grad()
    def greedy(self, src: Tensor, pad_id: int, start_id: int, snr_db: float, fading: str = "awgn",
               generator: torch.Generator | None = None, max_len: int | None = None) -> Tensor:
        """Greedy decoding of the whole batch: ``(B, max_len)`` word ids (starting after ``<START>``)."""
        memory = self.transmit_words(src, pad_id, snr_db, fading, generator)
        tgt = torch.full((src.shape[0], 1), start_id, dtype=torch.long, device=src.device)
        for _ in range(max_len or src.shape[1]):
            nxt = self.decode_step(memory, src == pad_id, tgt)[:, -1].argmax(-1)
            tgt = torch.cat([tgt, nxt[:, None]], 1)
        return tgt[:, 1:]
