"""GradientAlignment: each rule against a hand computation, the callback on a small multi-task module, DDP."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from callbacks.gradient_alignment import GradientAlignment
from core import gradient_alignment as rules

N_TASKS = 3


class SharedEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(8, 2) for _ in range(N_TASKS))

    def forward(self, x: Tensor) -> Tensor:
        h = self.encoder(x)
        return torch.stack([head(h) for head in self.heads])  # (tasks, B, 2)


class MultiTask(L.LightningModule):
    """A non-meta-learning multi-task module: one shared encoder, one head and one label column per task."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        torch.manual_seed(0)
        self.net = SharedEncoder().double()
        self.rule = None

    def alignment_parameters(self) -> dict[str, Tensor]:
        return dict(self.net.named_parameters())

    def set_gradient_rule(self, rule) -> None:
        self.rule = rule

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch

        def loss_fn(params: dict[str, Tensor], i: int) -> Tensor:
            return F.cross_entropy(functional_call(self.net, params, (x,))[i], y[:, i])

        grads = (self.rule or rules.mean_gradient)(loss_fn, self.alignment_parameters(), N_TASKS)
        for name, p in self.net.named_parameters():
            p.grad = grads[name]
        self.optimizers().step()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _data(n: int = 8) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    y = torch.stack([(x[:, i] > 0).long() for i in range(N_TASKS)], 1)
    y[:, 2] = 1 - y[:, 0]  # a task conflicting with task 0
    return TensorDataset(x, y)


def _loss_fn(net: nn.Module, data: TensorDataset):
    x, y = data.tensors
    return lambda params, i: F.cross_entropy(functional_call(net, params, (x,))[i], y[:, i])


def test_sequential_equals_a_hand_written_reptile_step() -> None:
    net, data = MultiTask().net, _data()
    loss_fn, params = _loss_fn(net, data), dict(net.named_parameters())
    got = rules.sequential_gradient(loss_fn, params, N_TASKS, alpha=2.0, inner_lr=0.3)
    fast = {k: v.detach().clone() for k, v in params.items()}
    for i in range(N_TASKS):
        fast = {k: v.requires_grad_(True) for k, v in fast.items()}
        g = torch.autograd.grad(loss_fn(fast, i), list(fast.values()))
        fast = {k: (v - 0.3 * gi).detach() for (k, v), gi in zip(fast.items(), g)}
    for k in params:
        torch.testing.assert_close(got[k], 2.0 * (params[k].detach() - fast[k]))


def test_sequential_adam_takes_sign_like_first_step() -> None:
    net, data = MultiTask().net, _data()
    params = dict(net.named_parameters())
    got = rules.sequential_gradient(_loss_fn(net, data), params, 1, alpha=1.0, inner_lr=1e-3, inner_optimizer="adam")
    g = torch.autograd.grad(_loss_fn(net, data)(params, 0), list(params.values()))
    for (k, _), gi in zip(params.items(), g):  # bias-corrected Adam step 1: lr * g / (|g| + eps)
        torch.testing.assert_close(got[k], 1e-3 * gi / (gi.abs() + 1e-8))


def test_displacement_equals_the_explicit_gradient_variance_penalty_for_small_alpha() -> None:
    net, data = MultiTask().net, _data()
    loss_fn, params = _loss_fn(net, data), dict(net.named_parameters())
    alpha = 1e-4
    got = rules.displacement_gradient(loss_fn, params, N_TASKS, alpha=alpha)
    grads = [torch.autograd.grad(loss_fn(params, i), list(params.values()), create_graph=True) for i in range(N_TASKS)]
    g_bar = [torch.stack(gs).mean(0) for gs in zip(*grads)]
    penalty = sum(sum(((gi - gb) ** 2).sum() for gi, gb in zip(g, g_bar)) for g in grads) / N_TASKS
    explicit = torch.stack([loss_fn(params, i) for i in range(N_TASKS)]).mean() + alpha * penalty
    ref = torch.autograd.grad(explicit, list(params.values()))
    mean = rules.mean_gradient(loss_fn, params, N_TASKS)
    for (k, _), r in zip(params.items(), ref):
        assert (got[k] - r).abs().max() < 1e-3 * (r - mean[k]).abs().max() + 1e-12  # O(alpha^2) vs O(alpha)
    assert any((got[k] - mean[k]).abs().max() > 1e-9 for k in params)


