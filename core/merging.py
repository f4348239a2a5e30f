"""Model merging on state dicts: task vectors, weight averaging, task arithmetic, TIES-Merging.

Pure functions on ``{name: tensor}`` dicts, computed exactly as the Representation Surgery /
AdaMerging code computes them (EnnengYang/AdaMerging ``ties_merging_utils.py``, mlfoundations
``task_vectors``):

- task vector (Ilharco et al., ICLR 2023): ``tau_k = theta_k - theta_0``;
- weight averaging: ``theta_0 + (1/K) sum_k tau_k`` = the mean of the K experts (all K: the
  Surgery V1 repo silently drops the last expert, see docs/methods/surgery.md);
- task arithmetic: ``theta_0 + lambda sum_k tau_k`` (``lambda = 0.3`` as in Surgery/AdaMerging);
- TIES-Merging (Yadav et al., NeurIPS 2023): trim each ``tau_k`` to its top-k magnitudes (over the
  whole model by default, as the released code does; per tensor as an option), elect a sign per
  entry (sign of the sum, zeros -> the majority sign), keep the entries that agree, and merge them
  disjointly ("sum", the Surgery convention, or "mean", the TIES paper's).

Only floating-point tensors are merged. Non-float entries (integer buffers such as BatchNorm's
``num_batches_tracked``, position ids, bool masks) are not weights: they are copied from the
pre-trained state dict, and experts must agree with it. Mismatched keys or shapes raise a
``ValueError`` naming the expert and the key.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor

StateDict = Mapping[str, Tensor]


def is_mergeable(tensor: Tensor) -> bool:
    """Whether a state-dict entry is a weight to merge (floating point) rather than an integer/bool buffer."""
    return tensor.is_floating_point()


def check_compatible(reference: StateDict, others: Sequence[StateDict], names: Sequence[str] | None = None) -> None:
    """Raise a ``ValueError`` naming the first state dict whose keys, shapes or buffers differ from ``reference``."""
    if not others:
        raise ValueError("merging needs at least one fine-tuned state dict (the expert list is empty)")
    names = list(names) if names is not None else [f"expert {i}" for i in range(len(others))]
    for name, other in zip(names, others, strict=True):
        missing, extra = sorted(set(reference) - set(other)), sorted(set(other) - set(reference))
        if missing or extra:
            raise ValueError(f"{name}: keys differ from the pre-trained model: missing {missing[:5]}, unexpected {extra[:5]}")
        for key, ref in reference.items():
            if other[key].shape != ref.shape:
                raise ValueError(f"{name}: {key} has shape {tuple(other[key].shape)}, the pre-trained model {tuple(ref.shape)}")
            if not is_mergeable(ref) and not torch.equal(other[key], ref):
                raise ValueError(f"{name}: non-float entry {key} differs from the pre-trained model and cannot be merged")


def _float_keys(state: StateDict) -> list[str]:
    return sorted(k for k, v in state.items() if is_mergeable(v))


def task_vector(finetuned: StateDict, pretrained: StateDict) -> dict[str, Tensor]:
    """``finetuned - pretrained`` for every floating-point entry (non-float entries are left out)."""
    check_compatible(pretrained, [finetuned], ["finetuned"])
    return {k: finetuned[k] - pretrained[k] for k in _float_keys(pretrained)}


def apply_vector(pretrained: StateDict, vector: StateDict, scaling: float = 1.0) -> dict[str, Tensor]:
    """``pretrained + scaling * vector`` on the vector's keys; every other entry copied from ``pretrained``."""
    return {k: (v + scaling * vector[k]).to(v.dtype) if k in vector else v.clone() for k, v in pretrained.items()}


def weight_average(state_dicts: Sequence[StateDict]) -> dict[str, Tensor]:
    """The element-wise mean of K state dicts (non-float entries taken from the first; they must agree)."""
    if not state_dicts:
        raise ValueError("weight_average needs at least one state dict (the expert list is empty)")
    first = state_dicts[0]
    if len(state_dicts) > 1:
        check_compatible(first, state_dicts[1:], [f"expert {i}" for i in range(1, len(state_dicts))])
    return {
        k: torch.stack([sd[k] for sd in state_dicts]).mean(0).to(v.dtype) if is_mergeable(v) else v.clone()
        for k, v in first.items()
    }


def task_arithmetic(pretrained: StateDict, finetuned_list: Sequence[StateDict], scaling: float = 0.3) -> dict[str, Tensor]:
    """Task arithmetic: ``theta_0 + scaling * sum_k (theta_k - theta_0)``."""
    check_compatible(pretrained, finetuned_list)
    summed = {k: sum(sd[k] - pretrained[k] for sd in finetuned_list) for k in _float_keys(pretrained)}
    return apply_vector(pretrained, summed, scaling)


def flatten(vector: StateDict, keys: Sequence[str]) -> Tensor:
    """Concatenate the named tensors (in the given order) into one flat float vector."""
    return torch.cat([vector[k].reshape(-1).float() for k in keys])


def unflatten(flat: Tensor, like: StateDict, keys: Sequence[str]) -> dict[str, Tensor]:
    """Inverse of :func:`flatten`: split ``flat`` back into tensors shaped (and typed) like ``like``."""
    out, start = {}, 0
    for k in keys:
        n = like[k].numel()
        out[k] = flat[start : start + n].view_as(like[k]).to(like[k].dtype)
        start += n
    return out


