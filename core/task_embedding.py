"""Task-space embedding of a teacher: the diagonal Fisher of a fixed probe network on images recovered
from it (TGR, Wei et al. ICML 2024, Sec. 3.2; Task2Vec, Achille et al. ICCV 2019).

The probe is a network trained once on classes no teacher and no evaluation split uses (the release
takes an ImageNet ResNet-34). Two estimators:

- ``batch`` (release default, ``task_similarity.fisher``): the probe stays in train mode (batch
  statistics), its *own* head scores the teacher's labels y in {0..C-1} as if they were its classes
  0..C-1, and per batch b the squared gradient of the batch-mean CE is averaged over batches,
      F = (1/B) sum_b (grad_theta CE_b)^2                                            # Eq. (3), release
- ``per_sample`` (Task2Vec): a fresh C-way head is fitted on the frozen probe features first, then
  F = E_x (grad_theta log p(y|x))^2 per example (``core.fisher.DiagonalFisher``, ``empirical``).

Embeddings differ between teachers only through the recovered images (and their labels).
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.conv4 import Conv4
from core.fisher import DiagonalFisher

FisherMode = Literal["batch", "per_sample"]


def train_probe(images: Tensor, labels: Tensor, hidden: int = 32, epochs: int = 10, lr: float = 0.01,
                batch_size: int = 64, seed: int = 0) -> Conv4:
    """A Conv4 classifier over ``labels.max() + 1`` classes trained with Adam (the probe network)."""
    n_classes = int(labels.max()) + 1
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = Conv4(images.shape[1], hidden, n_classes, images.shape[-1])
    opt = torch.optim.Adam(probe.parameters(), lr=lr)
    probe.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(images), generator=g).split(batch_size):
            loss = F.cross_entropy(probe(images[idx]), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return probe.eval()


def _head(probe: nn.Module) -> nn.Linear:
    head = getattr(probe, "head", None) or getattr(probe, "fc", None)
    if not isinstance(head, nn.Linear):
        raise ValueError(f"the probe {type(probe).__name__} has no linear head (`head` or `fc`)")
    return head


def check_probe_labels(probe: nn.Module, n_labels: int, key: str = "model.init_args.probe") -> None:
    """The release's estimator reads the teacher's labels with the probe's own head: it needs enough outputs."""
    width = _head(probe).out_features
    if n_labels > width:
        raise ValueError(f"{key}: the probe's head has {width} outputs but the teachers have {n_labels} classes; "
                         "train the probe on at least as many classes or use fisher: per_sample (fitted head)")


def batch_fisher(probe: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 600,
                 generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """The release's batch-level empirical Fisher, probe in train mode, on a private copy of the probe."""
    check_probe_labels(probe, int(labels.max()) + 1)
    net = copy.deepcopy(probe).train()
    params = {k: p for k, p in net.named_parameters()}
    sums = {k: torch.zeros_like(p) for k, p in params.items()}
    order = torch.randperm(len(images), generator=generator)
    batches = order.split(batch_size)
    for idx in batches:
        loss = F.cross_entropy(net(images[idx]), labels[idx])
        for s, g in zip(sums.values(), torch.autograd.grad(loss, list(params.values()))):
            s.add_(g.square())
    return {k: s / len(batches) for k, s in sums.items()}


def fit_head(probe: nn.Module, images: Tensor, labels: Tensor, steps: int = 100, lr: float = 0.05) -> nn.Module:
    """A copy of the probe with a fresh head for ``labels``' classes, fitted on frozen features (Task2Vec)."""
    net = copy.deepcopy(probe).eval()
    old = _head(net)
    new = nn.Linear(old.in_features, int(labels.max()) + 1)
    name = "head" if getattr(net, "head", None) is old else "fc"
    with torch.no_grad():
        feats = net.features(images) if hasattr(net, "features") else None
    if feats is None:
        raise ValueError("fisher: per_sample needs a probe exposing `features(x)`")
    opt = torch.optim.Adam(new.parameters(), lr=lr)
    for _ in range(steps):
        loss = F.cross_entropy(new(feats), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    setattr(net, name, new)
    return net


def teacher_embedding(probe: nn.Module, images: Tensor, labels: Tensor, mode: FisherMode = "batch",
                      batch_size: int = 600, seed: int = 0) -> dict[str, Tensor]:
    """The Fisher embedding of one teacher from its recovered ``images`` and their ``labels``."""
    if mode == "batch":
        return batch_fisher(probe, images, labels, batch_size, torch.Generator().manual_seed(seed))
    if mode == "per_sample":
        estimate = DiagonalFisher(fit_head(probe, images, labels), variant="empirical", bn_mode="train")
        estimate.update(images, labels)
        return estimate.mean()
    raise ValueError(f"model.init_args.fisher={mode!r}: use batch or per_sample")
