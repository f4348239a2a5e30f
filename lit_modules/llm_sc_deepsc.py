"""DeepSC, the trained semantic-communication baseline LLM-SC is compared with.

Xie, Qin, Li, Juang. "Deep Learning Enabled Semantic Communication Systems", IEEE Trans. Signal
Processing 69 (2021). Authors' PyTorch code: github.com/13274086/DeepSC.

Idea. A word-level Transformer learns the semantic and the channel code jointly: the channel sits
in the forward pass, with an SNR drawn per batch, and the loss is the cross-entropy of the
reconstructed words (the paper's L_CE term; the optional MINE mutual-information term is left out).

Equations -> code:
    L_CE = -sum_l log p(w_l | w_<l, y)          -> ``training_step`` (padding masked)
    transmitter, channel, receiver                -> ``core.deepsc.DeepSC``
Validation and test decode greedily at every SNR of ``eval_snr_db`` and log BLEU-1/4
(``{split}/bleu1_snr<dB>``); the curves are drawn to ``deepsc_{val,test}_curves.png`` in the run directory.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
import torchmetrics
from torch import Tensor

from core.deepsc import DeepSC
from core.rng import keyed_generator
from core.run_dir import run_directory
from core.snr_curves import save_snr_curves
from core.text_metrics import sentence_bleu


class DeepSCModule(L.LightningModule):
    """DeepSC trained on the corpus' training split, evaluated by BLEU vs SNR.

    Args:
        d_model: Transformer width (paper 128).
        num_heads: attention heads (paper 8).
        dff: feed-forward width (paper 512).
        num_layers: encoder and decoder layers each (paper 4).
        symbols: real channel uses per word (paper 16).
        dropout: dropout (paper 0.1).
        channel: ``awgn``, ``fast`` (Rayleigh per symbol) or ``block``; zero-forcing with perfect CSI.
        train_snr_db: SNR range (E_s/N0, dB) drawn uniformly per batch (release 5-10 dB in its own
            definition, which is about 3 dB below E_s/N0 per complex symbol: 8-13 dB here).
        eval_snr_db: SNR grid of validation and test.
        lr: Adam learning rate (paper 1e-4).
        betas: Adam betas (paper (0.9, 0.98)).
        weight_decay: Adam weight decay (paper 5e-4).
        seed: seed of the evaluation noise.
    """

    def __init__(self, d_model: int = 128, num_heads: int = 8, dff: int = 512, num_layers: int = 4, symbols: int = 16,
                 dropout: float = 0.1, channel: Literal["awgn", "fast", "block"] = "awgn",
                 train_snr_db: tuple[float, float] = (8.0, 13.0), eval_snr_db: list[float] | None = None,
                 lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.98), weight_decay: float = 5e-4,
                 seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.snrs = [float(s) for s in (eval_snr_db if eval_snr_db is not None else [0, 6, 12, 18])]
        if not self.snrs:
            raise ValueError("model.init_args.eval_snr_db is empty: give at least one SNR in dB")
        if symbols % 2:
            raise ValueError(f"model.init_args.symbols must be even (real pairs form complex symbols), got {symbols}")
        self.net: DeepSC | None = None
        self.vocab: Any = None
        self.bleu = torch.nn.ModuleDict({f"{split}_{n}_{i}": torchmetrics.MeanMetric() for split in ("val", "test")
                                         for n in ("bleu1", "bleu4") for i in range(len(self.snrs))})

    def configure_model(self) -> None:
        if self.net is not None:
            return
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is None or getattr(dm, "vocab", None) is None:
            raise ValueError("DeepSCModule needs data: datamodules.llm_sc.DeepSCDataModule (its word vocabulary)")
        self.vocab = dm.vocab
        hp = self.hparams
        self.net = DeepSC(len(self.vocab), hp.d_model, hp.num_heads, hp.dff, hp.num_layers, hp.symbols, hp.dropout)

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        lo, hi = self.hparams.train_snr_db
        snr = lo + (hi - lo) * float(torch.rand(()))  # one SNR per batch (a host scalar by design)
        logits = self.net(batch, self.vocab.pad_id, snr, self.hparams.channel)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(),
                                                 ignore_index=self.vocab.pad_id)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def decode(self, batch: Tensor, snr: float, generator: torch.Generator) -> list[str]:
        """Greedy transmission and decoding of word-id sentences -> normalised strings."""
        out = self.net.greedy(batch, self.vocab.pad_id, self.vocab.start_id, snr, self.hparams.channel, generator)
        return [self.vocab.decode(row) for row in out.tolist()]

    def _eval(self, split: str, batch: Tensor, batch_idx: int) -> None:
        refs = [self.vocab.decode(row[1:]) for row in batch.tolist()]
        for i, snr in enumerate(self.snrs):
            hyps = self.decode(batch, snr, keyed_generator(self.hparams.seed, batch_idx, round(snr * 100)))
            for n in (1, 4):
                self.bleu[f"{split}_bleu{n}_{i}"].update(sentence_bleu(refs, hyps, n))

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        self._eval("val", batch, batch_idx)

    def test_step(self, batch: Tensor, batch_idx: int) -> None:
        self._eval("test", batch, batch_idx)

    def _log_epoch(self, split: str) -> dict[str, dict[str, dict[float, float]]]:
        curves: dict[str, dict[str, dict[float, float]]] = {"bleu1": {"deepsc": {}}, "bleu4": {"deepsc": {}}}
        for i, snr in enumerate(self.snrs):
            for n in (1, 4):
                value = self.bleu[f"{split}_bleu{n}_{i}"].compute()
                self.log(f"{split}/bleu{n}_snr{snr:g}", value)
                self.bleu[f"{split}_bleu{n}_{i}"].reset()
                curves[f"bleu{n}"]["deepsc"][snr] = float(value)
        return curves

    def on_validation_epoch_end(self) -> None:
        self._draw("val", self._log_epoch("val"))

    def on_test_epoch_end(self) -> None:
        self._draw("test", self._log_epoch("test"))

    def _draw(self, split: str, curves: dict[str, dict[str, dict[float, float]]]) -> None:
        if self.trainer.sanity_checking:
            return
        out = run_directory(self.trainer)  # a collective call: every rank
        if self.global_rank != 0:
            return
        png = save_snr_curves(curves, out / f"deepsc_{split}_curves.png", f"DeepSC {split}, {self.hparams.channel}", ())
        for logger in self.loggers:
            if hasattr(logger, "log_image"):  # W&B
                logger.log_image(key=f"{split}/deepsc_curves", images=[str(png)])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        return torch.optim.Adam(self.parameters(), lr=hp.lr, betas=tuple(hp.betas), eps=1e-8,
                                weight_decay=hp.weight_decay)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["vocab_words"] = self.vocab.words  # the word list that gives the ids their meaning
