"""ContinualModule: the unified loss by hand, IL accuracies, refresh at size 0, resume, DDP, CLI, bad input."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch import nn

from callbacks.refresh import RefreshLearning
from datamodules.class_incremental import ClassIncrementalStream
from lit_modules.refresh import ContinualModule
from train import cli_main

REPO = Path(__file__).resolve().parents[2]
SMALL = dict(backbone="cnn", width=4, in_channels=1, image_size=8, lr=0.05, buffer_size=40, minibatch_size=8)


def stream(**kwargs) -> ClassIncrementalStream:
    return ClassIncrementalStream("digits", test_per_class=36, batch_size=32, **kwargs)


def fit(module, dm, callbacks=(), **kwargs) -> L.Trainer:
    ckpt_path = kwargs.pop("ckpt_path", None)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=kwargs.pop("enable_checkpointing", False), num_sanity_val_steps=0,
                        callbacks=list(callbacks), **kwargs)
    trainer.fit(module, dm, ckpt_path=ckpt_path)
    return trainer


# ----------------------------------------------------------------------------- Eq. (1) by hand
def log_softmax(row: list[float], k: int) -> float:
    return row[k] - math.log(sum(math.exp(v) for v in row))


@pytest.mark.parametrize("method", ["sgd", "er", "der", "derpp", "ewc"])
def test_each_configuration_of_the_unified_loss_matches_a_hand_computation(method: str) -> None:
    weights = dict(sgd=(0, 0, 0), er=(0, 0.7, 0), der=(0.3, 0, 0), derpp=(0.3, 0.7, 0), ewc=(0, 0, 2.0))[method]
    alpha, beta, lam = weights
    module = ContinualModule(num_classes=3, alpha=alpha, beta=beta, ewc_lambda=lam, buffer_size=2, minibatch_size=2)
    module.net = nn.Sequential(nn.Flatten(), nn.Linear(2, 3, bias=False))
    with torch.no_grad():
        module.net[1].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))  # logits of (a, b): (a, b, a+b)
    # buffer: (1, 0) labelled 0 with stored logits (0, 0, 0); (0, 2) labelled 2 with stored logits (1, 1, 1)
    module.buffer.add(torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 2]),
                      logits=torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]), task_labels=torch.tensor([0, 1]))
    module.anchor = {"1.weight": torch.zeros(3, 2)}
    module.importance = {"1.weight": torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 0.5]])}
    batch = {"image": torch.tensor([[1.0, 2.0]]), "label": torch.tensor([2]), "task": torch.tensor([1])}
    loss, _, parts = module.objective(batch)
    ce = -log_softmax([1, 2, 3], 2)
    der = ((1 + 0 + 1) + (1 + 1 + 1)) / 6  # replayed logits (1, 0, 1) vs 0 and (0, 2, 2) vs 1: mean square
    er = -(log_softmax([1, 0, 1], 0) + log_softmax([0, 2, 2], 2)) / 2
    ewc = 0.5 * (1.0 * 1.0**2 + 0.5 * 1.0**2)
    assert parts["ce"].item() == pytest.approx(ce)
    assert loss.item() == pytest.approx(ce + alpha * der + beta * er + lam * ewc, rel=1e-6)
    assert set(parts) == {"ce"} | {k for k, w in (("der", alpha), ("er", beta), ("ewc", lam)) if w}


def test_class_il_and_task_il_come_from_the_same_logits() -> None:
    module = ContinualModule(num_classes=4, class_il_scope="seen")
    dm = SimpleNamespace(task_of_epoch=lambda e: 0)
    module._trainer = SimpleNamespace(datamodule=dm, current_epoch=0)
    module.task_classes = [[0, 1], [2, 3]]
    logits = torch.tensor([[0.0, 1.0, 5.0, 0.0], [2.0, 1.0, 0.0, 3.0], [0.0, 0.0, 1.0, 2.0]])
    labels = torch.tensor([2, 3, 2])
    # task 1: task-IL looks at outputs 2, 3 only -> predictions (2, 3, 3); class-IL over seen classes 0, 1 only
    assert module._count(logits, labels, 1).tolist() == [0, 2]
    module.hparams.class_il_scope = "all"  # over all outputs: predictions (2, 3, 3)
    assert module._count(logits, labels, 1).tolist() == [2, 2]


# ----------------------------------------------------------------------------- refresh at size 0
@pytest.mark.parametrize("unlearn_loss", ["ce", "objective"])
def test_refresh_of_size_zero_is_bit_identical_to_the_base_method(unlearn_loss: str) -> None:
    def run(callbacks) -> ContinualModule:
        L.seed_everything(0)
        module = ContinualModule(**SMALL, alpha=0.2, beta=0.5, crop_padding=1)
        fit(module, stream(epochs_per_task=1), callbacks, max_epochs=2)
        return module

    base = run([])
    same = run([RefreshLearning(delta=0.0, unlearn_loss=unlearn_loss, noise_scale=1.0)])
    moved = run([RefreshLearning(delta=1e-3, unlearn_loss=unlearn_loss)])
    for name, value in base.state_dict().items():
        assert torch.equal(same.state_dict()[name], value), name
    assert base.results["summary"] == same.results["summary"]
    assert not torch.equal(moved.net.classifier.weight, base.net.classifier.weight)


def test_refresh_loss_unlearns_the_whole_objective_when_asked() -> None:
    """A refresh_loss that ignores ``objective`` (CE only in both modes) must fail here."""
    L.seed_everything(0)
    module = ContinualModule(**SMALL, alpha=0.3, beta=0.7, num_classes=10)
    module._trainer = SimpleNamespace(global_step=5, global_rank=0)
    images = torch.randn(12, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(12) % 4
    module.buffer.add(images, labels, logits=torch.randn(12, 10), task_labels=labels // 2)
    batch = {"image": images[:6], "label": labels[:6], "task": labels[:6] // 2}
    full, ce = module.refresh_loss(batch, objective=True), module.refresh_loss(batch, objective=False)
    torch.testing.assert_close(full, module.objective(batch)[0], rtol=0, atol=0)  # same replay draws in the step
    torch.testing.assert_close(ce, module.objective(batch)[2]["ce"], rtol=0, atol=0)
    assert full.item() > ce.item() + 1e-3


def test_paper_mode_trains_a_real_tiny_stream(run_overrides) -> None:
    """refresh_paper.yaml (objective unlearning, inverse Fisher, Langevin noise) through the CLI: its
    weights leave the base run's, stay finite, and the Fisher of task 0 preconditions task 1."""
    common = ["--config", str(REPO / "configs/refresh/demo.yaml"), "--config", str(REPO / "configs/refresh/demo_digits.yaml"),
              "--data.init_args.epochs_per_task=1", "--trainer.max_epochs=2", "--trainer.limit_train_batches=4",
              "--model.init_args.plot=false", *run_overrides]
    paper = cli_main(["fit", *common, "--config", str(REPO / "configs/refresh/refresh_paper.yaml")])
    base = cli_main(["fit", *common, "--config", str(REPO / "configs/refresh/no_refresh.yaml")])
    callback = next(c for c in paper.trainer.callbacks if isinstance(c, RefreshLearning))
    assert (callback.unlearn_loss, callback.normalize, callback.preconditioner, callback.noise) == (
        "objective", False, "inverse", "langevin")
    assert callback.fisher_done == 1 and all(f.abs().sum() > 0 for f in callback.fisher.values())
    moved = [not torch.equal(a, b) for a, b in zip(paper.model.parameters(), base.model.parameters())]
    assert all(moved) and all(torch.isfinite(p).all() for p in paper.model.parameters())


