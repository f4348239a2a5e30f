"""Plain modules and loaders shared by the surgery modules: low-rank corrections, heads, experts.

- :class:`LowRankCorrection` is the Surgery module ``Phi(z) = W_up ReLU(W_down z)`` (no biases,
  ``W_up`` zero-initialised so that the corrected model starts as the plain merge).
- :class:`TaskHeads` holds one frozen classification head per task, applied to the L2-normalised
  representation (zero-shot CLIP heads, or the demo's class-prototype heads, carry the logit scale).
- :class:`FeatureCache` keeps a frozen model's outputs per image index (Surgery's exact shortcut).
- :func:`load_task_models` builds the pre-trained encoder and reads the experts' weights and heads.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchmetrics
from torch import Tensor, nn

from core.merging import check_compatible
from core.state_hash import state_hash
from core.timm_models import create_model, load_state_dict

HEAD_SUFFIX = ".head.safetensors"


class LowRankCorrection(nn.Module):
    """``Phi(x) = W_up ReLU(W_down x)``, applied to the last dimension; outputs the bias to subtract.

    Args:
        dim: width of the representation it corrects.
        rank: hidden width ``r`` (16 in the papers for ViT-B).
    """

    def __init__(self, dim: int = 512, rank: int = 16) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"model.init_args.rank must be >= 1, got {rank}")
        self.down = nn.Linear(dim, rank, bias=False)  # Kaiming-uniform (a = sqrt 5), PyTorch's default
        self.up = nn.Linear(rank, dim, bias=False)
        nn.init.zeros_(self.up.weight)  # Phi == 0 at step 0: the corrected model is the plain merge

    def forward(self, x: Tensor) -> Tensor:
        return self.up(F.relu(self.down(x)))


class FeatureCache:
    """A frozen model's outputs per dataset index, computed the first time an index is seen.

    Each output level is one ``(N, ...)`` tensor on the outputs' device (grown as larger indices
    arrive), so a cached batch is one gather per level rather than a stack of per-image tensors.
    """

    def __init__(self) -> None:
        self.values: list[Tensor] = []
        self.seen: set[int] = set()

    def __call__(self, index: Tensor, images: Tensor, compute: Callable[[Tensor], list[Tensor]]) -> list[Tensor]:
        ids = index.tolist()  # the loader's indices: one host sync per batch
        missing = [j for j, i in enumerate(ids) if i not in self.seen]
        if missing:
            outs = compute(images[missing])
            size = max(ids) + 1
            if not self.values:
                self.values = [o.new_zeros(size, *o.shape[1:]) for o in outs]
            elif size > len(self.values[0]):
                grow = max(size, 2 * len(self.values[0])) - len(self.values[0])
                self.values = [torch.cat([v, v.new_zeros(grow, *v.shape[1:])]) for v in self.values]
            rows = index[missing]
            for store, out in zip(self.values, outs, strict=True):
                store[rows] = out
            self.seen.update(ids[j] for j in missing)
        return [store[index] for store in self.values]


class TaskHeads(nn.Module):
    """Frozen per-task linear heads on the L2-normalised representation: ``logits = W_t z / |z|``.

    Args:
        weights: ``{task: (num_classes, dim)}`` head matrices (logit scale included).
    """

    def __init__(self, weights: Mapping[str, Tensor] | None = None) -> None:
        super().__init__()
        self.tasks = list(weights or {})
        for i, task in enumerate(self.tasks):
            self.register_buffer(f"head_{i}", weights[task].detach().float().clone())

    def weight(self, task: str) -> Tensor:
        if task not in self.tasks:
            raise ValueError(f"task {task!r} has no head: add it to model.init_args.experts (known: {self.tasks})")
        return getattr(self, f"head_{self.tasks.index(task)}")

    def forward(self, z: Tensor, task: str) -> Tensor:
        return F.normalize(z, dim=-1) @ self.weight(task).T


def probe_input(model: nn.Module) -> Tensor:
    """A one-image zero batch the encoder accepts: a timm ViT's patch-embedding size and channels, else 3x224x224."""
    embed = getattr(model, "patch_embed", None)
    size = getattr(embed, "img_size", (224, 224))
    chans = getattr(getattr(embed, "proj", None), "in_channels", 3)
    return torch.zeros(1, chans, *size)


