"""MAP beam decoder: exact MAP on a Markov source, score forms, KV-cache reuse, batching, 30 dB."""

from __future__ import annotations

import pytest
import torch

from core.fading_channel import transmit
from core.map_beam_decoder import map_beam_decode
from core.semantic_link import run_link
from core.sequence_priors import CausalLMPrior, MarkovPrior, UniformPrior, viterbi
from core.token_modem import TokenModem

V, T = 4, 4


def markov_source(seed: int = 0) -> MarkovPrior:
    g = torch.Generator().manual_seed(seed)
    trans = torch.rand(V, V, generator=g).pow(4) + 0.01  # peaked rows: a strong prior
    return MarkovPrior(torch.full((V,), -torch.log(torch.tensor(float(V)))), (trans / trans.sum(1, keepdim=True)).log())


def sample(prior: MarkovPrior, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = [torch.multinomial(prior.log_init.exp(), n, replacement=True, generator=g)]
    for _ in range(T - 1):
        x.append(torch.multinomial(prior.log_trans[x[-1]].exp(), 1, generator=g)[:, 0])
    return torch.stack(x, 1)


def channel(modem: TokenModem, x: torch.Tensor, snr: float, seed: int):
    y, _, n0 = transmit(modem.modulate(x), snr, modem.es, "awgn", torch.Generator().manual_seed(seed))
    return y, n0


def test_exhaustive_beam_equals_viterbi_and_score_forms_agree() -> None:
    prior, modem = markov_source(), TokenModem(V, "bpsk")
    x = sample(prior, 64, seed=1)
    y, n0 = channel(modem, x, 0.0, seed=2)
    lengths, prompt = torch.full((64,), T), torch.zeros(64, 1, dtype=torch.long)
    exact = viterbi(prior, torch.stack([modem.distances(y[:, t]) for t in range(T)], 1), n0)
    # a beam of V^(T-1) keeps every prefix, so its best full hypothesis is the exact MAP sequence
    beam, _ = map_beam_decode(prior, modem, y, None, n0, lengths, prompt, beam_width=V ** (T - 1))
    assert torch.equal(beam, exact)
    assert not torch.equal(exact, x)  # 0 dB: there are errors to correct, so the check has teeth
    scaled, _ = map_beam_decode(prior, modem, y, None, n0, lengths, prompt, beam_width=V ** (T - 1), n0_scaled=True)
    assert torch.equal(scaled, exact)  # the release's N0-scaled score has the same argmax
    for width in (1, 2, V):
        a, _ = map_beam_decode(prior, modem, y, None, n0, lengths, prompt, beam_width=width)
        b, _ = map_beam_decode(prior, modem, y, None, n0, lengths, prompt, beam_width=width, n0_scaled=True)
        assert torch.equal(a, b)


def test_map_sequence_error_never_exceeds_ml_error() -> None:
    prior, modem = markov_source(3), TokenModem(V, "bpsk")
    x = sample(prior, 4000, seed=4)
    for snr in (-4.0, 0.0, 4.0, 8.0):
        y, n0 = channel(modem, x, snr, seed=int(snr) + 10)
        dist = torch.stack([modem.distances(y[:, t]) for t in range(T)], 1)
        map_err = (viterbi(prior, dist, n0) != x).any(1).float().mean()
        ml = map_beam_decode(UniformPrior(V), modem, y, None, n0, torch.full((4000,), T),
                             torch.zeros(4000, 1, dtype=torch.long), beam_width=1)[0]
        ml_err = (ml != x).any(1).float().mean()
        assert torch.equal(ml, dist.argmin(-1))  # prior off = per-token ML
        assert map_err <= ml_err, (snr, map_err, ml_err)
        if snr <= 0:
            assert map_err < ml_err  # the prior helps where the channel is poor


@pytest.fixture(scope="module")
def tiny_lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


def lm_case(snr: float, seed: int = 0):
    modem = TokenModem(300, "qpsk")
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([7, 3, 5, 6])
    ids = torch.randint(1, 300, (4, 7), generator=g) * (torch.arange(7) < lengths[:, None])
    y, h, n0 = transmit(modem.modulate(ids), snr, modem.es, "fast", g)
    return modem, ids, lengths, y, h, n0, torch.zeros(4, 1, dtype=torch.long)


def test_kv_cache_reuse_gives_the_hypotheses_of_recomputation(tiny_lm) -> None:
    modem, ids, lengths, y, h, n0, prompt = lm_case(2.0)
    cached = map_beam_decode(CausalLMPrior(tiny_lm), modem, y, h, n0, lengths, prompt, beam_width=5)
    fresh = map_beam_decode(CausalLMPrior(tiny_lm, use_cache=False), modem, y, h, n0, lengths, prompt, beam_width=5)
    assert torch.equal(cached[0], fresh[0])
    assert torch.allclose(cached[1], fresh[1], atol=1e-3)


def test_a_batch_of_different_lengths_equals_one_by_one(tiny_lm) -> None:
    modem, ids, lengths, y, h, n0, prompt = lm_case(2.0, seed=1)
    prior = CausalLMPrior(tiny_lm)
    batch, score = map_beam_decode(prior, modem, y, h, n0, lengths, prompt, beam_width=4)
    for s in range(4):
        n = int(lengths[s])
        one, one_score = map_beam_decode(prior, modem, y[s:s + 1, :n], h[s:s + 1, :n], n0, lengths[s:s + 1],
                                         prompt[s:s + 1], beam_width=4)
        assert torch.equal(batch[s, :n], one[0]) and (batch[s, n:] == 0).all()
        assert torch.allclose(score[s], one_score[0], atol=1e-3)
    topk_all = map_beam_decode(prior, modem, y, h, n0, lengths, prompt, beam_width=4, candidate_topk=300)[0]
    assert torch.equal(topk_all, batch)  # k = V restricts nothing


def test_every_receiver_is_error_free_at_30_db(tiny_lm) -> None:
    modem, ids, lengths, *_ = lm_case(30.0)
    prompt = torch.zeros(4, 1, dtype=torch.long)
    for system in ("llm_sc", "greedy", "ml", "uncoded"):
        res = run_link(system, modem, CausalLMPrior(tiny_lm), ids, lengths, prompt, 30.0, "fast",
                       torch.Generator().manual_seed(5), beam_width=3)
        assert torch.equal(res.ids, ids) and int(res.bit_errors.sum()) == 0, system


def test_prior_with_another_vocabulary_is_refused(tiny_lm) -> None:
    modem, ids, lengths, y, h, n0, prompt = lm_case(10.0)
    with pytest.raises(ValueError, match=r"prior's vocabulary \(4\) differs from the tokenizer's \(300\)"):
        map_beam_decode(markov_source(), modem, y, h, n0, lengths, prompt)