def test_gradient_accumulation_is_refused() -> None:
    with pytest.raises(ValueError, match="trainer.accumulate_grad_batches=2.*use 1"):
        fit(ContinualModule(**SMALL, beta=1.0), stream(epochs_per_task=1), max_epochs=1, accumulate_grad_batches=2)


# ----------------------------------------------------------------------------- resume, DDP
@pytest.mark.slow
@pytest.mark.parametrize("checkpoint", ["epoch=0-step=9.ckpt", "epoch=1-step=18.ckpt", "mid-step=13.ckpt"])
@pytest.mark.filterwarnings("ignore:.*resuming from a checkpoint that ended before the epoch ended")
def test_resume_equals_the_uninterrupted_run(tmp_path, checkpoint: str) -> None:
    """At a task end (validation-end checkpoint, before the task's Fisher), inside a task, and mid-epoch
    (step 13 of the 9-batch epoch 1): weights, Fisher, EWC importance and counters as uninterrupted."""
    kwargs = dict(**SMALL, beta=1.0, ewc_lambda=5.0)
    epochs = [1, 2, 1, 1, 1]

    def refresh() -> RefreshLearning:
        return RefreshLearning(delta=1e-3, fisher_examples=64)

    L.seed_everything(0)
    full = ContinualModule(**kwargs)
    full_cb = refresh()
    fit(full, stream(epochs_per_task=epochs), [full_cb], max_epochs=4)
    L.seed_everything(0)
    first = ContinualModule(**kwargs)
    every = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1, save_top_k=-1)
    mid = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, filename="mid-{step}", every_n_train_steps=13,
                                              save_top_k=-1)
    fit(first, stream(epochs_per_task=epochs), [refresh(), every, mid], max_epochs=2, enable_checkpointing=True)
    L.seed_everything(123)  # the global RNG plays no part after construction
    resumed = ContinualModule(**kwargs)
    resumed_cb = refresh()
    fit(resumed, stream(epochs_per_task=epochs), [resumed_cb], max_epochs=4, ckpt_path=str(tmp_path / checkpoint))
    for name, value in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
    torch.testing.assert_close(full.results["matrix"], resumed.results["matrix"], equal_nan=True, rtol=0, atol=0)
    assert all(torch.equal(full.importance[n], resumed.importance[n]) for n in full.importance)
    assert all(torch.equal(full_cb.fisher[n], resumed_cb.fisher[n]) for n in full_cb.fisher)
    # the Fisher of tasks 0 and 1, each estimated once, at the start of the next task
    assert full_cb.fisher_done == resumed_cb.fisher_done == 2 and full.ewc_tasks_done == resumed.ewc_tasks_done == 2


