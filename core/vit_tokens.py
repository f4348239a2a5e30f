"""Run a timm VisionTransformer on a per-image subset of its patch tokens.

Sparse Model Inversion (Hu et al., ICML 2024) stops computing on background patches: the image is
patch-embedded in full and the position embedding is added to every token, then each image keeps only
its own subset of patch tokens (prefix tokens -- CLS, distillation, registers -- are always kept), so
every transformer block really computes on fewer tokens. Because the position embedding is added
before the gather, a kept token still knows where it sits on the grid.

Patch importance is the attention of the CLS query to each patch key in the last block, averaged over
heads (SMI Sec. 3, "semantic foreground" criterion).

Index convention: a keep index is a ``LongTensor (B, K)`` of patch positions in ``[0, num_patches)``
on the row-major patch grid, i.e. without the prefix tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn


def require_vit(model: nn.Module, what: str = "model") -> VisionTransformer:
    """Return ``model`` if it is a timm VisionTransformer, else raise a TypeError naming ``what``."""
    if not isinstance(model, VisionTransformer):
        raise TypeError(
            f"{what}: sparse token computation needs a timm VisionTransformer (DeiT/ViT family), "
            f"got {type(model).__name__}. Use a ViT model or run dense (without token dropping)."
        )
    return model


def grid_size(model: VisionTransformer) -> tuple[int, int]:
    """Patch grid (rows, columns) of ``model`` at its configured image size."""
    rows, cols = model.patch_embed.grid_size
    return int(rows), int(cols)


def embed_tokens(model: VisionTransformer, images: Tensor) -> Tensor:
    """Patch-embed ``images`` and add prefix tokens and position embeddings: (B, prefix + patches, D)."""
    tokens = model.patch_embed(images)
    tokens = model._pos_embed(tokens)
    tokens = model.patch_drop(tokens)
    return model.norm_pre(tokens)


def _linear_patch_projection(model: VisionTransformer) -> nn.Conv2d | None:
    """The patch-embedding conv when it is a plain linear map of non-overlapping patches, else None."""
    proj = getattr(model.patch_embed, "proj", None)
    if not isinstance(proj, nn.Conv2d) or proj.kernel_size != proj.stride or proj.padding != (0, 0):
        return None
    if model.dynamic_img_size or getattr(model.patch_embed, "dynamic_img_pad", False):
        return None
    if model.training and getattr(model.pos_drop, "p", 0.0) > 0:
        return None  # dropout must act on the sum of patch and position embeddings
    return proj


def embed_kept_tokens(model: VisionTransformer, images: Tensor, keep_index: Tensor) -> Tensor:
    """Prefix tokens plus the kept patch tokens, with position embeddings: (B, prefix + K, D).

    Equal to ``gather_patches(embed_tokens(...))``, but a plain conv patch embedding is applied to the
    kept patches only (as a linear map of the unfolded pixels), so it shrinks with the token count.
    """
    proj = _linear_patch_projection(model)
    if proj is None:
        return gather_patches(embed_tokens(model, images), keep_index, model.num_prefix_tokens)
    batch, chans, height, width = images.shape
    ph, pw = proj.kernel_size
    rows, cols = height // ph, width // pw
    patches = images.reshape(batch, chans, rows, ph, cols, pw).permute(0, 2, 4, 1, 3, 5).reshape(batch, rows * cols, -1)
    kept = patches.gather(1, keep_index.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
    tokens = model.patch_embed.norm(F.linear(kept, proj.weight.flatten(1), proj.bias))
    # _pos_embed of all-zero patch tokens yields the prefix tokens and the bare position embeddings.
    base = model._pos_embed(tokens.new_zeros(batch, rows * cols, tokens.shape[-1]))
    base = gather_patches(base, keep_index, model.num_prefix_tokens)
    prefix = model.num_prefix_tokens
    tokens = torch.cat([base[:, :prefix], base[:, prefix:] + tokens], dim=1)
    return model.norm_pre(model.patch_drop(tokens))


def gather_patches(tokens: Tensor, keep_index: Tensor, num_prefix_tokens: int) -> Tensor:
    """Keep the prefix tokens and, per image, the patch tokens listed in ``keep_index`` (B, K)."""
    prefix, patches = tokens[:, :num_prefix_tokens], tokens[:, num_prefix_tokens:]
    index = keep_index.unsqueeze(-1).expand(-1, -1, patches.shape[-1])
    return torch.cat([prefix, patches.gather(1, index)], dim=1)


@torch.no_grad()
def cls_attention(block: nn.Module, tokens: Tensor, num_prefix_tokens: int) -> Tensor:
    """Head-averaged attention of the CLS query to each patch key of ``block``: (B, N_patches).

    The softmax runs over every key (prefix tokens included), as in the block itself; the prefix
    columns are then dropped. Only the CLS query row is formed, so this costs about a third of the
    block's qkv projection.
    """
    attn = block.attn
    h = block.norm1(tokens)
    batch, n, _ = h.shape
    qkv = attn.qkv(h).reshape(batch, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0][:, :, :1]), attn.k_norm(qkv[1])  # q: (B, H, 1, d), k: (B, H, N, d)
    probs = (q @ k.transpose(-2, -1) * attn.scale).softmax(dim=-1)  # (B, H, 1, N)
    return probs[:, :, 0, num_prefix_tokens:].mean(dim=1)


def forward_kept(
    model: VisionTransformer,
    images: Tensor,
    keep_index: Tensor | None = None,
    return_cls_attention: bool = False,
    pre_logits: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Logits of ``model`` computed on the kept patch tokens only.

    Args:
        model: a timm VisionTransformer (CLS and distillation/register prefix tokens are handled by
            timm's own ``_pos_embed`` and ``forward_head``).
        images: input batch (B, C, H, W), already normalised.
        keep_index: (B, K) patch positions to keep per image; ``None`` keeps every patch (dense).
        return_cls_attention: also return the last block's head-mean CLS-to-patch attention over
            the kept patches, (B, K) (or (B, N_patches) when dense). Needs a class token.
        pre_logits: return the pooled features the classifier head reads instead of the logits.

    Returns:
        ``(logits, scores)`` with ``scores`` None unless requested.
    """
    if keep_index is not None and keep_index.shape[1] == model.patch_embed.num_patches:
        keep_index = None  # every patch kept: the dense path (known from the shape, no device read)
    tokens = embed_tokens(model, images) if keep_index is None else embed_kept_tokens(model, images, keep_index)
    *body, last = model.blocks
    for block in body:
        tokens = block(tokens)
    scores = None
    if return_cls_attention:
        if model.cls_token is None:
            raise ValueError("CLS-attention scoring needs a ViT with a class token (class_token=True).")
        scores = cls_attention(last, tokens, model.num_prefix_tokens)
    tokens = model.norm(last(tokens))
    return model.forward_head(tokens, pre_logits=pre_logits), scores


