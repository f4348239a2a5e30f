"""Knowledge transfer and post-training quantisation modules of the SMI family."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import timm
import torch
from torch.utils.data import DataLoader

from core.kd import kd_kl_div
from core.quantization import QuantAct, calibration
from core.timm_models import export_weights
from core.vit_tokens import forward_kept
from datamodules.smi import PoolDataset, TensorDictDataset
from lit_modules.smi_kd import SMIDistillationModule
from lit_modules.smi_ptq import SMIQuantizationModule

VIT = {"img_size": 16, "patch_size": 4, "num_classes": 4, "depth": 2, "embed_dim": 32, "num_heads": 2}


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, **VIT)
    torch.nn.init.normal_(vit.cls_token)  # timm's ~1e-6 init collapses under per-tensor quantisation
    return str(export_weights(vit, tmp_path_factory.mktemp("t") / "teacher.safetensors"))


class Data(L.LightningDataModule):
    """Inverted-like training rows (with masks) and real-like evaluation rows."""

    def __init__(self, keep: int = 5) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(1)
        mask = torch.zeros(32, 16, dtype=torch.bool)
        for row in mask:
            row[torch.randperm(16, generator=gen)[:keep]] = True
        self.train = PoolDataset(torch.randn(32, 3, 16, 16, generator=gen), torch.zeros(32).long(), mask)
        self.eval = TensorDictDataset(image=torch.randn(24, 3, 16, 16, generator=gen) * 3,
                                      label=torch.randint(4, (24,), generator=gen))

    def train_dataloader(self):
        return DataLoader(self.train, batch_size=8)

    def val_dataloader(self):
        return DataLoader(self.eval, batch_size=8)


def trainer(**kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                     enable_checkpointing=False, **kwargs)


def test_ptq_calibrates_on_sparse_tokens_and_validation_never_widens_ranges(teacher_file) -> None:
    module = SMIQuantizationModule("vit_tiny_patch16_224", VIT, teacher_file, weight_bits=8, act_bits=8)
    seen = []
    module.quantized.blocks[0].register_forward_pre_hook(lambda _m, a: seen.append(a[0].shape[1]))
    data = Data()
    trainer(max_epochs=1, num_sanity_val_steps=0).fit(module, datamodule=data)
    assert seen[:4] == [6, 6, 6, 6]  # calibration ran on CLS + 5 kept patches
    reference = SMIQuantizationModule("vit_tiny_patch16_224", VIT, teacher_file, weight_bits=8, act_bits=8)
    with torch.no_grad(), calibration(reference.quantized):
        for batch in data.train_dataloader():
            forward_kept(reference.quantized, batch["image"], batch["keep_index"])
    ranges = [(q.x_min, q.x_max) for q in module.quantized.modules() if isinstance(q, QuantAct)]
    expected = [(q.x_min, q.x_max) for q in reference.quantized.modules() if isinstance(q, QuantAct)]
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(ranges, expected))
    metrics = trainer().validate(module, datamodule=data, verbose=False)[0]
    assert 0 <= metrics["val/acc"] <= 1 and "val/acc_fp" in metrics


def test_ptq_w8a8_agrees_with_the_float_model_more_than_w4a8(teacher_file) -> None:
    x = torch.randn(64, 3, 16, 16)
    agreement = {}
    for bits in (8, 4, 2):
        module = SMIQuantizationModule("vit_tiny_patch16_224", VIT, teacher_file, weight_bits=bits, act_bits=8,
                                       sparse_tokens=False)
        with torch.no_grad():
            with calibration(module.quantized):
                module.quantized(x)
            agreement[bits] = (module(x).argmax(-1) == module.model(x).argmax(-1)).float().mean().item()
    assert agreement[8] >= 0.9 and agreement[8] >= agreement[4] >= agreement[2]


def test_kd_linear_probe_trains_only_the_head_on_sparse_tokens(teacher_file) -> None:
    module = SMIDistillationModule(teacher="vit_tiny_patch16_224", teacher_kwargs=VIT, teacher_checkpoint=teacher_file,
                                   student="vit_tiny_patch16_224", student_kwargs=VIT, linear_probe=True, lr=0.5)
    before = {k: v.clone() for k, v in module.student.state_dict().items()}
    seen = []
    module.student.blocks[0].register_forward_pre_hook(lambda _m, a: seen.append(a[0].shape[1]))
    trainer(max_epochs=3, num_sanity_val_steps=0).fit(module, datamodule=Data())
    changed = {k for k, v in module.student.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"head.weight", "head.bias"}
    assert seen[0] == 6


def test_kd_cache_of_frozen_outputs_changes_nothing_but_the_cost(teacher_file) -> None:
    heads = []
    for cache in (True, False):
        torch.manual_seed(0)
        module = SMIDistillationModule(teacher="vit_tiny_patch16_224", teacher_kwargs=VIT,
                                       teacher_checkpoint=teacher_file, student="vit_tiny_patch16_224",
                                       student_kwargs=VIT, linear_probe=True, lr=0.5, cache_frozen_outputs=cache)
        calls: list[int] = []
        module.teacher.blocks[0].register_forward_pre_hook(lambda _m, _a, calls=calls: calls.append(1))
        trainer(max_epochs=3, num_sanity_val_steps=0, limit_val_batches=0).fit(module, datamodule=Data())
        heads.append((module.student.head.weight.detach().clone(), len(calls)))
    torch.testing.assert_close(heads[0][0], heads[1][0], rtol=1e-5, atol=1e-6)
    assert heads[0][1] == 4 and heads[1][1] == 12  # 4 batches: once in all vs once per epoch


def test_kd_flip_mirrors_images_with_their_patches_and_the_cache_keeps_both_orientations(teacher_file) -> None:
    heads = []
    for cache, flip in ((True, True), (False, True), (True, False)):
        torch.manual_seed(0)
        module = SMIDistillationModule(teacher="vit_tiny_patch16_224", teacher_kwargs=VIT,
                                       teacher_checkpoint=teacher_file, student="vit_tiny_patch16_224",
                                       student_kwargs=VIT, lr=0.5, cache_frozen_outputs=cache, flip=flip)
        trainer(max_epochs=3, num_sanity_val_steps=0, limit_val_batches=0).fit(module, datamodule=Data())
        heads.append(module.student.head.weight.detach().clone())
    torch.testing.assert_close(heads[0], heads[1], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(heads[0], heads[2])
    batch = next(iter(Data().train_dataloader()))
    flipped = module._flipped(batch, torch.arange(8) % 2 == 0)
    assert torch.equal(flipped["image"][0], batch["image"][0].flip(-1))
    assert torch.equal(flipped["image"][1], batch["image"][1])
    cols = batch["keep_index"][0] % 4
    assert torch.equal(flipped["keep_index"][0] % 4, 3 - cols)  # column c -> 3 - c on the 4 x 4 grid
    assert torch.equal(flipped["keep_index"][0] // 4, batch["keep_index"][0] // 4)
    assert torch.equal(flipped["keep_index"][1], batch["keep_index"][1])


def test_kd_moves_the_student_towards_the_teacher(teacher_file) -> None:
    module = SMIDistillationModule(teacher="vit_tiny_patch16_224", teacher_kwargs=VIT, teacher_checkpoint=teacher_file,
                                   student="vit_tiny_patch16_224", student_kwargs=VIT, linear_probe=False,
                                   temperature=4.0, lr=0.05, sparse_tokens=False)
    data = Data(keep=16)
    batch = next(iter(data.train_dataloader()))
    def kd_loss() -> float:
        with torch.no_grad():
            return kd_kl_div(module.student(batch["image"]), module.teacher(batch["image"]), 4.0).item()

    start = kd_loss()
    trainer(max_epochs=8, num_sanity_val_steps=0, limit_val_batches=0).fit(module, datamodule=data)
    assert kd_loss() < 0.5 * start


def test_downstream_modules_reject_bad_input(teacher_file, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="student_kwargs.num_classes"):
        SMIDistillationModule(teacher="vit_tiny_patch16_224", teacher_kwargs=VIT, teacher_checkpoint=teacher_file,
                              student="vit_tiny_patch16_224", student_kwargs={**VIT, "num_classes": 3},
                              linear_probe=False)  # a linear probe resets the head to the teacher's classes
    with pytest.raises(TypeError, match="model.init_args.teacher"):
        SMIDistillationModule(teacher="resnet10t", teacher_kwargs={"num_classes": 4},
                              student="resnet10t", student_kwargs={"num_classes": 4})
    with pytest.raises(TypeError, match="model.init_args.model"):
        SMIQuantizationModule("resnet10t", {"num_classes": 4})
    with pytest.raises(FileNotFoundError, match="model.init_args.checkpoint"):
        SMIQuantizationModule("vit_tiny_patch16_224", VIT, str(tmp_path / "nope.pth"))


def test_pool_batches_share_one_kept_count_and_cover_every_row() -> None:
    from datamodules.smi import _KeptCountBatchSampler

    counts = torch.tensor([3, 5, 3, 5, 5, 3, 3, 64])
    sampler = _KeptCountBatchSampler(counts, batch_size=2, seed=1)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(8))
    assert all(len(set(counts[b].tolist())) == 1 for b in batches)
    sampler.set_epoch(1)
    assert list(sampler) != batches  # reshuffled every epoch


def test_noise_and_real_pools_are_dense_and_sized_by_num_train() -> None:
    from datamodules.smi import SMIDataModule

    for source in ("noise", "real"):
        dm = SMIDataModule(dataset="digits", image_size=16, train_source=source, num_train=24, val_size=100,
                           test_size=100, patch_size=4)
        dm.setup()
        batch = next(iter(dm.train_dataloader()))
        assert len(dm.splits["train"]) == 24 and batch["keep_index"].shape == (24, 16)
        lo = (0 - dm.mean[0]) / dm.std[0]
        assert batch["image"].min() >= lo - 1e-6  # noise is clamped to the valid pixel range too
    with pytest.raises(ValueError, match="data.init_args.num_train"):
        SMIDataModule(dataset="digits", train_source="noise")
