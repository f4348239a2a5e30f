"""The FREE/Fast-Datafree image generator and its fast adaptation to one teacher.

Generator (release topology): z -> Linear -> (2 ngf, s/4, s/4) -> BN -> up x2 -> conv -> BN -> LReLU ->
up x2 -> conv -> BN -> LReLU -> conv -> sigmoid, images in [0, 1], BatchNorm always on batch statistics.
It is unconditional: latent ``i`` of a batch is paired with label ``i mod n_classes``.

:func:`adapt_generator` is the inner loop of FREE's meta-generator (FIVE, Wei et al. CVPR 2024, Sec. 3.1):
a copy of the generator and the latents take ``steps`` Adam steps on the inversion loss; the gradient of
the last step, taken at the ``steps - 1`` times adapted weights, is the first-order (FOMAML) contribution
of this teacher to the meta-gradient.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn


class Generator(nn.Module):
    """Noise-to-image generator.

    Args:
        nz: latent size (release 256).
        ngf: base width (release 64).
        image_size: output side, a multiple of 4.
        channels: output channels.
    """

    def __init__(self, nz: int = 256, ngf: int = 64, image_size: int = 32, channels: int = 3) -> None:
        super().__init__()
        if image_size % 4:
            raise ValueError(f"the generator's image_size must be a multiple of 4, got {image_size}")
        self.nz, self.init_size = nz, image_size // 4
        self.project = nn.Linear(nz, 2 * ngf * self.init_size**2)
        self.body = nn.Sequential(
            nn.BatchNorm2d(2 * ngf), nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * ngf, 2 * ngf, 3, padding=1, bias=False), nn.BatchNorm2d(2 * ngf), nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * ngf, ngf, 3, padding=1, bias=False), nn.BatchNorm2d(ngf), nn.LeakyReLU(0.2),
            nn.Conv2d(ngf, channels, 3, padding=1), nn.Sigmoid(),
        )

    def forward(self, z: Tensor) -> Tensor:
        h = self.project(z).view(z.shape[0], -1, self.init_size, self.init_size)
        return self.body(h)


def adapt_generator(generator: Generator, z: Tensor, loss_fn: Callable[[Tensor], Tensor], steps: int, lr: float,
                    betas: tuple[float, float] = (0.5, 0.999)) -> tuple[Tensor, list[Tensor], Tensor]:
    """Adapt a copy of ``generator`` and the latents ``z`` to ``loss_fn`` (images -> scalar loss).

    Returns:
        ``(images, last_grads, last_loss)``: the images of the last step (generated before its update,
        as the release keeps them), the gradient of every generator parameter at that step (the
        first-order meta-gradient term; ``None`` entries for parameters without gradient), and its loss.
    """
    fast = copy.deepcopy(generator)
    z = z.clone().requires_grad_(True)
    params = list(fast.parameters())
    opt = torch.optim.Adam([{"params": params}, {"params": [z]}], lr=lr, betas=betas)
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        images = fast(z)
        loss = loss_fn(images)
        loss.backward()
        if step == steps - 1:  # the last gradient is the meta-gradient term; its update would be thrown away
            return images.detach(), [p.grad for p in params], loss.detach()
        opt.step()
    raise ValueError(f"generator adaptation needs at least one step, got {steps}")