def test_the_task_fisher_is_estimated_at_the_next_task_start_with_the_task_end_weights() -> None:
    seen = {}

    class AtTaskEnd(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module) -> None:
            if trainer.current_epoch == 1:  # end of task 0 (2 epochs)
                seen["weights"] = copy.deepcopy(pl_module.net.state_dict())  # with the BN statistics

    L.seed_everything(0)
    module = ContinualModule(**SMALL, beta=1.0, ewc_lambda=1.0)
    callback = RefreshLearning(delta=1e-3, fisher_examples=32, fisher_bn="eval")
    fit(module, stream(epochs_per_task=2), [AtTaskEnd(), callback], max_epochs=3, limit_train_batches=3)
    from core.fisher import dataset_fisher

    net = copy.deepcopy(module.net)
    net.load_state_dict(seen["weights"])
    want = dataset_fisher(net, module.trainer.datamodule.train_set(0), module.fisher_examples, lambda t: t,
                          bn_mode="eval", max_examples=32, seed=0)
    for name, value in want.items():
        torch.testing.assert_close(callback.fisher[name], value, rtol=1e-5, atol=1e-9)
        assert torch.equal(module.anchor[name], seen["weights"][name])  # EWC anchors the task-end weights too
    assert callback.fisher_done == 1 and module.ewc_tasks_done == 1


