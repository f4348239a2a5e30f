"""SurgeryModule / AdaMergingModule / ExpertModule: step-0 identity, V2 reference forward, caching, bounds, DDP,
resume, bad input."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import timm
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import CombinedLoader
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from core import merging
from core.timm_models import export_weights
from datamodules.surgery import TaskDataset
from lit_modules.surgery import SurgeryModule
from lit_modules.surgery_adamerging import AdaMergingModule
from lit_modules.surgery_expert import ExpertModule
from lit_modules.surgery_parts import FeatureCache, prototype_head

VIT = {"img_size": 16, "patch_size": 8, "in_chans": 1, "num_classes": 12, "embed_dim": 24, "depth": 2, "num_heads": 2}
TASKS = {"a": 3, "b": 4}


def make_files(root: Path, vit: dict = VIT) -> dict:
    """theta_0, two experts (theta_0 + noise) with random heads, as the expert stage writes them."""
    torch.manual_seed(0)
    base = timm.create_model("vit_tiny_patch16_224", **vit)
    export_weights(base, root / "pre.safetensors")
    experts = {}
    for task, classes in TASKS.items():
        state = {k: v + 0.05 * torch.randn_like(v) for k, v in base.state_dict().items()}
        save_file(state, str(root / f"{task}.safetensors"))
        save_file({"weight": 10 * torch.randn(classes, vit["num_classes"])}, str(root / f"{task}.head.safetensors"))
        experts[task] = str(root / f"{task}.safetensors")
    return {"model": "vit_tiny_patch16_224", "model_kwargs": vit, "pretrained_checkpoint": str(root / "pre.safetensors"),
            "experts": experts}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return make_files(tmp_path_factory.mktemp("surgery"))


def loaders(batch: int, n: int = 8, labelled: bool = False) -> CombinedLoader:
    gen = torch.Generator().manual_seed(1)
    sets = {t: TaskDataset(t, torch.randn(n, 1, 16, 16, generator=gen), torch.arange(n) % c, labelled) for t, c in TASKS.items()}
    return CombinedLoader({t: DataLoader(d, batch_size=batch) for t, d in sets.items()}, mode="max_size_cycle")


def fit(module: L.LightningModule, steps: int, batch: int = 4, n: int = 8, **kwargs) -> L.Trainer:
    trainer = L.Trainer(max_steps=steps, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                        enable_model_summary=False, accelerator="cpu", limit_val_batches=0, **kwargs)
    trainer.fit(module, train_dataloaders=loaders(batch, n))
    return trainer


def surgery_params(module: SurgeryModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.surgery.state_dict().items()}


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("merge", ["weight_average", "task_arithmetic", "ties"])
def test_step_zero_equals_the_plain_merge(files: dict, version: str, merge: str) -> None:
    module = SurgeryModule(**files, merge=merge, version=version, rank=4).eval()
    pre = module.experts[0].state_dict()  # any; rebuild the expected merge from the files
    from core.timm_models import load_state_dict

    base = load_state_dict(files["pretrained_checkpoint"])
    experts = [load_state_dict(p) for p in files["experts"].values()]
    expected = {"weight_average": lambda: merging.weight_average(experts),
                "task_arithmetic": lambda: merging.task_arithmetic(base, experts, 0.3),
                "ties": lambda: merging.ties_merging(base, experts, 0.2, 0.3)}[merge]()
    assert all(torch.equal(module.merged.state_dict()[k], expected[k]) for k in pre)
    x = torch.randn(5, 1, 16, 16)
    for task in TASKS:
        plain = F.normalize(module.merged(x), dim=-1) @ module.heads.weight(task).T
        assert torch.equal(module(x, task), plain)


@pytest.mark.parametrize("depth,width", [(2, 24), (3, 32)])
def test_v2_matches_a_hand_written_forward_on_vits_of_any_depth_and_width(tmp_path, depth, width) -> None:
    files = make_files(tmp_path, {**VIT, "depth": depth, "embed_dim": width})
    module = SurgeryModule(**files, version="v2", rank=3).eval()
    assert [len(m) for m in module.surgery.values()] == [depth + 1] * 2
    assert [m.down.in_features for m in module.surgery["a"]] == [width] * depth + [12]
    for p in module.surgery.parameters():
        torch.nn.init.normal_(p)
    x, vit, adapters = torch.randn(3, 1, 16, 16), module.merged, module.surgery["b"]
    h = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
    for block, phi in zip(vit.blocks, adapters):
        h = block(h)
        h = h - phi.up(F.relu(phi.down(h)))
    z = vit.forward_head(vit.norm(h))
    z = z - adapters[-1].up(F.relu(adapters[-1].down(z)))
    torch.testing.assert_close(module(x, "b"), F.normalize(z, dim=-1) @ module.heads.weight("b").T)
    assert all(not b._forward_hooks for b in vit.blocks)
    assert not any(k.startswith("blocks.") for k in module.state_dict())  # the merged blocks are saved once


def test_v2_loss_targets_are_token_means_after_every_block_plus_the_output(files) -> None:
    """Eq. (S5) by hand: sum over blocks of L1(token mean of corrected h_b, expert's) + L1 at the output."""
    module = SurgeryModule(**files, version="v2", rank=3, cache_features=False)
    for p in module.surgery.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(4, 1, 16, 16)

    def forward(vit, adapters):
        h, means = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x)))), []
        for i, block in enumerate(vit.blocks):
            h = block(h)
            if adapters is not None:
                h = h - adapters[i].up(F.relu(adapters[i].down(h)))
            means.append(h.mean(1))  # over every token, the class token included
        z = vit.forward_head(vit.norm(h))
        return means, (z if adapters is None else z - adapters[-1].up(F.relu(adapters[-1].down(z))))

    target_means, target_z = forward(module.experts[1], None)
    means, z = forward(module.merged, module.surgery["b"])
    expected = sum((m - t).abs().mean() for m, t in zip(means, target_means)) + (z - target_z).abs().mean()
    got = module._loss("b", {"image": x, "index": torch.arange(4)})
    torch.testing.assert_close(got, expected)
    assert len(means) == VIT["depth"]


