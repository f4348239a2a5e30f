"""MAML with functional fast weights, batched over episodes (``torch.func``), and few-shot evaluation.

Finn et al. (ICML 2017): adapt theta on the support set by ``steps`` SGD steps,
    theta'_e = theta - lr * grad L_support_e(theta)   (repeated),                 # inner loop
and train theta on the query loss at theta'_e, differentiating through the inner loop (second order)
or treating the inner gradients as constants (first order, ``first_order=True``).

The network must use batch statistics in every BatchNorm (transductive BN, as the few-shot releases
do at train and test time): :func:`transductive` converts a model in place. Episodes are mapped with
``torch.func.vmap`` (chunked), so 600 test episodes are a few large batched passes, not a Python loop
(first order; the second-order meta-batch of replay is a loop over its few episodes, see ``maml_query``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, replace_all_batch_norm_modules_, vmap

from core.episodes import prototype_logits


def transductive(model: nn.Module) -> nn.Module:
    """Make every BatchNorm of ``model`` use the current batch's statistics, always (no running stats)."""
    replace_all_batch_norm_modules_(model)
    return model


def adapt(model: nn.Module, params: dict[str, Tensor], x: Tensor, y: Tensor, steps: int, lr: float,
          first_order: bool) -> dict[str, Tensor]:
    """Fast weights after ``steps`` SGD steps on CE(model(x), y) from ``params`` (one episode)."""

    def loss(p: dict[str, Tensor]) -> Tensor:
        return F.cross_entropy(functional_call(model, p, (x,)), y)

    for _ in range(steps):
        g = grad(loss)(params)
        if first_order:  # the inner gradients as constants: no second-order terms reach theta
            g = {k: v.detach() for k, v in g.items()}
        params = {k: params[k] - lr * g[k] for k in params}
    return params


def episode_labels(n_episodes: int, n_way: int, per_class: int, device: torch.device | str = "cpu") -> Tensor:
    """(E, n_way * per_class) labels of episodes laid out class-major: image ``c * per_class + j`` is class c."""
    return torch.arange(n_way, device=device).repeat_interleave(per_class).expand(n_episodes, -1)


def maml_query(model: nn.Module, params: dict[str, Tensor], support: Tensor, query: Tensor, steps: int,
               lr: float, first_order: bool, chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Query loss and accuracy per episode after adaptation.

    Args:
        support: (E, n_way, k_shot, C, H, W) episode images (position along dim 1 is the label).
        query: (E, n_way, q_query, C, H, W).

    Returns:
        ``(loss, acc)``, each (E,); the loss keeps the graph back to ``params``.
    """
    e, n_way, k = support.shape[:3]
    q = query.shape[2]
    ys = episode_labels(1, n_way, k, support.device)[0]
    yq = episode_labels(1, n_way, q, support.device)[0]

    def one(xs: Tensor, xq: Tensor) -> tuple[Tensor, Tensor]:
        fast = adapt(model, params, xs, ys, steps, lr, first_order)
        logits = functional_call(model, fast, (xq,))
        return F.cross_entropy(logits, yq), (logits.argmax(-1) == yq).float().mean()

    xs, xq = support.flatten(1, 2), query.flatten(1, 2)
    if first_order:
        return vmap(one, chunk_size=chunk_size, randomness="error")(xs, xq)
    # Second order loops over the episodes of the meta-batch: under vmap, the double backward of a
    # batch-statistics BatchNorm is wrong in torch 2.14 (tests/core/test_free_core.py compares with autograd).
    losses, accs = zip(*(one(xs[i], xq[i]) for i in range(e)))
    return torch.stack(losses), torch.stack(accs)


def maml_accuracy(model: nn.Module, support: Tensor, query: Tensor, steps: int = 10, lr: float = 0.01,
                  chunk_size: int = 50) -> Tensor:
    """(E,) query accuracies of first-order MAML fine-tuning from the model's weights (the test protocol)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    accs = []
    for start in range(0, support.shape[0], chunk_size):  # chunks of episodes bound the memory
        _, acc = maml_query(model, params, support[start:start + chunk_size], query[start:start + chunk_size],
                            steps, lr, first_order=True)
        accs.append(acc.detach())
    return torch.cat(accs)


@torch.no_grad()
def protonet_accuracy(features: nn.Module, support: Tensor, query: Tensor, chunk_size: int = 100) -> Tensor:
    """(E,) query accuracies of nearest-prototype classification in ``features``' embedding, one vmapped
    pass per chunk of episodes (a transductive BatchNorm sees one episode's images at a time)."""
    e, n_way, k = support.shape[:3]
    q = query.shape[2]

    def one(xs: Tensor, xq: Tensor) -> Tensor:
        logits = prototype_logits(features(xs).view(1, n_way, k, -1), features(xq)[None])[0]
        return (logits.argmax(-1) == episode_labels(1, n_way, q, xs.device)[0]).float().mean()

    return vmap(one, chunk_size=chunk_size)(support.flatten(1, 2), query.flatten(1, 2))
