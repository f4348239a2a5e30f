"""The trainable parts of ASP (Liu et al., ECCV 2024) and of its prompt baselines, as plain nn.Modules.

``PromptEncoder`` is the release's ``PROMPT_Encoder``: one rank-``hidden`` linear map for the mean and one
for the scale of the task-specific prompts, shared by all layers and told the layer by the layer's first
(detached) task-invariant prompt token. ``PromptPool`` is the L2P-style pool with key-query matching used
by the ``l2p`` baseline. ``CosineClassifier`` is the release's ``CosineLinear`` (one proxy, learned scale).
``PromptedViT`` holds the frozen backbone with the prompts of a variant and computes the features.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.prompted_vit import prompted_features, require_prompt_vit
from core.timm_models import create_model


class PromptEncoder(nn.Module):
    """Self-adaptive task-specific prompts: a Gaussian per (image, layer) over ``tokens`` x ``dim`` entries.

    Args:
        dim: token width D of the backbone.
        tokens: task-specific prompt tokens per layer (m).
        hidden: width of the two-layer linear maps (the release's 256; no activation in between).
        sigma_shift: sigma = softplus(f_sigma(u) - sigma_shift); 5 makes sigma start near 0.007.
    """

    def __init__(self, dim: int = 768, tokens: int = 3, hidden: int = 256, sigma_shift: float = 5.0) -> None:
        super().__init__()
        self.tokens, self.dim, self.sigma_shift = tokens, dim, sigma_shift
        self.f_mu = nn.Sequential(nn.Linear(2 * dim, hidden), nn.Linear(hidden, tokens * dim))
        self.f_sigma = nn.Sequential(nn.Linear(2 * dim, hidden), nn.Linear(hidden, tokens * dim))

    def forward(self, layer_tokens: Tensor, feature: Tensor) -> tuple[Tensor, Tensor]:
        """``layer_tokens`` (L, D) (first TIP token of each layer), ``feature`` (B, D) frozen [CLS].

        Returns mu and sigma, each (B, L, m, D).
        """
        batch, layers = feature.shape[0], layer_tokens.shape[0]
        u = torch.cat([layer_tokens.expand(batch, layers, -1), feature[:, None].expand(-1, layers, -1)], dim=-1)
        shape = (batch, layers, self.tokens, self.dim)
        mu = self.f_mu(u).view(shape)
        sigma = F.softplus(self.f_sigma(u) - self.sigma_shift).view(shape)
        return mu, sigma


def gaussian_kl(mu: Tensor, sigma: Tensor) -> Tensor:
    """KL(N(mu, sigma^2) || N(0, I)) summed over each (image, layer)'s prompt entries, averaged over pairs.

    The release's ``0.5 * sum(mu^2 + sigma^2 - 2 log sigma - 1) / (N * L)`` for mu, sigma (N, L, m, D).
    """
    pairs = mu.shape[0] * mu.shape[1]
    return 0.5 * (mu.square() + sigma.square() - 2 * sigma.log() - 1).sum() / pairs


class PromptPool(nn.Module):
    """L2P-style prompt pool: the ``top_k`` prompts whose keys best match the frozen [CLS] query.

    Args:
        pool_size: prompts in the pool (L2P: 10).
        layers: blocks that receive prompts (deep, like ASP's TIP/TSP, for a like-for-like comparison).
        length: tokens per prompt per layer.
        dim: token width D.
        top_k: prompts chosen per image; their tokens are concatenated.
    """

    def __init__(self, pool_size: int = 10, layers: int = 12, length: int = 3, dim: int = 768, top_k: int = 2) -> None:
        super().__init__()
        if not 1 <= top_k <= pool_size:
            raise ValueError(f"model.init_args.pool_top_k={top_k} must lie in 1..pool_size={pool_size}")
        self.top_k = top_k
        self.keys = nn.Parameter(torch.empty(pool_size, dim).uniform_(-1, 1))
        self.prompts = nn.Parameter(torch.empty(pool_size, layers, length, dim).uniform_(-1, 1))

    def forward(self, query: Tensor) -> tuple[Tensor, Tensor]:
        """Prompts (B, L, top_k * length, D) for ``query`` (B, D), and the key pull loss (1 - cos, mean)."""
        similarity = F.normalize(query, dim=-1) @ F.normalize(self.keys, dim=-1).T  # (B, P)
        chosen = similarity.topk(self.top_k, dim=1).indices  # (B, k)
        prompts = self.prompts[chosen]  # (B, k, L, length, D)
        batch, k, layers, length, dim = prompts.shape
        prompts = prompts.permute(0, 2, 1, 3, 4).reshape(batch, layers, k * length, dim)
        pull = (1 - similarity.gather(1, chosen)).mean()
        return prompts, pull


class CosineClassifier(nn.Module):
    """``scale * cos(feature, w_c)`` with a learned scalar scale (init 1), rows writable as prototypes.

    Args:
        dim: feature width.
        num_classes: rows (all classes of the stream; only seen ones are scored).
    """

    def __init__(self, dim: int = 768, num_classes: int = 100) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(dim)
        self.weight = nn.Parameter(torch.empty(num_classes, dim).uniform_(-bound, bound))
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, features: Tensor) -> Tensor:
        return self.scale * F.normalize(features, dim=-1) @ F.normalize(self.weight, dim=-1).T


def anchor_indices(features: Tensor, labels: Tensor, classes: Tensor, means: Tensor) -> Tensor:
    """Per class in ``classes`` the index of the example whose feature has the largest cosine to its class mean."""
    cosine = F.normalize(features, dim=-1) @ F.normalize(means, dim=-1).T  # (N, K)
    cosine = cosine.masked_fill(labels[:, None] != classes[None, :], float("-inf"))
    return cosine.argmax(0)


def anchor_loss(features: Tensor, anchors: Tensor) -> Tensor:
    """Mean over the batch of ``1 - cos(h_i, stopgrad(anchor of y_i))``; ``anchors`` (B, D) are row-aligned.

    Averaging over samples weights each class's mean term by its count in the batch, the release's
    weighting (one anchor copy per sample there).
    """
    return (1 - F.cosine_similarity(features, anchors.detach(), dim=-1)).mean()


def anchor_loss_per_copy(features: Tensor, labels: Tensor, anchor_copies: Tensor) -> Tensor:
    """The release's form: copy ``j`` is the anchor of ``labels[j]`` forwarded with its own noise, and the
    loss averages over copies ``j`` the mean ``1 - cos(h_i, copy_j)`` over the samples ``i`` of its class."""
    cosine = F.normalize(features, dim=-1) @ F.normalize(anchor_copies.detach(), dim=-1).T  # (B, B)
    same = (labels[:, None] == labels[None, :]).to(cosine.dtype)
    return (((1 - cosine) * same).sum(0) / same.sum(0)).mean()


class PromptedViT(nn.Module):
    """A frozen timm ViT with the prompts of ``prompts`` at every block; ``forward`` gives the features.

    ``asp``: TIP (``tip_tokens``, learned) + TSP (``tsp_tokens``, from the prompt encoder and ``p_avg``, a
    persistent buffer so checkpoints keep it); ``vpt``: TIP only; ``l2p``: a prompt pool; ``none``: no
    prompts. The ViT is frozen and kept in eval mode (no dropout).

    Args:
        backbone: timm ViT name.
        pretrained: load timm's pretrained weights.
        backbone_checkpoint: local weights for the backbone.
        backbone_kwargs: extra ``timm.create_model`` arguments.
        prompts: ``asp``, ``vpt``, ``l2p`` or ``none``.
        tip_tokens: task-invariant prompt tokens per block.
        tsp_tokens: task-specific tokens per block (``asp``), or tokens per pool prompt (``l2p``).
        tip_init: ``zero`` or ``random`` (N(0, 1)).
        encoder_hidden: width of the prompt encoder's linear maps.
        avg_alpha: weight of ``p_avg`` in the TSP in use.
        pool_size: prompts in the ``l2p`` pool.
        pool_top_k: pool prompts chosen per image.
        image_size: resize inputs to this side first (None: as they come).
    """

    def __init__(self, backbone: str = "vit_base_patch16_224", pretrained: bool = False,
                 backbone_checkpoint: str | None = None, backbone_kwargs: dict[str, Any] | None = None,
                 prompts: Literal["asp", "vpt", "l2p", "none"] = "asp", tip_tokens: int = 3, tsp_tokens: int = 3,
                 tip_init: Literal["zero", "random"] = "zero", encoder_hidden: int = 256, avg_alpha: float = 0.8,
                 pool_size: int = 10, pool_top_k: int = 2, image_size: int | None = None) -> None:
        super().__init__()
        vit = create_model(backbone, pretrained, backbone_checkpoint, {**(backbone_kwargs or {}), "num_classes": 0},
                           key="model.init_args.backbone", checkpoint_key="model.init_args.backbone_checkpoint")
        self.vit = require_prompt_vit(vit, "model.init_args.backbone").requires_grad_(False).eval()
        self.prompts, self.avg_alpha, self.image_size = prompts, avg_alpha, image_size
        depth, dim = len(vit.blocks), vit.embed_dim
        self.tip = None
        if prompts in ("asp", "vpt"):
            self.tip = nn.Parameter((torch.zeros if tip_init == "zero" else torch.randn)(depth, tip_tokens, dim))
        self.prompt_encoder = PromptEncoder(dim, tsp_tokens, encoder_hidden) if prompts == "asp" else None
        self.pool = PromptPool(pool_size, depth, tsp_tokens, dim, pool_top_k) if prompts == "l2p" else None
        self.register_buffer("p_avg", torch.zeros(depth, tsp_tokens, dim))

    def train(self, mode: bool = True) -> PromptedViT:
        super().train(mode)
        self.vit.eval()  # frozen: no dropout, also while the prompts train
        return self

    def _resized(self, images: Tensor) -> Tensor:
        if self.image_size is None or images.shape[-1] == self.image_size:
            return images
        return F.interpolate(images, size=(self.image_size,) * 2, mode="bicubic", align_corners=False)

    @torch.no_grad()
    def frozen_features(self, images: Tensor) -> Tensor:
        """[CLS] of the unprompted frozen backbone: f(x) of the prompt encoder, the SimpleCIL feature."""
        return prompted_features(self.vit, self._resized(images), None)

    def mu(self, cls: Tensor) -> Tensor:
        """The TSP means (B, L, m, D) for frozen features ``cls`` (ASP only)."""
        return self.prompt_encoder(self.tip[:, 0].detach(), cls)[0]

    def forward(self, images: Tensor, perturb: float = 0.0, cls: Tensor | None = None) -> tuple[Tensor, dict]:
        """Prompted features (B, D) and side outputs (``mu``, ``sigma`` for ASP, ``pull`` for L2P).

        ``perturb`` scales the TSP noise (0: the mean, as at evaluation); ``cls`` reuses frozen features.
        """
        if self.prompts == "none":
            return self.frozen_features(images), {}
        parts, extra = [], {}
        if self.tip is not None:
            parts.append(self.tip.expand(images.shape[0], -1, -1, -1))
        if self.prompts in ("asp", "l2p") and cls is None:
            cls = self.frozen_features(images)
        if self.prompt_encoder is not None:
            mu, sigma = self.prompt_encoder(self.tip[:, 0].detach(), cls)
            sample = mu + sigma * torch.randn_like(mu) * perturb if perturb else mu
            parts.append(self.avg_alpha * self.p_avg + (1 - self.avg_alpha) * sample)  # TSP
            extra = {"mu": mu, "sigma": sigma}
        elif self.pool is not None:
            pooled, pull = self.pool(cls)
            parts.append(pooled)
            extra = {"pull": pull}
        return prompted_features(self.vit, self._resized(images), torch.cat(parts, dim=2).unbind(1)), extra