def test_orthogonal_prototype_head_is_the_nearest_orthonormal_set_to_the_class_means() -> None:
    gen = torch.Generator().manual_seed(0)
    common = torch.randn(16, generator=gen)
    labels = torch.arange(60) % 5
    features = common + 0.05 * torch.randn(60, 16, generator=gen) + 0.05 * F.one_hot(labels, 16)  # nearly parallel
    plain = prototype_head(features, labels, 5, 100.0) / 100
    ortho = prototype_head(features, labels, 5, 100.0, orthogonal=True) / 100
    assert (plain @ plain.T - torch.eye(5)).max() > 0.9
    torch.testing.assert_close(ortho @ ortho.T, torch.eye(5), atol=1e-5, rtol=0)
    m = plain.double()
    vals, vecs = torch.linalg.eigh(m @ m.T)  # naive reference: (M M^T)^(-1/2) M, in float64
    torch.testing.assert_close(ortho.double(), vecs @ torch.diag(vals.rsqrt()) @ vecs.T @ m, atol=2e-3, rtol=0)
    with pytest.raises(ValueError, match="num_classes <= the representation width 16"):
        prototype_head(torch.randn(40, 16), torch.arange(40) % 20, 20, orthogonal=True)


def test_representation_report_levels_and_accuracies(files) -> None:
    module = SurgeryModule(**files, version="v1", rank=3).eval()
    for p in module.surgery.parameters():
        torch.nn.init.normal_(p)
    gen = torch.Generator().manual_seed(4)
    data = [DataLoader(TaskDataset(t, torch.randn(6, 1, 16, 16, generator=gen), torch.arange(6) % c), batch_size=4)
            for t, c in TASKS.items()]
    report = module.representation_report(data)
    for task, r in report.items():
        assert len(r["plain"]["bias"]) == VIT["depth"] + 1 and all(b == 0 for b in r["expert"]["bias"])
        assert r["corrected"]["bias"][:-1] == r["plain"]["bias"][:-1]  # V1 leaves the blocks alone
        assert r["corrected"]["bias"][-1] != r["plain"]["bias"][-1]
        images, labels = data[list(TASKS).index(task)].dataset.images, data[list(TASKS).index(task)].dataset.labels
        with torch.no_grad():
            acc = (module(images, task).argmax(-1) == labels).float().mean().item()
            z, zt = module.merged(images), module.experts[list(TASKS).index(task)](images)
        assert r["corrected"]["acc"] == pytest.approx(acc)
        assert r["plain"]["bias"][-1] == pytest.approx((z - zt).abs().mean().item(), rel=1e-5)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_surgery_reduces_the_representation_gap_and_freezes_the_merge(files, version) -> None:
    module = SurgeryModule(**files, version=version, rank=4, lr=0.01)
    frozen = {k: v.clone() for k, v in module.merged.state_dict().items()}
    batch = next(iter(loaders(8)))[0]
    before = sum(module._loss(t, b) for t, b in batch.items()).item()
    fit(module, steps=80, batch=8)
    after = sum(module._loss(t, b) for t, b in batch.items()).item()
    assert after < 0.8 * before
    assert all(torch.equal(module.merged.state_dict()[k], v) for k, v in frozen.items())


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_cached_equals_uncached_step_for_step(files, version) -> None:
    results = []
    for cache in (True, False):
        torch.manual_seed(3)
        module = SurgeryModule(**files, version=version, rank=4, cache_features=cache)
        fit(module, steps=12)
        results.append(surgery_params(module))
    assert results[0].keys() == results[1].keys()
    for k in results[0]:
        torch.testing.assert_close(results[0][k], results[1][k])


