"""An in-memory pool of recovered images per class, from which N-way K-shot pseudo-episodes are drawn.

FREE (Sec. 3.1) stores the images synthesised from each teacher under the teacher's absolute class ids,
so classes met through different teachers are pooled, and samples tasks from the pool for MAML replay.
The release keeps a PNG ring buffer on disk (``max_batch_per_class`` writes per class); here each class
is a ring of ``capacity`` images in memory, optionally quantised to uint8 on the way in (the release's
PNG round-trip). The pool is a tensor state, saved in checkpoints.
"""

from __future__ import annotations

import torch
from torch import Tensor

from core.episodes import sample_episodes


class TaskPool:
    """Per-class ring buffers of images.

    Args:
        num_classes: absolute class ids run over ``0 .. num_classes - 1``.
        capacity: images kept per class (release: 20 writes x 20 images).
        quantize: store images as uint8 (values in [0, 1] rounded to 1/255), as the release's PNGs.
    """

    def __init__(self, num_classes: int, capacity: int = 400, quantize: bool = False) -> None:
        self.num_classes, self.capacity, self.quantize = num_classes, capacity, quantize
        self.images: Tensor | None = None  # (num_classes, capacity, C, H, W), allocated at the first add
        self.count = torch.zeros(num_classes, dtype=torch.long)  # images ever written per class

    def add(self, images: Tensor, classes: Tensor) -> None:
        """Append ``images`` (B, C, H, W) in [0, 1] with absolute class ids ``classes`` (B,)."""
        images, classes = images.detach().cpu(), classes.cpu()
        if self.images is None:
            dtype = torch.uint8 if self.quantize else images.dtype
            self.images = torch.zeros(self.num_classes, self.capacity, *images.shape[1:], dtype=dtype)
        if self.quantize:
            images = (images.clamp(0, 1) * 255).round().to(torch.uint8)
        # position of each image among the new images of its class -> ring slot
        order = torch.argsort(classes, stable=True)
        sorted_cls = classes[order]
        first = torch.searchsorted(sorted_cls, sorted_cls, side="left")
        rank = torch.empty_like(order)
        rank[order] = torch.arange(len(order)) - first
        slot = (self.count[classes] + rank) % self.capacity
        self.images[classes, slot] = images
        self.count += torch.bincount(classes, minlength=self.num_classes)

    def sizes(self) -> Tensor:
        return self.count.clamp(max=self.capacity)

    def sample(self, n_way: int, k_shot: int, q_query: int, n_episodes: int,
               generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """``(support, query, classes)``: (E, n_way, k, C, H, W), (E, n_way, q, C, H, W) float images and the
        (E, n_way) absolute classes, among classes holding at least k + q images."""
        sizes = self.sizes()
        ready = torch.nonzero(sizes >= k_shot + q_query).flatten()
        if len(ready) < n_way:
            raise ValueError(
                f"the task pool has {len(ready)} classes with k_shot + q_query = {k_shot + q_query} images, "
                f"fewer than n_way = {n_way}: raise warmup or teachers_per_step, or lower the data's "
                "k_shot/q_query so replay starts with enough recovered classes")
        # a flat list of (class, slot) pairs of the filled slots, sampled with the shared episode sampler
        counts = sizes[ready]
        cls = ready.repeat_interleave(counts)
        slot = torch.arange(len(cls)) - (counts.cumsum(0) - counts).repeat_interleave(counts)
        idx = sample_episodes(cls, n_way, k_shot, q_query, n_episodes, generator)
        images = self.images[cls[idx], slot[idx]]
        if self.quantize:
            images = images.float() / 255
        return images[:, :, :k_shot], images[:, :, k_shot:], cls[idx[:, :, 0]]

    def state_dict(self) -> dict:
        return {"images": self.images, "count": self.count.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.images, self.count = state["images"], state["count"].clone()
