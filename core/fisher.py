"""Diagonal Fisher information from per-example gradients (vectorised with ``torch.func``).

The diagonal Fisher of a classifier ``p_theta(y | x)`` weights parameters by how much the predictions on
a task depend on them. It is the importance of EWC's quadratic penalty and the preconditioner of refresh
learning's unlearning step. Three estimators are in use (see van de Ven, "On the computation of the
Fisher Information in continual learning", ICLR 2025 blog):

- ``exact``:     F = E_x sum_c p(c|x) (d log p(c|x) / d theta)^2      (expectation over the model's labels)
- ``empirical``: F = E_x (d log p(y|x) / d theta)^2                   (true label only)
- ``mammoth``:   F = E_x p(y|x) (d log p(y|x) / d theta)^2            (true label weighted by its probability;
  mammoth's online-EWC estimator, used by the released refresh-learning code)

``bn_mode="train"`` normalises each example by its own statistics (a batch of one in train mode, as the
released code does); ``"eval"`` uses the running statistics. Running statistics are never modified: the
estimate runs on a private copy of the network.

The exact variant needs every class's gradient per example: ``jacrev`` holds chunk x classes x
parameters floats at once (about 143 GB for 100 classes, ResNet-18's 11.2 M parameters and chunks of 32).
Above ``max_jacobian_bytes`` the estimate instead sums the classes one at a time,
sum_c p(c|x) (d log p(c|x) / d theta)^2, holding chunk x parameters floats (classes x slower).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, replace_all_batch_norm_modules_, vmap
from torch.utils.data import DataLoader, Dataset, Subset

FisherVariant = Literal["mammoth", "empirical", "exact"]


class DiagonalFisher:
    """Accumulate per-example Fisher contributions of a snapshot of ``model``'s parameters.

    Call :meth:`update` with batches, then read :attr:`sums` (per-parameter sums over examples, e.g. to
    all-reduce across ranks) and :attr:`count`, or :meth:`mean`.

    Args:
        model: classifier returning logits of shape (B, C); copied, never modified.
        variant: ``mammoth``, ``empirical`` or ``exact`` (see the module docstring).
        bn_mode: ``train`` (per-example BatchNorm statistics) or ``eval`` (running statistics).
        chunk_size: examples per vectorised chunk (bounds memory: chunk x parameters floats); None: all.
        max_jacobian_bytes: largest per-chunk Jacobian (chunk x classes x parameters) the exact variant
            builds with ``jacrev``; above it the classes are summed one at a time.
    """

    def __init__(self, model: nn.Module, variant: FisherVariant = "mammoth",
                 bn_mode: Literal["train", "eval"] = "train", chunk_size: int | None = 32,
                 max_jacobian_bytes: int = 2**31) -> None:
        if variant not in ("mammoth", "empirical", "exact"):
            raise ValueError(f"unknown Fisher variant {variant!r}; choose mammoth, empirical or exact")
        self.net = copy.deepcopy(model)
        if bn_mode == "train":
            replace_all_batch_norm_modules_(self.net)  # batch statistics only, running stats untracked
            self.net.train()
        else:
            self.net.eval()
        self.variant, self.chunk_size, self.max_jacobian_bytes = variant, chunk_size, max_jacobian_bytes
        self.params = {n: p.detach() for n, p in self.net.named_parameters() if p.requires_grad}
        self.buffers = {n: b.detach() for n, b in self.net.named_buffers()}
        self.sums = {n: torch.zeros_like(p) for n, p in self.params.items()}
        self.count = 0

    def _log_probs(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(self.net, (params, self.buffers), (x.unsqueeze(0),)).log_softmax(-1).squeeze(0)

    def _label_term(self, params: dict[str, Tensor], x: Tensor, y: Tensor, weighted: bool) -> dict[str, Tensor]:
        """(d log p(y|x) / d theta)^2, times p(y|x) when ``weighted``."""
        def log_likelihood(p: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
            value = self._log_probs(p, x).gather(0, y.unsqueeze(0)).squeeze(0)
            return value, value.detach()

        gradient, log_p = grad(log_likelihood, has_aux=True)(params)
        weight = log_p.exp() if weighted else torch.ones_like(log_p)
        return {n: weight * g.square() for n, g in gradient.items()}

    def _exact_term(self, params: dict[str, Tensor], x: Tensor, y: Tensor) -> dict[str, Tensor]:
        def log_probs(p: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
            value = self._log_probs(p, x)
            return value, value.detach()

        # name -> (C, *shape): d log p(c|x) / d theta; the forward's log-probabilities come back as aux
        jacobian, log_p = jacrev(log_probs, has_aux=True)(params)
        return {n: torch.tensordot(log_p.exp(), j.square(), dims=1) for n, j in jacobian.items()}

    @torch.no_grad()
    def update(self, inputs: Tensor, labels: Tensor) -> None:
        """Add the contributions of a batch of examples (inputs (B, ...), integer labels (B,))."""
        with torch.enable_grad():
            for name, value in self._per_example(inputs, labels).items():
                self.sums[name] += value.sum(0)
        self.count += len(inputs)

    def _per_example(self, inputs: Tensor, labels: Tensor) -> dict[str, Tensor]:
        def mapped(term: Callable, y: Tensor) -> dict[str, Tensor]:
            return vmap(term, in_dims=(None, 0, 0), chunk_size=self.chunk_size)(self.params, inputs, y)

        if self.variant != "exact":
            return mapped(lambda p, x, y: self._label_term(p, x, y, self.variant == "mammoth"), labels)
        classes = self._log_probs(self.params, inputs[0]).shape[-1]
        chunk = min(self.chunk_size or len(inputs), len(inputs))
        if chunk * classes * sum(p.numel() for p in self.params.values()) * 4 <= self.max_jacobian_bytes:
            return mapped(self._exact_term, labels)
        total: dict[str, Tensor] = {}
        for c in range(classes):  # sum_c p(c|x) (d log p(c|x))^2, one class at a time: chunk x parameters
            term = mapped(lambda p, x, y: self._label_term(p, x, y, True), torch.full_like(labels, c))
            total = term if not total else {n: total[n] + v for n, v in term.items()}
        return total

    def mean(self) -> dict[str, Tensor]:
        """The estimate: sums divided by the number of examples."""
        if not self.count:
            raise RuntimeError("no examples were given to the Fisher estimate")
        return {n: s / self.count for n, s in self.sums.items()}


def dataset_fisher(
    model: nn.Module,
    dataset: Dataset,
    examples: Callable[[Any], tuple[Tensor, Tensor]],
    all_reduce_sum: Callable[[Tensor], Tensor],
    *,
    variant: FisherVariant = "mammoth",
    bn_mode: Literal["train", "eval"] = "train",
    batch_size: int = 32,
    rank: int = 0,
    world_size: int = 1,
    max_examples: int | None = None,
    seed: int = 0,
) -> dict[str, Tensor]:
    """The Fisher of ``model`` averaged over ``dataset`` (or a seeded subset of ``max_examples``).

    Under data parallelism every rank takes every ``world_size``-th example from ``rank`` on, and the
    per-parameter sums and the count go through ``all_reduce_sum``, so every rank returns the same estimate.
    ``examples`` maps a loader batch to ``(inputs, labels)``; they are moved to the model's device.
    """
    order = torch.arange(len(dataset))
    if max_examples is not None and max_examples < len(order):
        order = torch.randperm(len(order), generator=torch.Generator().manual_seed(seed))[:max_examples].sort().values
    shard = Subset(dataset, order[rank::world_size].tolist())
    device = next(model.parameters()).device
    estimate = DiagonalFisher(model, variant, bn_mode)
    for batch in DataLoader(shard, batch_size=batch_size, shuffle=False):
        inputs, labels = examples(batch)
        estimate.update(inputs.to(device), labels.to(device))
    count = all_reduce_sum(torch.tensor(float(estimate.count), device=device))
    if count.item() == 0:
        raise RuntimeError("the Fisher estimate got no examples: the task's training set is empty")
    return {name: all_reduce_sum(total) / count for name, total in estimate.sums.items()}