def class_means(features: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Unit direction of each class's mean normalised feature, (num_classes, D); every class must occur."""
    present = labels.unique()
    if len(present) != num_classes:
        missing = sorted(set(range(num_classes)) - set(present.tolist()))
        raise ValueError(f"prototype head: classes {missing} have no training examples (data.init_args.tasks)")
    onehot = F.one_hot(labels, num_classes).float()
    return F.normalize(onehot.T @ F.normalize(features.float(), dim=-1), dim=-1)


def nearest_orthonormal(rows: Tensor) -> Tensor:
    """The orthonormal rows nearest to ``rows`` (polar factor ``U V^T`` of ``U S V^T``)."""
    if rows.shape[0] > rows.shape[1]:
        raise ValueError(f"model.init_args.head: orthogonal/joint needs num_classes <= the representation width "
                         f"{rows.shape[1]}, got {rows.shape[0]} (all head_tasks together for joint); use head: "
                         "prototype or a wider encoder output")
    u, _, vh = torch.linalg.svd(rows, full_matrices=False)
    return u @ vh


def prototype_head(features: Tensor, labels: Tensor, num_classes: int, logit_scale: float = 100.0,
                   orthogonal: bool = False) -> Tensor:
    """A zero-shot-like head from class means of features: rows ``scale * mean_c / |mean_c|``.

    Stand-in for CLIP's text heads when no text encoder exists (the demo): built once from the
    pre-trained encoder, then frozen while the expert is fine-tuned (as task_vectors freezes heads).
    With ``orthogonal`` the rows are the orthonormal set nearest to the normalised means: theta_0's
    class geometry, but with rows as far apart as CLIP's text heads, where raw class means of a weak
    encoder can be nearly parallel (cosine 0.99).
    """
    means = class_means(features, labels, num_classes)
    return logit_scale * (nearest_orthonormal(means) if orthogonal else means)


def joint_heads(means: Sequence[Tensor], logit_scale: float = 100.0) -> list[Tensor]:
    """Heads of several tasks made orthonormal together (``head: joint``): no row of one task overlaps a
    row of another, as CLIP's text heads of different data sets hardly do; in a narrow representation,
    per-task orthonormal heads of different tasks collide, so every task vector moves the other tasks'
    logits. ``means``: each task's :func:`class_means`; returns each task's rows, in order."""
    rows = logit_scale * nearest_orthonormal(torch.cat(list(means)))
    return list(rows.split([len(m) for m in means]))


def head_path(expert_path: str | Path) -> Path:
    """Where an expert's head is stored next to its weights: ``name.safetensors`` -> ``name.head.safetensors``."""
    path = Path(expert_path)
    return path.with_name(path.name.removesuffix(".safetensors") + HEAD_SUFFIX)


def load_task_models(
    model: str,
    model_kwargs: dict[str, Any] | None,
    pretrained: bool,
    pretrained_checkpoint: str | None,
    experts: Mapping[str, str] | None,
    heads: Mapping[str, str] | None = None,
) -> tuple[nn.Module, dict[str, Tensor], dict[str, dict[str, Tensor]], dict[str, Tensor]]:
    """Build the pre-trained encoder and read the experts' state dicts and heads, with named errors.

    Returns:
        ``(encoder, pretrained_state, {task: expert_state}, {task: head_weight})``.
    """
    if not experts:
        raise ValueError("model.init_args.experts is empty: give {task: expert weights file} for at least one task")
    encoder = create_model(model, pretrained, pretrained_checkpoint, model_kwargs, key="model.init_args.model",
                           checkpoint_key="model.init_args.pretrained_checkpoint")
    base = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    states = {task: load_state_dict(path, key=f"model.init_args.experts.{task}") for task, path in experts.items()}
    check_compatible(base, list(states.values()), [f"model.init_args.experts.{t}" for t in states])
    heads = dict(heads or {})
    unknown = sorted(set(heads) - set(experts))
    if unknown:
        raise ValueError(f"model.init_args.heads has tasks {unknown} without an expert in model.init_args.experts")
    weights = {}
    for task, path in experts.items():
        file = heads.get(task) or head_path(path)
        weights[task] = load_state_dict(file, key=f"model.init_args.heads.{task}")["weight"]
    return encoder, base, states, weights


def tower_hashes(towers: Mapping[str, Mapping[str, Tensor]]) -> dict[str, str]:
    """``{config key: state_hash}`` of the frozen towers a module rebuilds from its config."""
    return {key: state_hash(state) for key, state in towers.items()}


def drop_frozen(module: nn.Module, checkpoint: dict[str, Any], hashes: Mapping[str, str]) -> None:
    """``on_save_checkpoint``: keep only the trained entries, and a hash of every frozen tower they refill from.

    A surgery checkpoint would otherwise hold the merged encoder and every expert (K + 1 towers, about
    11 GB for ViT-L/14 and 8 tasks) at every save, for a few hundred thousand trained numbers.

    Args:
        module: the LightningModule being saved.
        checkpoint: Lightning's checkpoint dict, edited in place.
        hashes: :func:`tower_hashes` of the frozen towers rebuilt from the config on load.
    """
    trained = {name for name, p in module.named_parameters() if p.requires_grad}
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trained}
    checkpoint["frozen_hashes"] = dict(hashes)


def restore_frozen(module: nn.Module, checkpoint: dict[str, Any], hashes: Mapping[str, str]) -> None:
    """``on_load_checkpoint``: refuse towers that differ from the saved run's, then refill what was left out."""
    saved = checkpoint.get("frozen_hashes")
    if saved is None:
        raise ValueError("this checkpoint records no hashes of its frozen towers (saved before they were recorded): "
                         "train again, or load its state_dict by hand if you know the towers are the same")
    for key, now in hashes.items():
        if saved.get(key) != now:
            raise ValueError(f"{key}: the weights differ from those the checkpoint was trained with (hash {now}, "
                             f"checkpoint {saved.get(key)}); point {key} at the original files")
    state = checkpoint["state_dict"]
    for key, value in module.state_dict().items():
        state.setdefault(key, value)


def freeze(module: nn.Module) -> nn.Module:
    """Turn off gradients and dropout for good (merged models, experts, heads are never trained here)."""
    module.requires_grad_(False)
    return module.eval()


def entropy(logits: Tensor) -> Tensor:
    """Mean Shannon entropy of ``softmax(logits)`` over the batch (AdaMerging's objective)."""
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1).mean()


def task_accuracies(head_weights: Mapping[str, Tensor]) -> nn.ModuleDict:
    """One validation accuracy per task (``val_acc_<task>``), sized by the task head's classes."""
    return nn.ModuleDict({f"val_acc_{t}": torchmetrics.Accuracy(task="multiclass", num_classes=w.shape[0])
                          for t, w in head_weights.items()})


def log_mean_accuracy(module: nn.Module, accs: nn.ModuleDict) -> None:
    """Log ``val/acc``, the mean over the tasks validated this epoch (the papers' average accuracy)."""
    done = [acc.compute() for acc in accs.values() if acc.update_called]
    if done:
        module.log("val/acc", torch.stack(done).mean(), prog_bar=True)