class DumpRankState(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_end(self, trainer, pl_module) -> None:
        refresh = next(c for c in trainer.callbacks if isinstance(c, RefreshLearning))
        torch.save({"module": pl_module.state_dict(), "fisher": refresh.fisher},
                   self.out / f"rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_ddp_spawn_keeps_every_rank_identical(tmp_path) -> None:
    module = ContinualModule(**SMALL, alpha=0.2, beta=0.5)
    fit(module, stream(epochs_per_task=1), [RefreshLearning(delta=1e-3), DumpRankState(tmp_path)], max_epochs=2,
        strategy="ddp_spawn", devices=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for name, value in ranks[0]["module"].items():
        assert torch.equal(ranks[1]["module"][name], value), name
    assert all(torch.equal(ranks[1]["fisher"][n], v) for n, v in ranks[0]["fisher"].items())
    # the buffer saw the global stream of both ranks: the 2 x 288 training digits of tasks 0 and 1
    assert int(ranks[0]["module"]["buffer.num_seen"]) == 576
    assert set(ranks[0]["module"]["buffer.task_labels"].tolist()) == {0, 1}


# ----------------------------------------------------------------------------- CLI, logging, bad input
def test_fast_dev_run_through_the_cli(run_overrides) -> None:
    cli = cli_main(["fit", "--config", str(REPO / "configs/refresh/demo.yaml"), "--trainer.fast_dev_run=true",
                    *run_overrides])
    assert cli.trainer.global_step == 1 and cli.model.buffer is not None and len(cli.model.buffer) == 32


def test_digits_demo_runs_end_to_end_and_draws_the_matrices(run_overrides, tmp_path) -> None:
    cli = cli_main(["fit", "--config", str(REPO / "configs/refresh/demo.yaml"), "--config",
              str(REPO / "configs/refresh/demo_digits.yaml"), "--data.init_args.epochs_per_task=1", *run_overrides])
    metrics = (next(tmp_path.rglob("metrics.csv"))).read_text()
    assert "val/final_avg_acc_class_il" in metrics and "val/forgetting_task_il" in metrics
    assert {p.name for p in tmp_path.rglob("acc_matrix_*.png")} == {"acc_matrix_class_il.png", "acc_matrix_task_il.png"}
    # `train.py test` measures the same final average accuracy as the last row of the matrix (eval on test)
    tested = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    summary = cli.model.results["summary"]
    for mode in ("class_il", "task_il"):
        assert tested[f"test/final_avg_acc_{mode}"] == pytest.approx(summary[f"final_avg_acc_{mode}"], abs=1e-6)


def test_accuracy_matrix_reaches_wandb_as_a_table_and_an_image(tmp_path) -> None:
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(project="litzoo-test", save_dir=str(tmp_path), offline=True)
    trainer = L.Trainer(accelerator="cpu", logger=logger, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, num_sanity_val_steps=0, max_epochs=1)
    trainer.fit(ContinualModule(**SMALL, beta=1.0), stream(epochs_per_task=1))
    summary = dict(logger.experiment.summary)
    logger.experiment.finish()
    # the PNGs live in the W&B run's own folder (never in the current folder or the shared save_dir)
    assert (tmp_path / "litzoo-test" / logger.version / "acc_matrix_class_il.png").is_file()
    assert not list(tmp_path.glob("*.png")) and tmp_path.resolve() == Path.cwd().resolve()
    assert summary["val/acc_matrix_class_il"]["_type"] == "table-file"
    assert summary["val/acc_heatmap_task_il"]["_type"] == "images/separated"


def test_bad_input_names_the_config_key() -> None:
    with pytest.raises(ValueError, match="model.init_args.buffer_size >= 1"):
        ContinualModule(beta=1.0, buffer_size=0)
    with pytest.raises(ValueError, match="model.init_args.minibatch_size >= 1, got 0"):
        ContinualModule(alpha=0.1, buffer_size=10, minibatch_size=0)
    with pytest.raises(ValueError, match="model.init_args.num_classes=4 but the stream has 10"):
        fit(ContinualModule(**{**SMALL, "buffer_size": 0}, num_classes=4), stream(), max_epochs=1)
    with pytest.raises(TypeError, match="task stream.*missing method"):
        trainer = SimpleNamespace(datamodule=L.LightningDataModule())
        module = ContinualModule()
        module._trainer = trainer
        module.setup("fit")