def top_patches(scores: Tensor, keep: int, current_index: Tensor | None = None) -> Tensor:
    """Absolute patch positions of the ``keep`` highest-scoring patches per image, sorted: (B, keep).

    ``scores`` (B, K) are aligned with ``current_index`` (B, K) (all patches when None).
    """
    if not 0 < keep <= scores.shape[1]:
        raise ValueError(f"cannot keep {keep} of {scores.shape[1]} patches")
    rel = scores.topk(keep, dim=1).indices
    chosen = rel if current_index is None else current_index.gather(1, rel)
    return chosen.sort(dim=1).values


def remap_rolled_flipped(
    keep_index: Tensor, grid: tuple[int, int], patch_size: int, shift: tuple[int, int], flip: bool
) -> Tensor:
    """Grid cells where kept content lands after ``torch.roll(x, shift, (2, 3))`` then a horizontal flip.

    A pixel shift is rounded to the nearest whole patch (half-way rounds up, as the SMI release does
    with floor semantics, so negative shifts work too); the row/column of every kept patch is then
    rolled modulo the grid and, if flipped, mirrored: column c -> W - 1 - c.
    """
    rows, cols = grid
    dr, dc = (int((s + patch_size // 2) // patch_size) for s in shift)  # floor(s / P + 1/2)
    r = (keep_index // cols + dr) % rows
    c = (keep_index % cols + dc) % cols
    if flip:
        c = cols - 1 - c
    return r * cols + c


def patch_mask_to_pixels(keep_index: Tensor, grid: tuple[int, int], patch_size: int) -> Tensor:
    """Boolean pixel mask (B, 1, H, W) that is True inside the kept patches."""
    rows, cols = grid
    mask = torch.zeros(keep_index.shape[0], rows * cols, dtype=torch.bool, device=keep_index.device)
    mask.scatter_(1, keep_index, True)
    mask = mask.view(-1, 1, rows, cols)
    return mask.repeat_interleave(patch_size, dim=2).repeat_interleave(patch_size, dim=3)


def forward_masked(model: nn.Module, images: Tensor, keep_mask: Tensor | None) -> Tensor:
    """Logits with each image computing on the patches its boolean ``keep_mask`` (B, N_patches) marks.

    Rows are grouped by their kept count (a batch may mix images from different sparsity levels)
    and each group runs :func:`forward_kept`; all-True rows run dense. ``keep_mask=None`` is a plain
    dense forward of any model. The grouping reads counts back from the device: for training loops,
    batch rows of one count and call :func:`forward_kept` with a ``keep_index`` (no read-back).
    """
    if keep_mask is None or bool(keep_mask.all()):
        return model(images)
    vit = require_vit(model)
    counts = keep_mask.sum(dim=1)
    logits = None
    for count in counts.unique().tolist():
        rows = (counts == count).nonzero().squeeze(1)
        mask = keep_mask[rows]
        index = None if count == mask.shape[1] else mask.nonzero()[:, 1].view(len(rows), count)
        out, _ = forward_kept(vit, images[rows], index)
        if logits is None:
            logits = out.new_empty(images.shape[0], out.shape[1])
        logits[rows] = out
    return logits
