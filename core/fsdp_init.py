"""Load full pretrained weights once, not on every rank, when FSDP broadcasts rank 0's states.

Under ``cli.fsdp.BlockFSDPStrategy`` with ``sync_module_states`` the wrapped model receives rank 0's
parameters and buffers, so only rank 0 needs the real weights; the other ranks build the same
architecture on the ``meta`` device (no memory) and FSDP allocates their shards. Duck-typed on the
trainer's strategy (core/ never imports lightning).
"""

from __future__ import annotations

from typing import Any


def loads_full_weights(trainer: Any) -> bool:
    """True unless this is a rank > 0 of a strategy that broadcasts rank 0's module states at wrap time."""
    strategy = getattr(trainer, "strategy", None)
    broadcasts = bool(getattr(strategy, "kwargs", {}).get("sync_module_states")) and "FSDP" in type(strategy).__name__
    return not broadcasts or getattr(trainer, "global_rank", 0) == 0
