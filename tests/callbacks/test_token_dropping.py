"""SparseTokenDropping with a second, unrelated module: ViT classifier training on token subsets."""

from __future__ import annotations

import lightning as L
import pytest
import timm
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from callbacks.token_dropping import SparseTokenDropping
from core import vit_tokens


class TokenDroppingClassifier(L.LightningModule):
    """Trains a tiny ViT on random patch subsets whose size the callback schedules (FLIP-style)."""

    def __init__(self) -> None:
        super().__init__()
        self.vit = timm.create_model(
            "vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, num_classes=3, depth=1,
            embed_dim=32, num_heads=2,
        )
        self.keep = 16
        self.calls: list[tuple[int, str]] = []
        self.tokens_seen: list[int] = []
        self.vit.blocks[0].register_forward_pre_hook(lambda _m, a: self.tokens_seen.append(a[0].shape[1]))

    def token_schedule_step(self) -> int:
        return self.global_step

    def token_schedule_length(self) -> int:
        return 10

    def num_kept_patches(self) -> int:
        return self.keep

    def prepare_token_drop(self) -> None:
        self.calls.append((self.global_step, "prepare"))

    def drop_patches(self, keep: int) -> None:
        self.calls.append((self.global_step, f"drop {keep}"))
        self.keep = keep

    def training_step(self, batch, batch_idx):
        x, y = batch
        index = torch.rand(x.shape[0], 16).argsort(dim=1)[:, : self.keep].sort(dim=1).values
        logits, _ = vit_tokens.forward_kept(self.vit, x, index)
        return F.cross_entropy(logits, y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(64, 3, 16, 16), torch.randint(3, (64,))), batch_size=4)


def fit(module: L.LightningModule, callback: SparseTokenDropping, steps: int, **kwargs) -> L.Trainer:
    trainer = L.Trainer(max_steps=steps, callbacks=[callback], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", **kwargs)
    trainer.fit(module)
    return trainer


def test_schedule_values() -> None:
    cb = SparseTokenDropping()
    assert cb.prune_iterations == [50, 100, 200, 300]
    assert cb.keep_counts(196) == [137, 95, 66, 46]  # DeiT/16 at 224 px (SMI notes)
    assert cb.keep_counts(64) == [44, 30, 21, 14]
    assert SparseTokenDropping([2, 4], [0.5, 0.25]).keep_counts(16) == [8, 2]


def test_callback_drives_a_second_module() -> None:
    module, cb = TokenDroppingClassifier(), SparseTokenDropping([2, 4, 7], 0.5)
    fit(module, cb, steps=9)
    assert module.calls == [(1, "prepare"), (2, "drop 8"), (3, "prepare"), (4, "drop 4"), (6, "prepare"), (7, "drop 2")]
    assert module.tokens_seen == [17, 17, 9, 9, 5, 5, 5, 3, 3]  # prefix + kept patches per step
    assert [h["kept"] for h in cb.history] == [8, 4, 2]


def test_protocol_error_names_the_missing_methods() -> None:
    class Plain(L.LightningModule):
        def token_schedule_step(self) -> int:
            return 0

    with pytest.raises(TypeError, match=r"Plain must implement SupportsTokenDropping.*missing method\(s\): "
                                         r"token_schedule_length, num_kept_patches, prepare_token_drop, drop_patches"):
        SparseTokenDropping().setup(None, Plain(), "fit")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"keep_ratio": 0.0}, r"keep_ratio must lie in \(0, 1\]"),
        ({"keep_ratio": 1.5}, r"keep_ratio must lie in \(0, 1\]"),
        ({"keep_ratio": [0.5, 0.5]}, "give one ratio or one per event"),
        ({"prune_iterations": [0, 5]}, "must be >= 1"),
        ({"prune_iterations": [5, 6]}, "at least 2"),
    ],
)
def test_bad_schedules_are_rejected(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SparseTokenDropping(**kwargs)


def test_events_at_or_beyond_the_schedule_are_refused_at_setup() -> None:
    with pytest.raises(ValueError, match=r"prune_iterations \[10, 12\] lie at or beyond the 10 steps"):
        fit(TokenDroppingClassifier(), SparseTokenDropping([2, 10, 12], 0.5), steps=3)


def test_state_round_trip_and_schedule_mismatch() -> None:
    module, cb = TokenDroppingClassifier(), SparseTokenDropping([2, 4], 0.5)
    fit(module, cb, steps=6)
    restored = SparseTokenDropping([2, 4], 0.5)
    restored.load_state_dict(cb.state_dict())
    assert restored.history == cb.history and len(restored.history) == 2
    with pytest.raises(ValueError, match="another token-dropping schedule"):
        SparseTokenDropping([3, 5], 0.5).load_state_dict(cb.state_dict())


def test_state_is_saved_in_checkpoints(tmp_path) -> None:
    module, cb = TokenDroppingClassifier(), SparseTokenDropping([2, 4], 0.5)
    trainer = fit(module, cb, steps=6, default_root_dir=tmp_path)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert ckpt["callbacks"]["SparseTokenDropping"]["history"] == cb.history
