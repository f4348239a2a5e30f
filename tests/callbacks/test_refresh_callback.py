"""RefreshLearning with a toy module: the update formula, BN statistics, own RNG, Fisher state, protocol errors."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from callbacks.refresh import RefreshLearning, unlearning_displacement
from core.fisher import DiagonalFisher

pytestmark = pytest.mark.filterwarnings("ignore:.*self.log.*:UserWarning")


def blobs(n: int = 64) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 3
    points = torch.randn(n, 4, generator=gen) + 2.0 * F.one_hot(labels, 4).float()
    return [{"x": p, "y": y} for p, y in zip(points, labels)]


class ToyModule(L.LightningModule):
    """Not a ContinualModule: an MLP with BatchNorm that implements SupportsRefresh."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.body(batch["x"]), batch["y"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(blobs(), batch_size=16, shuffle=False)

    def refresh_network(self) -> nn.Module:
        return self.body

    def refresh_loss(self, batch, objective: bool):
        return F.cross_entropy(self.body(batch["x"]), batch["y"])

    def fisher_examples(self, batch):
        return batch["x"], batch["y"]


def unlearn_once(module: ToyModule, callback: RefreshLearning, batch, step: int = 0) -> None:
    trainer = SimpleNamespace(global_step=step, world_size=1)
    callback.on_train_batch_start(trainer, module, batch, 0)


def batch_of(n: int = 16) -> dict[str, torch.Tensor]:
    rows = blobs()[:n]
    return {"x": torch.stack([r["x"] for r in rows]), "y": torch.stack([r["y"] for r in rows])}


def test_displacement_is_the_released_formula() -> None:
    param, grad = torch.tensor([3.0, 4.0]), torch.tensor([1.0, 0.0])
    fisher, noise = torch.tensor([0.0, 1000.0]), torch.tensor([2.0, -1.0])
    kw = dict(delta=0.1, preconditioner="damped", damping=1e-3, noise_scale=0.5)
    # u = ||theta|| / ||g|| g = (5, 0); move = delta (u + 0.5 xi) / (1 + 1e-3 F) = 0.1 * (6, -0.5) / (1, 2)
    got = unlearning_displacement(param, grad, fisher, noise, normalize=True, noise_mode="scaled", **kw)
    torch.testing.assert_close(got, torch.tensor([0.6, -0.025]))
    for pre in ("damped", "inverse"):  # no Fisher yet (first task) is exactly F = 0
        kw.update(preconditioner=pre)
        assert torch.equal(unlearning_displacement(param, grad, None, noise, normalize=True, noise_mode="scaled", **kw),
                           unlearning_displacement(param, grad, torch.zeros(2), noise, normalize=True,
                                                   noise_mode="scaled", **kw))
    # paper: gamma P g + noise_scale sqrt(2 gamma P) xi with P = (F + damping)^-1
    got = unlearning_displacement(param, grad, torch.tensor([1.0, 3.0]), noise, delta=0.1, normalize=False,
                                  preconditioner="inverse", damping=1.0, noise_mode="langevin", noise_scale=0.5)
    torch.testing.assert_close(got, torch.tensor([0.05 + 0.5 * (0.1**0.5) * 2.0, -0.5 * (0.05**0.5)]))


def test_each_tensor_moves_by_delta_times_its_norm_over_the_damped_fisher() -> None:
    module, batch = ToyModule(), batch_of()
    callback = RefreshLearning(delta=1e-2, noise_scale=0.0)
    callback.fisher = {"0.weight": torch.full((8, 4), 500.0)}
    before = {n: p.detach().clone() for n, p in module.body.named_parameters()}
    unlearn_once(module, callback, batch)
    for name, p in module.body.named_parameters():
        moved = (p.detach() - before[name]).norm()
        expected = 1e-2 * before[name].norm() / (1.5 if name == "0.weight" else 1.0)
        torch.testing.assert_close(moved, expected, rtol=1e-4, atol=0)


