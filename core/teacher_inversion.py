"""Model inversion of one teacher with a freshly initialised generator (TGR's data recovery).

TGR (Wei et al., ICML 2024, Sec. 3.1; release ``synthesis/task_recovery.py``) recovers a task from each
sampled teacher by re-initialising the FREE/Fast-Datafree generator (``core.meta_generator.Generator``:
conv/linear weights N(0, 0.02), biases 0, BN weights N(1, 0.02)) and optimising it together with the
latents for ``steps`` Adam steps on the inversion loss (CE + BatchNorm statistics), keeping the images
of the lowest-loss step. There is no meta-generator: every teacher starts from scratch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from core.meta_generator import Generator


def fresh_generator(nz: int, ngf: int, image_size: int, channels: int, generator: torch.Generator) -> Generator:
    """A generator with the release's ``reset_model`` initialisation, drawn from ``generator``."""
    net = Generator(nz, ngf, image_size, channels)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.normal_(0.0, 0.02, generator=generator)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.normal_(1.0, 0.02, generator=generator)
                m.bias.zero_()
    return net


def invert(generator: Generator, z: Tensor, loss_fn: Callable[[Tensor], Tensor], steps: int, lr: float = 1e-3,
           betas: tuple[float, float] = (0.5, 0.999)) -> tuple[Tensor, Tensor]:
    """Optimise ``generator`` and the latents on ``loss_fn`` (images -> scalar); ``(best_images, best_loss)``.

    The best step is tracked on tensors (``torch.where``), with no host read per step.
    """
    if steps < 1:
        raise ValueError(f"model.init_args.inversion_steps={steps}: at least one inversion step is needed")
    z = z.clone().requires_grad_(True)
    opt = torch.optim.Adam([{"params": list(generator.parameters())}, {"params": [z]}], lr=lr, betas=betas)
    best_loss, best = torch.tensor(float("inf"), device=z.device), None
    for _ in range(steps):
        images = generator(z)
        loss = loss_fn(images)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            better = loss.detach() < best_loss
            best = images.detach() if best is None else torch.where(better, images.detach(), best)
            best_loss = torch.minimum(best_loss, loss.detach())
    return best, best_loss
