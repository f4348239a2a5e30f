"""Token priors P(x_t | x_<t) for MAP sequence decoding, all behind one small interface.

A prior is stepped row-wise (one row = one beam of one sentence):
    ``start(prompt)``          ``(R, P)`` prompt ids -> ``(R, V)`` log-probs of the first token, state
    ``step(tokens, state)``    ``(R,)`` chosen tokens -> ``(R, V)`` log-probs of the next one, state
    ``reorder(state, index)``  rows re-selected by global beam index after pruning
Implementations: a causal LM with KV-cache reuse (the cache is reordered with the public
``Cache.reorder_cache``) or recomputing the whole prefix every step (reference/speed baseline), a
first-order Markov chain (exact MAP by Viterbi exists) and the uniform prior (ML detection).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor


class TokenPrior(Protocol):
    vocab_size: int

    def start(self, prompt: Tensor) -> tuple[Tensor, Any]: ...

    def step(self, tokens: Tensor, state: Any) -> tuple[Tensor, Any]: ...

    def reorder(self, state: Any, index: Tensor) -> Any: ...


class CausalLMPrior:
    """Log-probs from a Hugging Face causal LM.

    Args:
        model: a ``*ForCausalLM`` in eval mode.
        use_cache: reuse the KV cache (reordered by beam index each step); False recomputes the
            whole prefix every step (same hypotheses, quadratic cost).
        mask_ids: token ids whose prior is set to -1e9 (the release's ``not_possible_tokens``).
    """

    def __init__(self, model: Any, use_cache: bool = True, mask_ids: Tensor | None = None) -> None:
        self.model = model
        self.use_cache = use_cache
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.mask = None
        if mask_ids is not None and mask_ids.numel():
            self.mask = torch.zeros(self.vocab_size, dtype=torch.bool)
            self.mask[mask_ids.long()] = True

    def _logprobs(self, logits: Tensor) -> Tensor:
        logp = torch.log_softmax(logits.float(), -1)
        if self.mask is not None:
            logp = logp.masked_fill(self.mask.to(logp.device), -1e9)
        return logp

    @torch.no_grad()
    def start(self, prompt: Tensor) -> tuple[Tensor, Any]:
        out = self.model(input_ids=prompt, use_cache=self.use_cache, logits_to_keep=1)
        state = out.cache if self.use_cache else prompt
        return self._logprobs(out.logits[:, -1]), state

    @torch.no_grad()
    def step(self, tokens: Tensor, state: Any) -> tuple[Tensor, Any]:
        if self.use_cache:
            out = self.model(input_ids=tokens[:, None], cache=state, use_cache=True)
            return self._logprobs(out.logits[:, -1]), out.cache
        history = torch.cat([state, tokens[:, None]], 1)
        out = self.model(input_ids=history, use_cache=False, logits_to_keep=1)
        return self._logprobs(out.logits[:, -1]), history

    def reorder(self, state: Any, index: Tensor) -> Any:
        if self.use_cache:
            state.reorder_cache(index)
            return state
        return state[index]


class MarkovPrior:
    """First-order Markov chain: log P(x_1) = ``log_init``, log P(x_t | x_{t-1}) = ``log_trans``.

    Args:
        log_init: ``(V,)`` log-probabilities of the first token.
        log_trans: ``(V, V)`` row-stochastic log transition matrix.
    """

    def __init__(self, log_init: Tensor, log_trans: Tensor) -> None:
        self.log_init, self.log_trans = log_init, log_trans
        self.vocab_size = log_init.numel()

    def start(self, prompt: Tensor) -> tuple[Tensor, Any]:
        return self.log_init.expand(prompt.shape[0], -1), None

    def step(self, tokens: Tensor, state: Any) -> tuple[Tensor, Any]:
        return self.log_trans[tokens], None

    def reorder(self, state: Any, index: Tensor) -> Any:
        return state


class UniformPrior:
    """Prior off: every token equally likely, so MAP decoding becomes ML detection."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def start(self, prompt: Tensor) -> tuple[Tensor, Any]:
        return prompt.new_zeros(prompt.shape[0], self.vocab_size, dtype=torch.float32), None

    def step(self, tokens: Tensor, state: Any) -> tuple[Tensor, Any]:
        return tokens.new_zeros(tokens.shape[0], self.vocab_size, dtype=torch.float32), None

    def reorder(self, state: Any, index: Tensor) -> Any:
        return state


def viterbi(prior: MarkovPrior, distances: Tensor, n0: float) -> Tensor:
    """Exact MAP sequences under a Markov prior: ``(S, T, V)`` channel distances -> ``(S, T)`` ids.

    Maximises log P(x_1) + sum_t log P(x_t | x_{t-1}) - sum_t d_t(x_t) / N0 (all sentences length T).
    """
    S, T, V = distances.shape
    delta = prior.log_init - distances[:, 0] / n0  # (S, V)
    back = []
    for t in range(1, T):
        cand = delta[:, :, None] + prior.log_trans  # (S, from, to)
        delta, arg = cand.max(1)
        delta = delta - distances[:, t] / n0
        back.append(arg)
    path = [delta.argmax(-1)]
    for arg in reversed(back):
        path.append(arg.gather(1, path[-1][:, None])[:, 0])
    return torch.stack(path[::-1], 1)
