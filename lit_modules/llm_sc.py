"""LLM-SC: large-language-model enabled semantic communication, as an evaluation module.

Wang, Zou, Wei, Liao, Zhuo, Mi, Lai. "Large Language Model Enabled Semantic Communication Systems",
arXiv 2407.14112 (2024); journal version Applied Sciences 15(13) 7227 (2025). Official code:
github.com/gujianhunwang/LLM_com.

Idea. An off-the-shelf LLM is the whole semantic codec, untrained: its tokenizer is the source
encoder, each token id is sent as N = ceil(log2 V) raw bits on a constellation with no channel code,
and the receiver decodes the token sequence by MAP with the LLM as prior, made tractable by beam
search. Language redundancy then acts as a channel code ("coding gain without channel coding").

Equations -> code:
    tokens -> bits -> symbols s(x_t) (natural binary, MSB first)   -> ``core.token_modem.TokenModem``
    y_t = h_t s(x_t) + n_t, n ~ CN(0, N0), E_s/N0 = SNR              -> ``core.fading_channel.transmit``
    x^ = argmax sum_t log P(x_t|x_<t) - ||y_t - h_t s(x_t)||^2 / N0  -> ``core.map_beam_decoder``
The module has nothing to train: ``test_step`` decodes each sentence batch at every SNR of the grid
with every receiver (``llm_sc`` beam search, ``greedy``, ``ml`` prior off, ``uncoded`` hard decision)
on the same noise, and logs BER, token error rate, BLEU-1/4 and MiniLM similarity per system and SNR
(``test/<metric>_<system>_snr<dB>``); the curves are drawn to ``llm_sc_curves.png`` in the run
directory (and W&B). Release quirks, off by default: ``vocab_mask_leak`` (prior masked to the test
set's own vocabulary), ``known_prefix`` = 5 (the first tokens given to the receiver for free) and
``n0_scaled`` (score N0 log P - ||.||^2: same argmax).
"""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
import torchmetrics

from core.packaged_models import resolve_model
from core.rng import keyed_generator
from core.run_dir import run_directory
from core.semantic_link import SYSTEMS, run_link
from core.sequence_priors import CausalLMPrior
from core.snr_curves import save_snr_curves
from core.text_metrics import SentenceSimilarity, sentence_scores
from core.token_modem import TokenModem

SUMS = ("bit_errors", "bits", "token_errors", "tokens", "bleu1", "bleu4", "similarity", "sentences")


