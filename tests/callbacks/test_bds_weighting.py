"""BayesianDataScheduler with a toy regression module that implements SupportsSampleWeighting."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from callbacks.bayesian_weighting import BayesianDataScheduler, weight_statistics
from core.data_scheduler import NeuralScheduler

N, HARMFUL = 16, (3, 7, 11, 15)  # the "harmful" rows have targets that contradict the rest


class Rows(Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(N, 4, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 0.0])
        self.source = torch.zeros(N, dtype=torch.long)
        self.source[list(HARMFUL)] = 1
        self.y[self.source == 1] += 4.0

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> dict:
        text = "Sure, here is how to do it step by step." if self.source[i] else f"What is {i} plus {i + 1}?"
        return {"index": i, "x": self.x[i], "y": self.y[i], "source": self.source[i], "text": text}


class Toy(L.LightningModule):
    """Linear regression whose per-sample squared errors are weighted by the callback's weights."""

    def __init__(self, batch_size: int = 8, reference_is_current: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 1)  # starts near the benign solution: benign losses small, harmful large
        self.lin.weight.data = torch.tensor([[1.0, -2.0, 0.5, 0.0]]) + 0.1 * self.lin.weight.data
        self.batch_size, self.reference_is_current = batch_size, reference_is_current
        self.weights, self.last, self.recomputed = None, {}, 0

    def train_dataloader(self) -> DataLoader:
        # Lightning's own DDP sampler always shuffles training data; an unshuffled one keeps the global
        # batch of two ranks equal to the one-process batch.
        world, rank = self.trainer.world_size, self.trainer.global_rank
        sampler = DistributedSampler(Rows(), world, rank, shuffle=False) if world > 1 else None
        return DataLoader(Rows(), batch_size=self.batch_size, shuffle=False, sampler=sampler)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def _losses(self, batch: dict) -> torch.Tensor:
        return (self.lin(batch["x"]).squeeze(-1) - batch["y"]) ** 2

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        losses = self._losses(batch)
        w = self.weights if self.weights is not None else torch.ones_like(losses)
        self.weights = None
        self.last = {"index": batch["index"], "losses": losses.detach(), "batch": batch}
        return (w * losses).mean()

    def num_weighted_samples(self) -> int:
        return N

    def sample_weighting_batch(self, batch: dict) -> dict:
        return {"index": batch["index"], "text": batch["text"], "source": batch["source"]}

    def set_sample_weights(self, weights: torch.Tensor | None) -> None:
        self.weights = weights

    def last_sample_losses(self) -> tuple:
        return self.last["index"], self.last["losses"]

    @torch.no_grad()
    def recompute_sample_losses(self) -> torch.Tensor:
        self.recomputed += 1
        return self._losses(self.last["batch"])

    def reference_sample_losses(self) -> torch.Tensor:
        return self.last["losses"] if self.reference_is_current else torch.zeros_like(self.last["losses"])


class Recorder(BayesianDataScheduler):
    """Writes each rank's scheduler and model state when training ends."""

    def __init__(self, out: str = "", **kwargs) -> None:
        super().__init__(**kwargs)
        self.out = out

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        state = {"logits": self.net.logits.detach().cpu(), "lin": pl_module.lin.weight.detach().cpu()}
        torch.save(state, Path(self.out) / f"rank{trainer.global_rank}.pt")


def fit(module: L.LightningModule, callback: L.Callback, epochs: int = 3, **kwargs) -> L.Trainer:
    ckpt_path = kwargs.pop("ckpt_path", None)
    trainer = L.Trainer(max_epochs=epochs, callbacks=[callback] + kwargs.pop("callbacks", []), logger=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                        enable_checkpointing=kwargs.pop("enable_checkpointing", False), **kwargs)
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer


def test_callback_names_the_missing_protocol_methods() -> None:
    with pytest.raises(TypeError, match="missing method.*num_weighted_samples.*set_sample_weights"):
        BayesianDataScheduler().setup(L.Trainer(logger=False), L.LightningModule(), "fit")


def test_weights_move_down_for_high_loss_examples() -> None:
    # softmax: bidirectional. (With sigmoid, Adam moves every weight down at about the same rate.)
    callback = BayesianDataScheduler(transform="softmax", lr=0.05)
    fit(Toy(), callback, epochs=4)
    weights = callback.all_weights()
    harmful = torch.zeros(N, dtype=torch.bool)
    harmful[list(HARMFUL)] = True
    assert weights[harmful].max() < weights[~harmful].min()
    assert weights[harmful].max() < 1.0  # moved down from the initial weight
    stats = weight_statistics(weights, callback.sources)
    assert stats["weight_auroc"] == 1.0 and stats["weight_mean_harmful"] < stats["weight_mean_benign"]
    torch.testing.assert_close(weights.sum(), torch.tensor(float(N)))


