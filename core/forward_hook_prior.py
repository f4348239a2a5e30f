"""Priors read from a teacher's activations during an ordinary forward pass (DeepInversion's BN
statistics, PSAQ-ViT's patch similarity): ``with prior: model(x)``, then ``prior.loss()``.

The hooks only record; ``loss()`` turns the last forward's records into the prior's value, so the
teacher runs unchanged and leaving the ``with`` block removes every hook.
"""

from __future__ import annotations

from torch.utils.hooks import RemovableHandle


class ForwardHookPrior:
    """Context-manager base: subclasses register their hooks in ``_register`` and compute ``loss()``."""

    _handles: list[RemovableHandle]

    def _register(self) -> list[RemovableHandle]:
        raise NotImplementedError

    def __enter__(self):
        self._handles = self._register()
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @staticmethod
    def _recorded(records: list, name: str) -> list:
        """``records`` when every hook has fired, else the error that says why a loss cannot be read yet."""
        if any(r is None for r in records):
            raise RuntimeError(f"run a forward pass inside the `with` block before asking for the {name} loss")
        return records
