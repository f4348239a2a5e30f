"""DeepInversion's BatchNorm-statistics prior for CNN teachers.

Yin et al. (CVPR 2020), Eq. (4): the feature statistics of the synthetic batch at the input of every
BatchNorm2d should match the layer's running statistics,
    R_feature = sum_l ||mu_l(x) - running_mean_l||_2 + ||var_l(x) - running_var_l||_2,
with the first layer weighted ``first_layer_multiplier`` times (the release uses 10).
"""

from __future__ import annotations

from torch import Tensor, nn

from core.forward_hook_prior import ForwardHookPrior


class BatchNormStatsPrior(ForwardHookPrior):
    """Context manager hooking every BatchNorm2d of ``model``; ``loss()`` reads the last forward.

    Args:
        model: a network with BatchNorm2d layers in eval mode (their running statistics are targets).
        first_layer_multiplier: weight of the first BatchNorm layer's term.
    """

    def __init__(self, model: nn.Module, first_layer_multiplier: float = 10.0) -> None:
        self.layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        if not self.layers:
            raise ValueError(f"{type(model).__name__} has no BatchNorm2d layer: the BN prior needs a CNN teacher")
        self.first_layer_multiplier = first_layer_multiplier
        self._terms: list[Tensor | None] = [None] * len(self.layers)

    def _hook(self, i: int):
        def hook(module: nn.BatchNorm2d, inputs: tuple[Tensor, ...], _output: Tensor) -> None:
            x = inputs[0]
            mean = x.mean(dim=(0, 2, 3))
            var = x.permute(1, 0, 2, 3).flatten(1).var(dim=1, unbiased=False)
            self._terms[i] = (mean - module.running_mean).norm() + (var - module.running_var).norm()

        return hook

    def _register(self) -> list:
        return [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.layers)]

    def loss(self) -> Tensor:
        """R_feature of the most recent forward pass."""
        first, *rest = self._recorded(self._terms, "BN")
        return self.first_layer_multiplier * first + sum(rest)