def test_unlearning_raises_the_batch_loss_without_touching_bn_stats_grads_or_the_global_rng() -> None:
    module, batch = ToyModule(), batch_of()
    module.train()
    bn = module.body[1]
    stats = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    loss_before = module.refresh_loss(batch, False).item()
    bn.running_mean.copy_(stats[0]), bn.running_var.copy_(stats[1]), bn.num_batches_tracked.copy_(stats[2])
    rng = torch.get_rng_state()
    unlearn_once(module, RefreshLearning(delta=0.05), batch)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in module.parameters())
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    assert torch.equal(bn.num_batches_tracked, stats[2])
    assert module.refresh_loss(batch, False).item() > loss_before + 1e-3


def test_noise_is_keyed_by_the_step() -> None:
    batch = batch_of()
    moved = []
    for step in (3, 3, 4):
        module = ToyModule()
        unlearn_once(module, RefreshLearning(delta=1e-3, noise_scale=10.0), batch, step=step)
        moved.append(module.body[0].weight.detach().clone())
    assert torch.equal(moved[0], moved[1]) and not torch.equal(moved[0], moved[2])


class ToyStream(L.LightningDataModule):
    """One task of blobs, as a TaskStream."""

    def task_of_epoch(self, epoch: int) -> int:
        return 0

    def is_task_end(self, epoch: int) -> bool:
        return False

    def task_classes(self) -> list[list[int]]:
        return [[0, 1, 2]]

    def train_set(self, task: int):
        return blobs()

    def train_dataloader(self):
        return DataLoader(blobs(), batch_size=16, shuffle=False)


def toy_fit(callbacks, max_epochs: int = 1, **kwargs) -> ToyModule:
    module = ToyModule()
    trainer = L.Trainer(max_epochs=max_epochs, callbacks=callbacks, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, accelerator="cpu", **kwargs)
    trainer.fit(module, ToyStream())
    return module


def test_fisher_refreshes_per_epoch_with_decay_and_is_checkpointed(tmp_path) -> None:
    callback = RefreshLearning(delta=1e-4, fisher_update="epoch", fisher_decay=0.5, fisher_bn="eval")
    snapshots = []

    class Snapshot(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):  # the weights the next epoch's start estimates at
            estimate = DiagonalFisher(pl_module.body, "mammoth", "eval")
            for batch in DataLoader(blobs(), batch_size=16):
                estimate.update(batch["x"], batch["y"])
            snapshots.append(estimate.mean())

    module = toy_fit([Snapshot(), callback], max_epochs=3)
    assert callback.fisher_done == 2  # at the starts of epochs 1 and 2
    for name, value in callback.fisher.items():
        torch.testing.assert_close(value, 0.5 * snapshots[0][name] + snapshots[1][name], rtol=1e-4, atol=1e-8)
    module.trainer.save_checkpoint(tmp_path / "c.ckpt")
    state = torch.load(tmp_path / "c.ckpt", weights_only=True)["callbacks"]
    restored = RefreshLearning()
    restored.load_state_dict(next(v for k, v in state.items() if k.startswith("RefreshLearning")))
    assert restored.fisher_done == 2
    assert all(torch.equal(restored.fisher[n], v) for n, v in callback.fisher.items())