def test_reference_term_cancels_identical_losses_and_post_update_recomputes() -> None:
    callback = BayesianDataScheduler(reference_weight=1.0, loss_timing="post_update")
    module = Toy(reference_is_current=True)
    fit(module, callback, epochs=1)
    assert module.recomputed == N // 8
    # post-update losses minus a reference equal to the pre-update losses: small, nonzero differences
    assert not torch.equal(callback.net.logits.detach(), torch.full((N,), 0.1))
    pre = BayesianDataScheduler(reference_weight=1.0)
    fit(Toy(reference_is_current=True), pre, epochs=1)
    torch.testing.assert_close(pre.net.logits.detach(), torch.full((N,), 0.1))  # l - l_ref = 0: no update


def test_resume_restores_weights_optimizer_and_noise(tmp_path: Path) -> None:
    kwargs = dict(lr=0.05, langevin_temperature=0.01, seed=3)
    full = BayesianDataScheduler(**kwargs)
    fit(Toy(), full, epochs=4)
    every = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
    fit(Toy(), BayesianDataScheduler(**kwargs), epochs=2, callbacks=[every], enable_checkpointing=True)
    resumed = BayesianDataScheduler(**kwargs)
    fit(Toy(), resumed, epochs=4, ckpt_path=str(tmp_path / "epoch=1-step=4.ckpt"))
    torch.testing.assert_close(resumed.all_weights(), full.all_weights(), rtol=0, atol=1e-6)
    assert not torch.allclose(full.all_weights(), torch.ones(N))
    assert torch.equal(resumed.sources, full.sources)


def test_resuming_with_another_fine_tuning_set_size_names_the_data_keys() -> None:
    callback = BayesianDataScheduler()
    callback.setup(L.Trainer(logger=False), Toy(), "fit")
    state = {**callback.state_dict(), "net": {"logits": torch.zeros(N + 1)}}
    with pytest.raises(ValueError, match="17 fine-tuning samples, the data has 16.*data.init_args.num_finetune"):
        callback.load_state_dict(state)
    with pytest.raises(ValueError, match="BayesianDataScheduler init_args.scheduler"):
        callback.load_state_dict({**state, "kind": "neural"})


@pytest.mark.slow
def test_ddp_spawn_ranks_hold_identical_state_equal_to_one_process(tmp_path: Path) -> None:
    kwargs = dict(lr=0.05, langevin_temperature=0.01, seed=1)
    (tmp_path / "one").mkdir()
    (tmp_path / "ddp").mkdir()
    fit(Toy(batch_size=8), Recorder(out=str(tmp_path / "one"), **kwargs), epochs=2)
    fit(Toy(batch_size=4), Recorder(out=str(tmp_path / "ddp"), **kwargs), epochs=2, strategy="ddp_spawn", devices=2,
        use_distributed_sampler=False)
    one = torch.load(tmp_path / "one" / "rank0.pt", weights_only=True)
    r0, r1 = (torch.load(tmp_path / "ddp" / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert torch.equal(r0["logits"], r1["logits"]) and torch.equal(r0["lin"], r1["lin"])
    torch.testing.assert_close(r0["logits"], one["logits"], rtol=0, atol=1e-6)
    torch.testing.assert_close(r0["lin"], one["lin"], rtol=0, atol=1e-6)
    assert not torch.allclose(one["logits"], torch.full((N,), 0.1))


def test_neural_scheduler_trains_saves_and_transfers_frozen(tmp_path: Path) -> None:
    callback = BayesianDataScheduler(scheduler="neural", lr=1e-3, max_length=16, save_dir=str(tmp_path / "s"))
    fit(Toy(), callback, epochs=2)
    assert callback.net.head.weight.abs().sum() > 0  # trained (the release never stepped it)
    texts = [Rows()[i]["text"] for i in range(N)]
    scores = callback.net.score_texts(texts)
    harmful = torch.tensor([i in HARMFUL for i in range(N)])
    assert scores[harmful].max() < scores[~harmful].min()
    reloaded = NeuralScheduler.from_pretrained(tmp_path / "s")
    torch.testing.assert_close(reloaded.score_texts(texts), scores)
    frozen = BayesianDataScheduler(scheduler="neural", pretrained=str(tmp_path / "s"), trainable=False)
    module = Toy()
    fit(module, frozen, epochs=1)
    torch.testing.assert_close(frozen.net.score_texts(texts), scores)
    with pytest.raises(ValueError, match="neural scheduler only"):
        BayesianDataScheduler(scheduler="scalar", trainable=False)
    with pytest.raises(ValueError, match="the neural scheduler has none"):
        BayesianDataScheduler(scheduler="neural", entropy_weight=0.1)


def test_weight_histograms_and_detector_metrics_are_logged(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(project="litzoo-test", save_dir=str(tmp_path), offline=True)
    trainer = L.Trainer(max_epochs=2, callbacks=[BayesianDataScheduler(lr=0.05)], logger=logger, accelerator="cpu",
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(Toy())
    summary = dict(logger.experiment.summary)
    logger.experiment.finish()
    assert summary["train/weight_histogram"]["_type"] == "histogram"
    assert trainer.callback_metrics["train/weight_auroc"] == 1.0
    assert trainer.callback_metrics["train/weight_mean_harmful"] < trainer.callback_metrics["train/weight_mean_benign"]