def test_feature_cache_computes_each_index_once_and_returns_exact_outputs() -> None:
    images, calls = torch.randn(10, 3), []

    def compute(x: torch.Tensor) -> list[torch.Tensor]:
        calls.append(len(x))
        return [x * 2, x.sum(1)]

    cache = FeatureCache()
    for ids in ([3, 1], [1, 7, 0], [9, 3, 7], [0, 1, 3]):  # growing indices, repeats, a fully cached batch
        index = torch.tensor(ids)
        got = cache(index, images[index], compute)
        assert torch.equal(got[0], images[index] * 2) and torch.equal(got[1], images[index].sum(1))
    assert calls == [2, 2, 1]


@pytest.mark.slow
def test_ddp_spawn_training_equals_single_process(files) -> None:
    """2 processes with batch 2 each == 1 process with batch 4 on the same images (mean L1 is additive).

    Each task has 4 images, so every step sees all of them whatever order DistributedSampler picks.
    """
    results = []
    for devices, batch, strategy in ((1, 4, "auto"), (2, 2, "ddp_spawn")):
        torch.manual_seed(5)
        module = SurgeryModule(**files, version="v2", rank=4, lr=0.01)
        fit(module, steps=6, batch=batch, n=4, devices=devices, strategy=strategy)
        results.append(surgery_params(module))
    assert any(v.abs().sum() > 0 for k, v in results[0].items() if "up" in k)  # it trained
    for k in results[0]:
        torch.testing.assert_close(results[0][k], results[1][k], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_ddp_spawn_validation_reports_every_rank(files) -> None:
    """The bias and accuracies of 2 processes (2 images each) equal 1 process's on all 4 images."""
    gen = torch.Generator().manual_seed(2)
    sets = [TaskDataset(t, torch.randn(4, 1, 16, 16, generator=gen), torch.arange(4) % c) for t, c in TASKS.items()]
    results = []
    for devices, strategy in ((1, "auto"), (2, "ddp_spawn")):
        trainer = L.Trainer(devices=devices, strategy=strategy, accelerator="cpu", logger=False,
                            enable_progress_bar=False, enable_model_summary=False)
        module = SurgeryModule(**files, version="v1", rank=2)
        results.append(trainer.validate(module, dataloaders=[DataLoader(d, batch_size=2) for d in sets], verbose=False))
    assert set(results[0][0]) >= {"val/bias_a", "val/acc_a", "val/acc"}
    for single, multi in zip(*results, strict=True):
        assert single.keys() == multi.keys()
        for key in single:
            torch.testing.assert_close(multi[key], single[key])


def test_adamerging_clamps_raw_coefficients_where_used_and_exports_that_merge(files, tmp_path) -> None:
    module = AdaMergingModule(**files, granularity="layer", lr=0.5, export_path=str(tmp_path / "m.safetensors"))
    assert module.coefficients.shape == (2, len(module.layers)) and torch.all(module.coefficients == 0.3)
    fit(module, steps=10)
    raw = module.coefficients.detach()
    assert (raw < 0).any() or (raw > 1).any()  # lr 0.5 pushes some raw coefficients out of [0, 1] ...
    lam = raw.clamp(0, 1)
    assert torch.equal(module.lambdas(), lam) and not torch.allclose(lam, torch.full_like(lam, 0.3))
    from safetensors.torch import load_file

    from core.timm_models import load_state_dict

    base = load_state_dict(files["pretrained_checkpoint"])
    taus = [merging.task_vector(load_state_dict(p), base) for p in files["experts"].values()]
    exported = load_file(str(tmp_path / "m.safetensors"))  # ... and the exported merge uses the clamped ones
    expected, unclamped = merging.combine(base, taus, lam), merging.combine(base, taus, raw)
    for k in exported:
        torch.testing.assert_close(exported[k], expected[k])
    assert any(not torch.allclose(exported[k], unclamped[k]) for k in taus[0])
    assert torch.equal(load_file(str(tmp_path / "m.coefficients.safetensors"))["lambdas"], lam)
    task_wise = AdaMergingModule(**files, granularity="task", init=0.4)
    ta = merging.task_arithmetic(base, [load_state_dict(p) for p in files["experts"].values()], 0.4)
    got = task_wise.merged_encoder().state_dict()
    for k in ta:
        torch.testing.assert_close(got[k], ta[k])


def test_adamerging_keeps_task_vectors_out_of_buffers_and_moves_them_with_the_module(files) -> None:
    module = AdaMergingModule(**files, granularity="task")
    encoder_size = sum(p.numel() for p in module.encoder.parameters())
    assert sum(b.numel() for b in module.buffers()) < encoder_size / 10  # only the small heads: nothing DDP broadcasts
    assert sum(t.numel() for t in module.taus) == len(TASKS) * encoder_size
    module.double()
    assert all(t.dtype == torch.float64 for t in module.taus)


class SameOnEveryRank(L.Callback):
    """Fails the run if the trained coefficients differ between ranks at the end."""

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        local = module.coefficients.detach()
        gathered = module.all_gather(local).reshape(trainer.world_size, *local.shape)
        assert all(torch.equal(g, local) for g in gathered), "coefficients differ across ranks"


@pytest.mark.slow
def test_adamerging_under_ddp_equals_one_process_and_agrees_across_ranks(files) -> None:
    results = []
    for devices, batch, strategy in ((1, 4, "auto"), (2, 2, "ddp_spawn")):
        module = AdaMergingModule(**files, granularity="layer", lr=0.05)
        fit(module, steps=4, batch=batch, n=4, devices=devices, strategy=strategy, callbacks=[SameOnEveryRank()])
        results.append(module.coefficients.detach().clone())
    assert not torch.allclose(results[0], torch.full_like(results[0], 0.3))
    torch.testing.assert_close(results[0], results[1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("cls", [SurgeryModule, AdaMergingModule])
def test_checkpoints_hold_only_the_trained_parameters_and_resume(files, tmp_path, cls) -> None:
    module = cls(**files, lr=0.01)
    trained = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    path = tmp_path / "m.ckpt"
    fit(module, steps=2).save_checkpoint(path)
    saved = torch.load(path, weights_only=True)["state_dict"]
    assert saved.keys() == trained.keys() and not any(torch.equal(saved[k], v) for k, v in trained.items())
    loaded = cls.load_from_checkpoint(path)
    for key, value in module.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)
    resumed = cls(**files, lr=0.01)
    trainer = L.Trainer(max_steps=3, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                        enable_model_summary=False, accelerator="cpu", limit_val_batches=0)
    trainer.fit(resumed, train_dataloaders=loaders(4), ckpt_path=path)
    assert trainer.global_step == 3


def test_resumed_surgery_equals_an_uninterrupted_run_and_refuses_other_towers(files, tmp_path) -> None:
    """Resumed from the step-2 checkpoint (an epoch boundary: these loaders are not resumable mid-epoch)."""
    def run(steps: int, ckpt: Path | None = None, **override) -> SurgeryModule:
        torch.manual_seed(7)
        module = SurgeryModule(**{**files, **override}, version="v2", rank=3, lr=0.01)
        saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
        trainer = L.Trainer(max_steps=steps, logger=False, enable_progress_bar=False, callbacks=[saver],
                            enable_model_summary=False, accelerator="cpu", limit_val_batches=0, default_root_dir=tmp_path)
        trainer.fit(module, train_dataloaders=loaders(4), ckpt_path=ckpt)
        return module

    full = run(6)
    resumed = run(6, tmp_path / "epoch=0-step=2.ckpt")
    assert resumed.trainer.global_step == 6
    for k, v in surgery_params(full).items():
        torch.testing.assert_close(surgery_params(resumed)[k], v, rtol=0, atol=0)
    torch.manual_seed(1)  # an expert of the same shapes with other weights
    state = {k: v + 0.1 for k, v in timm.create_model("vit_tiny_patch16_224", **VIT).state_dict().items()}
    save_file(state, str(tmp_path / "a2.safetensors"))
    save_file({"weight": torch.randn(3, 12)}, str(tmp_path / "a2.head.safetensors"))
    with pytest.raises(ValueError, match="model.init_args.experts.a: the weights differ"):
        run(6, tmp_path / "epoch=0-step=2.ckpt", experts={**files["experts"], "a": str(tmp_path / "a2.safetensors")})


def test_resumed_expert_keeps_the_prototype_head_of_theta_0(tmp_path) -> None:
    """The frozen head is built once from theta_0; resuming must not rebuild it from the half-tuned encoder."""
    gen = torch.Generator().manual_seed(0)
    data = DataLoader(TaskDataset("a", torch.randn(16, 1, 16, 16, generator=gen), torch.arange(16) % 3), batch_size=8)

    def run(ckpt_path: str | None) -> ExpertModule:
        torch.manual_seed(0)
        module = ExpertModule("vit_tiny_patch16_224", VIT, num_classes=3, head="prototype", lr=0.01)
        saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
        trainer = L.Trainer(max_steps=4, logger=False, enable_progress_bar=False, enable_model_summary=False,
                            accelerator="cpu", callbacks=[saver], default_root_dir=tmp_path)
        trainer.fit(module, train_dataloaders=data, ckpt_path=ckpt_path)
        return module

    head = run(None).head.weight.clone()
    resumed = run(str(tmp_path / "epoch=0-step=2.ckpt"))
    assert resumed.trainer.global_step == 4
    assert torch.equal(resumed.head.weight, head)


def test_bad_input_names_the_config_key(files, tmp_path) -> None:
    bad_shape = make_files(tmp_path, {**VIT, "embed_dim": 32})
    with pytest.raises(ValueError, match=r"model.init_args.experts.a: .* has shape"):
        SurgeryModule(**{**files, "experts": {"a": bad_shape["experts"]["a"]}})
    state = timm.create_model("vit_tiny_patch16_224", **VIT).state_dict()
    state.pop("cls_token")
    save_file(state, str(tmp_path / "c.safetensors"))
    with pytest.raises(ValueError, match=r"model.init_args.experts.c: keys differ .*cls_token"):
        SurgeryModule(**{**files, "experts": {"c": str(tmp_path / "c.safetensors")}})
    with pytest.raises(ValueError, match="model.init_args.experts is empty"):
        AdaMergingModule(**{**files, "experts": {}})
    with pytest.raises(FileNotFoundError, match="model.init_args.heads.a: no file"):
        SurgeryModule(**{**files, "heads": {"a": str(tmp_path / "missing.safetensors")}})
    module = SurgeryModule(**files, version="v1", rank=2)
    batch = next(iter(loaders(2)))[0]
    with pytest.raises(ValueError, match="task 'zzz' has no expert/head"):
        module._loss("zzz", batch["a"])
    with pytest.raises(ValueError, match="task 'zzz' has no expert/head: add it to model.init_args.experts"):
        module(torch.randn(1, 1, 16, 16), "zzz")
    with pytest.raises(ValueError, match="task 'zzz' has no head"):
        module.heads(torch.randn(1, 12), "zzz")
    with pytest.raises(ValueError, match="task 'empty' has no images"):
        TaskDataset("empty", torch.zeros(0, 1, 16, 16), torch.zeros(0))
    with pytest.raises(ValueError, match="merged_checkpoint is required"):
        SurgeryModule(**files, merge="checkpoint")
