"""Similarity of task embeddings and the grouping of a model zoo (TGR, Wei et al. ICML 2024, Sec. 3.2).

Every teacher k is embedded by a diagonal Fisher ``F_k`` (a dict parameter name -> tensor, see
``core.task_embedding``). Two embeddings are compared as Task2Vec's *normalised cosine*, per parameter
tensor p and then averaged over the tensors (the release's ``task_similarity.py``):

    a' = F_i[p] / (F_i[p] + F_j[p] + eps),  b' = F_j[p] / (F_i[p] + F_j[p] + eps)
    S_ij = mean_p cos(a', b'),  S_ii = 1,  D = 1 - S                               # Eq. (4)-(5)

The per-element denominator couples i and j, so no Gram-matrix shortcut exists; per parameter tensor,
a block of rows is compared with all later columns in a few cache-sized in-place passes (the upper
triangle, mirrored), not as a Python loop over pairs.

Grouping (Sec. 3.2): spectral clustering with the *dissimilarity* as the precomputed affinity, so
models that are far apart in task space land in one group (heterogeneous groups, the paper's intent);
``homogeneous`` clusters on S instead, ``random`` splits a seeded permutation (ablations).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import Tensor

GroupingMode = Literal["heterogeneous", "homogeneous", "random"]


def stack_embeddings(embeddings: list[dict[str, Tensor]]) -> tuple[Tensor, Tensor]:
    """``(flat (N, P), segment (P,))``: every embedding flattened in one order and the tensor id of each entry."""
    names = list(embeddings[0])
    for k, e in enumerate(embeddings):
        if set(e) != set(names):
            raise ValueError(f"task embedding {k} has other parameter tensors than embedding 0: use one probe for all")
    flat = torch.stack([torch.cat([e[n].reshape(-1).float() for n in names]) for e in embeddings])
    sizes = torch.tensor([embeddings[0][n].numel() for n in names])
    return flat, torch.repeat_interleave(torch.arange(len(names)), sizes)


def normalised_cosine_similarity(flat: Tensor, segment: Tensor, eps: float = 1e-6,
                                 block_elements: int = 2**17) -> Tensor:
    """(N, N) similarity S of stacked embeddings (``stack_embeddings``), unit diagonal, symmetric.

    Args:
        flat: (N, P) non-negative embeddings.
        segment: (P,) tensor id of every entry, contiguous runs (the average runs over tensors, not entries).
        eps: the release's 1e-6 in the normalisation.
        block_elements: rows x columns x entries of one block; 2**17 floats (512 KiB) stay in a core's L2
            cache (at N = 100 on the Conv4 probe, 2**16 took 0.34 s and 2**20 0.51 s of the earlier pow form).
    """
    n = flat.shape[0]
    counts = torch.bincount(segment).tolist()
    total = torch.zeros(n, n, dtype=flat.dtype)
    for part in flat.split(counts, dim=1):  # per parameter tensor: all pairs of a block of rows at once
        rows = max(1, block_elements // max(n * part.shape[1], 1))
        shifted = part + eps  # b + eps once per tensor, not once per block
        for start in range(0, n, rows):
            a = part[start:start + rows, None]  # (r, 1, P) against the columns j >= start (upper triangle)
            w = (a + shifted[start:]).reciprocal_()  # (r, n_j, P): 1 / (a + b + eps)
            b_norm = w * part[start:]  # b'
            a_norm = w.mul_(a)  # a', in place of w
            cos = torch.linalg.vecdot(a_norm, b_norm) / (torch.linalg.vector_norm(a_norm, dim=-1)
                                                          * torch.linalg.vector_norm(b_norm, dim=-1)).clamp_min(1e-30)
            total[start:start + rows, start:] += cos
    sim = total.triu() / len(counts)
    sim = sim + sim.triu(1).T  # the lower triangle mirrors the upper one
    sim.fill_diagonal_(1.0)
    return sim


def pairwise_similarity_loop(embeddings: list[dict[str, Tensor]], eps: float = 1e-6) -> Tensor:
    """The release's formulation: a Python loop over pairs i < j and tensors (reference and timing baseline)."""
    n = len(embeddings)
    sim = torch.eye(n)
    for i in range(n):
        for j in range(i + 1, n):
            values = []
            for name in embeddings[i]:
                a, b = embeddings[i][name].flatten().float(), embeddings[j][name].flatten().float()
                a_n, b_n = a / (a + b + eps), b / (a + b + eps)
                values.append(torch.nn.functional.cosine_similarity(a_n, b_n, dim=0, eps=1e-30))
            sim[i, j] = sim[j, i] = torch.stack(values).mean()
    return sim


def group_models(similarity: Tensor, n_groups: int, mode: GroupingMode = "heterogeneous", seed: int = 42,
                 n_init: int = 30) -> list[list[int]]:
    """Model ids per group, by spectral clustering of D = 1 - S (``heterogeneous``), of S
    (``homogeneous``) or a seeded random split (``random``); empty clusters are dropped.

    Args:
        similarity: (N, N) S.
        n_groups: clusters (release 5).
        mode: which affinity (see the module docstring).
        seed: ``random_state`` of the clustering (release 42) / the permutation seed.
        n_init: k-means restarts of the spectral embedding (release 30).
    """
    n = similarity.shape[0]
    if mode not in ("heterogeneous", "homogeneous", "random"):
        raise ValueError(f"model.init_args.grouping={mode!r}: use heterogeneous, homogeneous or random")
    if not 1 <= n_groups <= n:
        raise ValueError(f"model.init_args.n_groups={n_groups} but the zoo has {n} teachers: "
                         "use at most one group per teacher")
    if mode == "random":
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        return [sorted(chunk.tolist()) for chunk in perm.chunk(n_groups)]
    if n_groups == 1:
        return [list(range(n))]
    from sklearn.cluster import SpectralClustering

    affinity = (1.0 - similarity) if mode == "heterogeneous" else similarity
    affinity = affinity.double().clamp_min(0).numpy()
    labels = SpectralClustering(n_clusters=n_groups, affinity="precomputed", n_init=n_init,
                                random_state=seed).fit_predict(affinity)
    groups = [np.flatnonzero(labels == c).tolist() for c in range(n_groups)]
    return [g for g in groups if g]


def order_by_group(groups: list[list[int]]) -> list[int]:
    """The model ids group after group (the heatmap's axis order)."""
    return [m for g in groups for m in g]


def mean_within_group(matrix: Tensor, groups: list[list[int]]) -> float:
    """Mean of the off-diagonal entries of ``matrix`` between members of one group (a group heterogeneity)."""
    label = torch.full((matrix.shape[0],), -1)
    for c, g in enumerate(groups):
        label[g] = c
    same = (label[:, None] == label[None]) & (label[:, None] >= 0) & ~torch.eye(len(label), dtype=torch.bool)
    return float(matrix[same].mean()) if bool(same.any()) else float("nan")
