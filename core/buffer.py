"""A reservoir replay buffer held in tensors (Vitter's algorithm R, as in mammoth's ``utils/buffer.py``).

The buffer keeps ``capacity`` examples of a stream so that every example seen so far is in it with the
same probability ``capacity / seen``. Each slot holds the input *without augmentation* (replay
re-augments it), its label, the logits the network produced when it was inserted (DER/DER++) and its
task id. Tensors are registered buffers, so the buffer is saved and restored with the owning module's
``state_dict`` (and hence in Lightning checkpoints); they are allocated lazily at the first insertion.

Randomness is keyed (:mod:`core.rng`): the insertion draws of a batch depend only on ``seed`` and the
number of examples seen before it, so a resumed run inserts exactly as an uninterrupted one.

DDP view (the caller's contract): all-gather each step's examples in rank order and call :meth:`add`
with the gathered batch on every rank. Every rank then holds the *same* buffer, a reservoir of the
global stream of size ``capacity`` (the paper's memory size), and a checkpoint written by rank 0 is valid
for any world size. Replay batches are then drawn with a generator keyed by the rank, so that ranks
replay different examples just as they train on different stream examples.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from core.rng import keyed_generator

FIELDS = ("examples", "labels", "logits", "task_labels")


class ReservoirBuffer(nn.Module):
    """Reservoir sampling over a stream of labelled examples.

    Args:
        capacity: number of slots (examples kept); must be positive.
        seed: seed of the insertion draws.
    """

    def __init__(self, capacity: int, seed: int = 0) -> None:
        super().__init__()
        if capacity < 1:
            raise ValueError(f"a replay buffer needs capacity >= 1, got {capacity}")
        self.capacity, self.seed = int(capacity), int(seed)
        self.register_buffer("num_seen", torch.zeros((), dtype=torch.long))
        # Host copy of ``num_seen``: the tensor follows the module to the GPU, where every read of it
        # (several per training step) would wait for the device. Kept equal by add() and state loading.
        self._seen = 0
        for name in FIELDS:
            self.register_buffer(name, torch.empty(0))

    def __len__(self) -> int:
        return min(self._seen, self.capacity)

    def is_empty(self) -> bool:
        return self._seen == 0

    def _allocate(self, columns: dict[str, Tensor]) -> None:
        for name, value in columns.items():
            setattr(self, name, torch.zeros((self.capacity, *value.shape[1:]), dtype=value.dtype, device=value.device))

    def reservoir_slots(self, n: int) -> tuple[Tensor, Tensor]:
        """Slots for the next ``n`` stream examples: ``(rows of the batch kept, their slots)``.

        Example number ``p`` of the stream (0-based) goes to slot ``p`` while the buffer fills, then to a
        uniform draw ``j`` in ``0..p`` if ``j < capacity`` (else it is dropped). Within a batch a later
        example that draws the slot of an earlier one overwrites it, as in sequential insertion.
        """
        seen = self._seen
        position = torch.arange(seen, seen + n, dtype=torch.float64)
        draws = (torch.rand(n, generator=keyed_generator(self.seed, seen), dtype=torch.float64) * (position + 1)).long()
        slots = torch.where(position < self.capacity, position.long(), draws)
        last_writer = {slot: row for row, slot in enumerate(slots.tolist()) if slot < self.capacity}
        rows = torch.tensor(sorted(last_writer.values()), dtype=torch.long)
        return rows, slots[rows]

    @torch.no_grad()
    def add(self, examples: Tensor, labels: Tensor, logits: Tensor | None = None,
            task_labels: Tensor | None = None) -> Tensor:
        """Offer a batch to the reservoir; return the slots that were written (in row order)."""
        columns = {"examples": examples, "labels": labels}
        if logits is not None:
            columns["logits"] = logits
        if task_labels is not None:
            columns["task_labels"] = task_labels
        if self.is_empty():
            self._allocate(columns)
        missing = [name for name in FIELDS if getattr(self, name).numel() and name not in columns]
        if missing:
            raise ValueError(f"the buffer stores {missing} for every example; pass them to add()")
        rows, slots = self.reservoir_slots(len(examples))
        if len(rows):
            device_rows, device_slots = rows.to(examples.device), slots.to(examples.device)
            for name, value in columns.items():
                getattr(self, name)[device_slots] = value.detach()[device_rows].to(getattr(self, name).dtype)
        self.num_seen += len(examples)
        self._seen += len(examples)
        return slots

    def sample(self, size: int, generator: torch.Generator) -> dict[str, Tensor]:
        """Draw ``min(size, len(self))`` stored examples without replacement (``generator`` on the CPU)."""
        if self.is_empty():
            raise RuntimeError("cannot sample from an empty replay buffer")
        index = torch.randperm(len(self), generator=generator)[:size].to(self.examples.device)
        return {name: getattr(self, name)[index] for name in FIELDS if getattr(self, name).numel()}

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # Slots are allocated at the first insertion: take the checkpoint's shapes before copying.
        for name in FIELDS:
            value = state_dict.get(prefix + name)
            if value is not None and value.shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(value, device=self.num_seen.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._seen = int(self.num_seen)