def test_fisher_examples_is_a_seeded_subset_of_that_size() -> None:
    from core.fisher import dataset_fisher

    callback = RefreshLearning(delta=1e-4, fisher_update="epoch", fisher_examples=10, fisher_bn="eval", seed=3)
    snapshot = {}

    class Snapshot(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            snapshot.setdefault("net", copy.deepcopy(pl_module.body))  # end of epoch 0

    toy_fit([Snapshot(), callback], max_epochs=2)
    examples = lambda b: (b["x"], b["y"])  # noqa: E731
    want = dataset_fisher(snapshot["net"], blobs(), examples, lambda t: t, bn_mode="eval", max_examples=10, seed=3)
    every = dataset_fisher(snapshot["net"], blobs(), examples, lambda t: t, bn_mode="eval")
    for name, value in want.items():
        torch.testing.assert_close(callback.fisher[name], value, rtol=1e-5, atol=1e-9)
    assert not all(torch.allclose(want[n], every[n]) for n in want)


def test_every_n_steps_unlearns_only_on_those_steps() -> None:
    callback = RefreshLearning(delta=1e-3, every_n_steps=3, fisher_update="never", track_moves=True)
    toy_fit([callback], max_epochs=2)  # 4 batches per epoch: steps 0..7, unlearning at 0, 3, 6
    assert len(callback.moves["ratio"]) == 3
    same = RefreshLearning(delta=1e-3, every_n_steps=1, fisher_update="never", track_moves=True)
    toy_fit([same], max_epochs=2)
    assert len(same.moves["ratio"]) == 8


def test_several_steps_are_successive_ascents() -> None:
    batch = batch_of()
    twice, once = ToyModule(), ToyModule()
    unlearn_once(twice, RefreshLearning(delta=1e-2, steps=2, noise_scale=0.0), batch)
    for _ in range(2):  # the second gradient is taken at the moved weights
        unlearn_once(once, RefreshLearning(delta=1e-2, noise_scale=0.0), batch)
    single = ToyModule()
    unlearn_once(single, RefreshLearning(delta=1e-2, noise_scale=0.0), batch)
    for a, b in zip(twice.parameters(), once.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
    assert not torch.allclose(twice.body[0].weight, single.body[0].weight)


def test_unlearn_loss_chooses_which_loss_the_module_is_asked_for() -> None:
    batch = batch_of()
    for mode, wanted in (("ce", False), ("objective", True)):
        module, asked = ToyModule(), []
        plain = module.refresh_loss
        module.refresh_loss = lambda b, objective, asked=asked, plain=plain: (asked.append(objective), plain(b, objective))[1]
        unlearn_once(module, RefreshLearning(delta=1e-3, unlearn_loss=mode), batch)
        assert asked == [wanted]


def test_the_control_arm_moves_each_tensor_as_far_in_a_random_direction() -> None:
    batch = batch_of()
    moved = {}
    for direction in ("gradient", "random"):
        module = ToyModule()
        before = {n: p.detach().clone() for n, p in module.body.named_parameters()}
        unlearn_once(module, RefreshLearning(delta=1e-2, direction=direction), batch)
        moved[direction] = {n: p.detach() - before[n] for n, p in module.body.named_parameters()}
    for name, step in moved["gradient"].items():
        torch.testing.assert_close(moved["random"][name].norm(), step.norm(), rtol=1e-5, atol=0)
        cosine = F.cosine_similarity(moved["random"][name].flatten(), step.flatten(), dim=0)
        assert abs(cosine) < 0.9, name


def test_protocol_and_settings_are_checked() -> None:
    class Plain(L.LightningModule):
        pass

    trainer = SimpleNamespace(datamodule=None, precision="32-true", accumulate_grad_batches=1)
    with pytest.raises(TypeError, match="missing method.*refresh_network, refresh_loss, fisher_examples"):
        RefreshLearning().setup(trainer, Plain(), "fit")
    with pytest.raises(TypeError, match="TaskStream.*fisher_update='task'.*task_of_epoch, is_task_end, task_classes, train_set"):
        RefreshLearning().setup(trainer, ToyModule(), "fit")
    with pytest.raises(ValueError, match="trainer.precision"):
        RefreshLearning(fisher_update="never").setup(
            SimpleNamespace(datamodule=None, precision="bf16-true", accumulate_grad_batches=1), ToyModule(), "fit")
    with pytest.raises(ValueError, match="trainer.accumulate_grad_batches=2"):
        RefreshLearning(fisher_update="never").setup(
            SimpleNamespace(datamodule=None, precision="32-true", accumulate_grad_batches=2), ToyModule(), "fit")
    with pytest.raises(ValueError, match="delta >= 0"):
        RefreshLearning(delta=-1.0)
    # fisher_examples=0 used to fail only at the first task end, as an "empty training set"
    with pytest.raises(ValueError, match=r"RefreshLearning init_args: needs fisher_examples >= 1.*fisher_examples=0"):
        RefreshLearning(fisher_examples=0)
