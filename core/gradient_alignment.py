"""Update rules that combine the losses of several tasks sharing parameters theta.

Each rule takes ``loss_fn(params, i)`` (task i's loss at the parameter dict ``params``, functional),
the parameters and the task count, and returns the update direction as a gradient dict, which the
module writes into ``.grad`` before its optimiser step. ``reduce`` averages tensors over DDP ranks
(every task gradient is a global-batch gradient before the rule uses it, so every rank computes the
same update and a DDP run equals one process on the global batch).

- ``mean``: grad of (1/n) sum_i L_i (the plain multi-task step).
- ``sequential`` (FREE's implicit gradient alignment, Reptile over tasks; Nichol et al. 2018): theta_0 =
  theta, theta_i = theta_{i-1} - beta grad L_i(theta_{i-1}) in turn (SGD, or one Adam shared over the
  sequence as the FREE release), direction alpha (theta - theta_n). To second order its expectation
  over task orders follows grad sum_i L_i - (beta/2) grad sum_{i<j} <g_i, g_j>: it aligns the tasks' gradients.
- ``displacement`` (TGR's implicit gradient regularisation; Dandi et al. AAAI 2022): grad of
  (1/n) sum_i L_i(theta - alpha (g_bar - g_i)), differentiated through g_i and g_bar. First order in
  alpha this is grad [L_bar + alpha (1/n) sum_i ||g_i - g_bar||^2]: it penalises gradient disagreement.
- ``pcgrad`` (Yu et al. NeurIPS 2020): each g_i loses its component along every g_j it conflicts with
  (<g_i, g_j> < 0), in random order; direction the mean of the projected gradients (Yu et al. sum them;
  the mean keeps the step size of ``mean``).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.distributed as dist
from torch import Tensor

LossFn = Callable[[dict[str, Tensor], int], Tensor]
Reduce = Callable[[list[Tensor]], list[Tensor]]


def mean_over_ranks(tensors: list[Tensor], differentiable: bool = False) -> list[Tensor]:
    """Average over the DDP ranks (identity in one process); ``differentiable`` keeps the autograd graph."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensors
    world = dist.get_world_size()
    if differentiable:
        from torch.distributed.nn.functional import all_reduce

        return [all_reduce(t) / world for t in tensors]
    flat = torch.cat([t.reshape(-1) for t in tensors])  # one collective for all tensors
    dist.all_reduce(flat)
    return [chunk.view_as(t) for chunk, t in zip(flat.div_(world).split([t.numel() for t in tensors]), tensors)]


def _grad(loss: Tensor, params: dict[str, Tensor], create_graph: bool = False) -> list[Tensor]:
    return list(torch.autograd.grad(loss, list(params.values()), create_graph=create_graph))


def mean_gradient(loss_fn: LossFn, params: dict[str, Tensor], n_tasks: int,
                  reduce: Reduce = mean_over_ranks) -> dict[str, Tensor]:
    """Gradient of the mean task loss."""
    loss = torch.stack([loss_fn(params, i) for i in range(n_tasks)]).mean()
    return dict(zip(params, reduce(_grad(loss, params))))


def sequential_gradient(loss_fn: LossFn, params: dict[str, Tensor], n_tasks: int, alpha: float, inner_lr: float,
                        inner_optimizer: str = "sgd", betas: tuple[float, float] = (0.9, 0.999),
                        reduce: Reduce = mean_over_ranks) -> dict[str, Tensor]:
    """Reptile over the tasks in turn: alpha (theta - theta_n), one inner step per task."""
    fast = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    m = {k: torch.zeros_like(v) for k, v in fast.items()}
    v2 = {k: torch.zeros_like(v) for k, v in fast.items()}
    for i in range(n_tasks):
        grads = dict(zip(fast, reduce(_grad(loss_fn(fast, i), fast))))
        with torch.no_grad():
            for k, g in grads.items():
                if inner_optimizer == "adam":  # one Adam over the sequence, state carried from task to task
                    m[k].mul_(betas[0]).add_(g, alpha=1 - betas[0])
                    v2[k].mul_(betas[1]).addcmul_(g, g, value=1 - betas[1])
                    m_hat, v_hat = m[k] / (1 - betas[0] ** (i + 1)), v2[k] / (1 - betas[1] ** (i + 1))
                    step = m_hat / (v_hat.sqrt() + 1e-8)
                else:
                    step = g
                fast[k] = (fast[k] - inner_lr * step).requires_grad_(True)
    return {k: alpha * (params[k].detach() - fast[k].detach()) for k in params}


def displacement_gradient(loss_fn: LossFn, params: dict[str, Tensor], n_tasks: int, alpha: float,
                          reduce: Reduce = mean_over_ranks,
                          reduce_graph: Reduce | None = None) -> dict[str, Tensor]:
    """Gradient of (1/n) sum_i L_i(theta - alpha (g_bar - g_i)), through the gradients (second order).

    The task gradients are averaged over ranks with ``reduce_graph`` (default: the differentiable rank mean),
    which keeps their graph (its backward sums the other ranks' contributions), the final gradient with
    ``reduce``."""
    reduce_graph = reduce_graph or partial(mean_over_ranks, differentiable=True)
    if alpha == 0:
        return mean_gradient(loss_fn, params, n_tasks, reduce)
    task_grads = []
    for i in range(n_tasks):
        task_grads.append(reduce_graph(_grad(loss_fn(params, i), params, create_graph=True)))
    g_bar = [torch.stack(gs).mean(0) for gs in zip(*task_grads)]
    total = 0.0
    for i, g_i in enumerate(task_grads):
        displaced = {k: p - alpha * (gb - gi) for (k, p), gb, gi in zip(params.items(), g_bar, g_i)}
        total = total + loss_fn(displaced, i) / n_tasks
    return dict(zip(params, reduce(_grad(total, params))))


def pcgrad_gradient(loss_fn: LossFn, params: dict[str, Tensor], n_tasks: int, generator: torch.Generator | None = None,
                    reduce: Reduce = mean_over_ranks) -> dict[str, Tensor]:
    """Projected conflicting gradients, averaged over tasks."""
    flat = []
    for i in range(n_tasks):
        flat.append(torch.cat([g.reshape(-1) for g in reduce(_grad(loss_fn(params, i), params))]))
    g = torch.stack(flat)  # (n, P)
    projected = g.clone()
    for i in range(n_tasks):
        for j in torch.randperm(n_tasks, generator=generator).tolist():
            if j == i:
                continue
            dot = projected[i] @ g[j]
            # subtract the conflicting component only (dot < 0), without a host sync
            projected[i] -= torch.clamp(dot, max=0) / (g[j] @ g[j]).clamp_min(1e-20) * g[j]
    direction = projected.mean(0)
    out, start = {}, 0
    for k, p in params.items():
        out[k] = direction[start:start + p.numel()].view_as(p)
        start += p.numel()
    return out