def test_alpha_zero_equals_mean() -> None:
    net, data = MultiTask().net, _data()
    loss_fn, params = _loss_fn(net, data), dict(net.named_parameters())
    mean = rules.mean_gradient(loss_fn, params, N_TASKS)
    zero = rules.displacement_gradient(loss_fn, params, N_TASKS, alpha=0.0)
    for k in params:
        torch.testing.assert_close(zero[k], mean[k])


def test_pcgrad_on_two_conflicting_gradients() -> None:
    theta = {"w": torch.zeros(2, dtype=torch.float64, requires_grad=True)}
    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)  # <g1, g2> = -1 < 0
    got = rules.pcgrad_gradient(lambda p, i: p["w"] @ g[i], theta, 2, generator=torch.Generator().manual_seed(0))
    # g1' = g1 - (-1 / 2) g2 = (0.5, 0.5);  g2' = g2 - (-1 / 1) g1 = (0, 1);  mean (0.25, 0.75)
    torch.testing.assert_close(got["w"], torch.tensor([0.25, 0.75], dtype=torch.float64))
    aligned = rules.pcgrad_gradient(lambda p, i: p["w"] @ g[0] * (i + 1), theta, 2)
    torch.testing.assert_close(aligned["w"], 1.5 * g[0])  # no conflict: the plain mean


def _fit(module: L.LightningModule, callbacks: list, **kwargs) -> L.Trainer:
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", callbacks=callbacks, **kwargs)
    trainer.fit(module, DataLoader(_data(), batch_size=8))
    return trainer


@pytest.mark.parametrize("mode", ["sequential", "displacement", "pcgrad", "mean"])
def test_callback_installs_its_rule(mode: str) -> None:
    reference = MultiTask()
    params = reference.alignment_parameters()
    grads = GradientAlignment(mode=mode, alpha=0.5, inner_lr=0.1).rule()(_loss_fn(reference.net, _data()), params,
                                                                          N_TASKS)
    aligned = MultiTask()
    _fit(aligned, [GradientAlignment(mode=mode, alpha=0.5, inner_lr=0.1)], max_steps=1)
    assert aligned.rule is None  # removed at teardown: the module runs unchanged afterwards
    for (name, p), q in zip(params.items(), aligned.net.parameters()):
        torch.testing.assert_close(q.detach(), p.detach() - 0.1 * grads[name])  # one SGD step along the rule
    plain = MultiTask()
    _fit(plain, [], max_steps=1)
    differs = any(not torch.allclose(a, b) for a, b in zip(plain.parameters(), aligned.parameters()))
    assert differs == (mode in ("sequential", "displacement"))  # pcgrad: no conflict in this toy at step 0


def test_module_without_the_protocol_is_rejected() -> None:
    class Plain(L.LightningModule):
        def training_step(self, batch, batch_idx):
            return None

    with pytest.raises(TypeError, match="alignment_parameters, set_gradient_rule"):
        GradientAlignment().setup(L.Trainer(logger=False), Plain(), "fit")
    with pytest.raises(ValueError, match="mode='reptile'"):
        GradientAlignment(mode="reptile")


class _Dump(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        torch.save([p.detach() for p in pl_module.parameters()], self.out / f"rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_ddp_equals_one_process_on_the_global_batch(tmp_path: Path) -> None:
    """Displacement differentiates through the rank-averaged task gradients: the strictest of the rules."""
    mode = "displacement"
    single = MultiTask()
    _fit(single, [GradientAlignment(mode=mode, alpha=0.5)], max_steps=1)
    module = MultiTask()
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=2, strategy="ddp_spawn",
                        callbacks=[GradientAlignment(mode=mode, alpha=0.5), _Dump(tmp_path)])
    trainer.fit(module, DataLoader(_data(), batch_size=4))  # 2 ranks x 4 = the single run's batch of 8
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for a, b, ref in zip(*ranks, single.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, ref.detach())