def load_causal_lm(name: str, dtype: str, trust_remote_code: bool, key: str) -> tuple[Any, Any]:
    """Tokenizer and eval-mode causal LM from a local folder, alias or hub id; errors name ``key``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(name)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code)
    except OSError as err:
        hint = (" (build it once: python -c 'from datamodules.sources import smollm2_path; smollm2_path()')"
                if name == "smollm2" else " (paper: a local folder of lmsys/vicuna-7b-v1.5 or Llama-2-7b)")
        raise FileNotFoundError(f"{key}: cannot load {name!r}{hint}: {err}") from err
    vocab = int(lm.get_output_embeddings().weight.shape[0])
    if len(tok) != vocab:
        raise ValueError(f"{key}: the LM's vocabulary ({vocab}) differs from its tokenizer's ({len(tok)}); "
                         "use a folder whose tokenizer belongs to the model")
    return tok, lm.eval()


class LLMSCModule(L.LightningModule):
    """Evaluate LLM-SC and its baselines on sentence batches x an SNR grid (``trainer.test``).

    Args:
        model: causal LM prior and tokenizer: ``smollm2`` (demo), a local folder or hub id (paper:
            ``lmsys/vicuna-7b-v1.5``).
        dtype: dtype of the LM weights.
        modulation: ``bpsk``, ``qpsk``, ``8qam`` (paper, release star) or ``16qam``.
        energy: constellation scale: ``raw`` (release) or ``unit``.
        pad_bits: pad each N-bit token word with zeros to a multiple of the bits per symbol (False:
            the bits per symbol must divide N, as in the release).
        channel: ``awgn``, ``fast`` (Rayleigh per symbol, the release's demo) or ``block`` (per sentence).
        snr_db: E_s/N0 grid in dB.
        systems: receivers to run: ``llm_sc``, ``greedy``, ``ml``, ``uncoded``.
        beam_width: beam width of ``llm_sc`` (paper 10).
        candidate_topk: extend beams only by the k tokens nearest to the received word (None: all V).
        use_cache: reuse the LM's KV cache across steps (False: recompute the prefix; same result).
        start_token: id given to the LM before the first token (None: the tokenizer's BOS, else EOS).
        known_prefix: tokens of each sentence given to the receiver untransmitted (release 5).
        vocab_mask_leak: mask every token absent from the test sentences (release; leaks the test set).
        n0_scaled: the release's N0-scaled score form (identical argmax).
        similarity_model: sentence-embedding model for the similarity metric (``minilm``; None: off).
        seed: seed of the channel noise (keyed by batch and SNR, so every receiver sees the same noise).
        trust_remote_code: allow the model repository's own code.
    """

    def __init__(self, model: str = "smollm2", dtype: Literal["float32", "bfloat16", "float16"] = "float32",
                 modulation: Literal["bpsk", "qpsk", "8qam", "16qam"] = "8qam", energy: Literal["raw", "unit"] = "raw",
                 pad_bits: bool = True, channel: Literal["awgn", "fast", "block"] = "fast",
                 snr_db: list[float] | None = None, systems: list[str] | None = None, beam_width: int = 10,
                 candidate_topk: int | None = None, use_cache: bool = True, start_token: int | None = None,
                 known_prefix: int = 0, vocab_mask_leak: bool = False, n0_scaled: bool = False,
                 similarity_model: str | None = "minilm", seed: int = 0, trust_remote_code: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.snrs = [float(s) for s in (snr_db if snr_db is not None else [0, 4, 8, 12, 16, 20])]
        if not self.snrs:
            raise ValueError("model.init_args.snr_db is empty: give at least one SNR in dB, e.g. [0, 4, 8]")
        self.systems = list(systems or ["llm_sc", "greedy", "uncoded"])
        bad = [s for s in self.systems if s not in SYSTEMS]
        if bad:
            raise ValueError(f"model.init_args.systems: unknown {bad}; choose from {', '.join(SYSTEMS)}")
        if beam_width < 1 or known_prefix < 0:
            raise ValueError(f"model.init_args.beam_width must be >= 1 and known_prefix >= 0, got {beam_width}, "
                             f"{known_prefix}")
        self.sums = torch.nn.ModuleDict({self._key(sys, snr, name): torchmetrics.SumMetric()
                                         for sys in self.systems for snr in self.snrs for name in SUMS})
        self.tokenizer: Any = None
        self.lm: Any = None
        self.modem: TokenModem | None = None
        self.prior: CausalLMPrior | None = None
        self.similarity: SentenceSimilarity | None = None
        self.results: dict[str, dict[str, dict[float, float]]] = {}

    @staticmethod
    def _key(system: str, snr: float, name: str) -> str:
        return f"{system}_{name}_snr{snr:g}".replace(".", "p").replace("-", "m")

    def configure_model(self) -> None:
        if self.lm is not None:
            return
        hp = self.hparams
        self.tokenizer, self.lm = load_causal_lm(hp.model, hp.dtype, hp.trust_remote_code, "model.init_args.model")
        for p in self.lm.parameters():
            p.requires_grad_(False)
        try:
            self.modem = TokenModem(len(self.tokenizer), hp.modulation, hp.energy, hp.pad_bits)
        except ValueError as err:
            raise ValueError(f"model.init_args.modulation / pad_bits: {err}") from err
        if hp.similarity_model:
            self.similarity = SentenceSimilarity(resolve_model(hp.similarity_model))

    def on_test_start(self) -> None:
        hp = self.hparams
        dm = self.trainer.datamodule
        data_tok = getattr(dm, "tokenizer", None)
        if data_tok is not None and len(data_tok) != self.modem.vocab_size:
            raise ValueError(f"data.init_args.tokenizer has {len(data_tok)} tokens but model.init_args.model's "
                             f"prior has {self.modem.vocab_size}: give the data the model's tokenizer")
        mask = None
        if hp.vocab_mask_leak:  # release: every id never seen in the (test) corpus, plus the start token
            seen = torch.zeros(self.modem.vocab_size, dtype=torch.bool)
            seen[torch.tensor([i for r in dm.rows for i in r["ids"]])] = True
            mask = (~seen).nonzero()[:, 0]
        self.prior = CausalLMPrior(self.lm, use_cache=hp.use_cache, mask_ids=mask)

    @property
    def start_id(self) -> int:
        hp, tok = self.hparams, self.tokenizer
        if hp.start_token is not None:
            return hp.start_token
        return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        hp = self.hparams
        k = hp.known_prefix
        ids, lengths = batch["ids"], batch["lengths"]
        if k >= int(lengths.min()):
            raise ValueError(f"model.init_args.known_prefix={k} leaves nothing to send for a sentence of "
                             f"{int(lengths.min())} tokens; lower it or raise data.init_args.min_tokens")
        prompt = torch.cat([torch.full_like(ids[:, :1], self.start_id), ids[:, :k]], 1)
        sent, sent_len = ids[:, k:], lengths - k
        pad = self.tokenizer.pad_token_id or 0
        rows = ids.tolist()
        for snr in self.snrs:
            for system in self.systems:
                gen = keyed_generator(hp.seed, batch_idx, round(snr * 100))
                res = run_link(system, self.modem, self.prior, sent, sent_len, prompt, snr, hp.channel, gen,
                               hp.beam_width, hp.candidate_topk, hp.n0_scaled, pad)
                hyps = [self.tokenizer.decode(row[:k] + [min(i, self.modem.vocab_size - 1) for i in hat[:n]])
                        for row, hat, n in zip(rows, res.ids.tolist(), sent_len.tolist(), strict=True)]
                scores = sentence_scores(batch["text"], hyps, self.similarity)
                counts = {"bit_errors": res.bit_errors.sum(), "bits": res.bits.sum(),
                          "token_errors": res.token_errors.sum(), "tokens": res.tokens.sum(),
                          "sentences": torch.tensor(float(len(hyps)))}
                counts.update({name: v.sum() for name, v in scores.items()})
                for name, value in counts.items():
                    self.sums[self._key(system, snr, name)].update(value.float())

    def on_test_epoch_end(self) -> None:
        names = {"ber": ("bit_errors", "bits"), "ter": ("token_errors", "tokens"), "bleu1": ("bleu1", "sentences"),
                 "bleu4": ("bleu4", "sentences")}
        if self.similarity is not None:
            names["similarity"] = ("similarity", "sentences")
        self.results = {metric: {} for metric in names}
        for metric, (num, den) in names.items():
            for system in self.systems:
                self.results[metric][system] = {}
                for snr in self.snrs:
                    value = self.sums[self._key(system, snr, num)].compute() / \
                        self.sums[self._key(system, snr, den)].compute().clamp_min(1)
                    self.log(f"test/{metric}_{system}_snr{snr:g}", value)
                    self.results[metric][system][snr] = float(value)
        out = run_directory(self.trainer)  # a collective call: every rank
        if self.global_rank == 0:
            hp = self.hparams
            png = save_snr_curves(self.results, out / "llm_sc_curves.png",
                                  f"{hp.model}, {hp.modulation}, {hp.channel}, beam {hp.beam_width}")
            for logger in self.loggers:
                if hasattr(logger, "log_image"):  # W&B
                    logger.log_image(key="test/llm_sc_curves", images=[str(png)])