def top_k_mask(values: Tensor, top_k: float) -> Tensor:
    """Rows' entries whose magnitude reaches the row's top-``top_k`` fraction (the released ``topk_values_mask``).

    ``values`` is (K, d). Keeps ``|x| >= kthvalue(|x|, d - int(d * top_k))``, so ties at the
    threshold are all kept, exactly like the code every Surgery/AdaMerging repo copied.
    """
    if not 0.0 < top_k <= 1.0:
        raise ValueError(f"ties top_k must be a fraction in (0, 1], got {top_k}")
    d = values.shape[1]
    k = max(1, d - int(d * top_k))
    threshold = values.abs().kthvalue(k, dim=1, keepdim=True).values
    return values.abs() >= threshold


def elect_sign(trimmed: Tensor) -> Tensor:
    """Per-entry sign of the summed trimmed vectors; entries summing to 0 take the overall majority sign."""
    sign = torch.sign(trimmed.sum(0))
    sign[sign == 0] = torch.sign(sign.sum())
    return sign


def ties_selected(
    pretrained: StateDict, finetuned_list: Sequence[StateDict], top_k: float = 0.2, per_tensor: bool = False
) -> list[dict[str, Tensor]]:
    """TIES trim + elect: each task vector reduced to its kept entries that agree with the elected sign.

    These are the vectors AdaMerging++ learns coefficients for; their sum is TIES' disjoint sum.
    ``per_tensor`` takes the top-k within every tensor (mergekit) instead of over the whole model.
    """
    check_compatible(pretrained, finetuned_list)
    keys = _float_keys(pretrained)
    vectors = torch.stack([flatten({k: sd[k] - pretrained[k] for k in keys}, keys) for sd in finetuned_list])
    if per_tensor:
        mask, start = torch.empty_like(vectors, dtype=torch.bool), 0
        for k in keys:
            end = start + pretrained[k].numel()
            mask[:, start:end] = top_k_mask(vectors[:, start:end], top_k)
            start = end
    else:  # global top-k over the whole model, as in the released ties_merging_utils.py
        mask = top_k_mask(vectors, top_k)
    trimmed = vectors * mask
    sign = elect_sign(trimmed)
    agree = torch.where(sign > 0, trimmed > 0, trimmed < 0)
    return [unflatten(row, pretrained, keys) for row in trimmed * agree]


def ties_merging(
    pretrained: StateDict,
    finetuned_list: Sequence[StateDict],
    top_k: float = 0.2,
    scaling: float = 0.3,
    merge: Literal["sum", "mean"] = "sum",
    per_tensor: bool = False,
) -> dict[str, Tensor]:
    """TIES-Merging: ``theta_0 + scaling * disjoint_merge(trim, elect(tau_1..K))``.

    Args:
        pretrained: the common pre-trained state dict.
        finetuned_list: the K experts' state dicts.
        top_k: fraction of entries kept per task vector (0.2 = the paper's 20 %).
        scaling: ``lambda`` (0.3 with ``merge="sum"`` as in Surgery/AdaMerging; the TIES paper
            searches 0.8-2.5 with ``merge="mean"``).
        merge: ``"sum"`` adds the agreeing entries ("dis-sum"), ``"mean"`` divides each entry by the
            number of tasks that kept it ("dis-mean").
        per_tensor: top-k within every tensor instead of over the whole model.
    """
    if merge not in ("sum", "mean"):
        raise ValueError(f"ties merge must be 'sum' or 'mean', got {merge!r}")
    selected = ties_selected(pretrained, finetuned_list, top_k, per_tensor)
    merged = {}
    for k in selected[0]:
        stack = torch.stack([s[k].float() for s in selected])
        merged[k] = stack.sum(0)
        if merge == "mean":
            merged[k] = merged[k] / (stack != 0).sum(0).clamp(min=1)
    return apply_vector(pretrained, merged, scaling)


def combine(pretrained: StateDict, vectors: Sequence[StateDict], coefficients: Tensor) -> dict[str, Tensor]:
    """Differentiable ``theta_0 + sum_k lambda_k tau_k`` for AdaMerging (Yang et al., ICLR 2024).

    Args:
        pretrained: the pre-trained state dict (its non-float entries are passed through).
        vectors: K task vectors over the float keys.
        coefficients: shape (K,) for task-wise merging, or (K, L) for layer-wise merging with one
            coefficient per float tensor (L tensors, in ``sorted`` key order as in :func:`layer_keys`).
    """
    keys = layer_keys(pretrained)
    if coefficients.shape[0] != len(vectors) or (coefficients.dim() == 2 and coefficients.shape[1] != len(keys)):
        raise ValueError(f"coefficients of shape {tuple(coefficients.shape)} do not fit {len(vectors)} tasks x {len(keys)} tensors")
    out = dict(pretrained)
    for layer, k in enumerate(keys):
        lam = coefficients if coefficients.dim() == 1 else coefficients[:, layer]
        out[k] = pretrained[k] + sum(lam[i] * v[k] for i, v in enumerate(vectors))
    return out


def layer_keys(state: StateDict) -> list[str]:
    """The float entries of a state dict in the order layer-wise coefficients index them."""
    return _float_keys(state)
