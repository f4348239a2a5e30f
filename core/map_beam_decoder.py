"""MAP sequence decoding of token words received over a noisy channel, by batched beam search.

LLM-SC's receiver (Wang et al., arXiv 2407.14112; official code ``gujianhunwang/LLM_com``,
``_beam_search`` in ``model_utils .py``):

    x^ = argmax_x sum_t [ log P(x_t | x_<t) - ||y_t - h_t * s(x_t)||^2 / N0 ]        # MAP rule

The channel term is the complex-AWGN log-likelihood of the token's L symbols (memoryless, so it
factorises per token). The release multiplies the objective by N0 (``n0_scaled=True``: score
N0 log P - ||.||^2, identical argmax at one SNR). Decoding is exact-length: one token per L received
symbols, no EOS competition, as the release (its loop ends when the received symbols are used up).

Sentences x beams are rows of one batch: every step is one prior call for all rows (KV cache
reordered by the surviving beams' global index), the channel distances of every candidate token are
two matmuls against the (V, L) symbol table, and the top ``beam_width`` of beams x candidates per
sentence survive. Sentences shorter than the longest keep their beams frozen (a pad token is fed to
the prior, their scores are not touched), so a batch decodes exactly like one sentence at a time.
"""

from __future__ import annotations

import torch
from torch import Tensor

from core.sequence_priors import TokenPrior
from core.token_modem import TokenModem


@torch.no_grad()
def map_beam_decode(prior: TokenPrior, modem: TokenModem, y: Tensor, h: Tensor | None, n0: float,
                    lengths: Tensor, prompt: Tensor, beam_width: int = 10, candidate_topk: int | None = None,
                    n0_scaled: bool = False, pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """Decode ``S`` sentences.

    Args:
        prior: token prior (see ``core.sequence_priors``); its vocabulary must be the modem's.
        modem: maps token ids to their L symbols (its table gives every candidate's word).
        y: ``(S, T, L)`` received symbols (positions at or after a sentence's length are ignored).
        h: ``(S, T, L)`` channel gains (perfect CSI) or None for AWGN.
        n0: complex noise variance N0 the decoder assumes.
        lengths: ``(S,)`` number of tokens of each sentence.
        prompt: ``(S, P)`` known context given to the prior (start token, optional known prefix).
        beam_width: hypotheses kept per sentence (paper 10; 1 = greedy).
        candidate_topk: extend each beam only by the k tokens nearest to y_t (None: all V tokens).
        n0_scaled: the release's score form N0 log P - ||.||^2 (same argmax).
        pad_id: token fed to the prior for sentences that already ended.

    Returns:
        ``(tokens, score)``: ``(S, T)`` best hypothesis (pad after each length) and its score.
    """
    if prior.vocab_size != modem.vocab_size:
        raise ValueError(f"the prior's vocabulary ({prior.vocab_size}) differs from the tokenizer's "
                         f"({modem.vocab_size}): use the tokenizer that belongs to the model")
    S, T, _ = y.shape
    B, dev = beam_width, y.device
    logp, state = prior.start(prompt.repeat_interleave(B, 0))
    score = torch.full((S, B), float("-inf"), device=dev)
    score[:, 0] = 0.0  # all beams start from the same prompt: only one is live
    history = torch.zeros(S, B, 0, dtype=torch.long, device=dev)
    keep = torch.arange(B, device=dev).expand(S, B)
    rows = torch.arange(S, device=dev)[:, None] * B
    for t in range(T):
        d = modem.distances(y[:, t], None if h is None else h[:, t])  # (S, V)
        lp = logp.view(S, B, -1)
        cand = None
        if candidate_topk is not None and candidate_topk < d.shape[1]:
            d, cand = d.topk(candidate_topk, dim=1, largest=False)
            lp = lp.gather(2, cand[:, None].expand(S, B, -1))
        if n0_scaled:
            total = score[:, :, None] + n0 * lp - d[:, None]  # release form
        else:
            total = score[:, :, None] + lp - d[:, None] / n0  # MAP rule
        val, idx = total.flatten(1).topk(B, dim=1)
        beam, col = idx // total.shape[2], idx % total.shape[2]
        tok = col if cand is None else cand.gather(1, col)
        active = (lengths.to(dev) > t)[:, None]
        beam = torch.where(active, beam, keep)
        tok = torch.where(active, tok, torch.full_like(tok, pad_id))
        score = torch.where(active, val, score)
        history = torch.cat([history.gather(1, beam[..., None].expand(-1, -1, t)), tok[..., None]], 2)
        state = prior.reorder(state, (rows + beam).flatten())
        if t + 1 < T:
            logp, state = prior.step(tok.flatten(), state)
    return history[:, 0], score[:, 0]
