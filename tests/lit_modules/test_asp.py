"""ASPModule and its parts: trainable set, prompt layout, KL, anchors, EMA, prototypes, sessions, resume."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from datamodules.class_incremental import ClassIncrementalStream
from lit_modules.asp import ASPModule
from lit_modules.asp_parts import (
    PromptEncoder,
    anchor_indices,
    anchor_loss,
    anchor_loss_per_copy,
    gaussian_kl,
)

KW = {"img_size": 8, "patch_size": 4, "in_chans": 1, "embed_dim": 16, "depth": 2, "num_heads": 2}


def stream(**kw) -> ClassIncrementalStream:
    args = {"classes_per_task": 2, "initial_classes": 4, "shots": 5, "epochs_per_task": [2, 1, 1, 1],
            "test_per_class": 20, "batch_size": 32, "eval_batch_size": 64, **kw}
    return ClassIncrementalStream("digits", **args)


def module(**kw) -> ASPModule:
    args = {"backbone_kwargs": KW, "num_classes": 10, "tip_tokens": 2, "tsp_tokens": 2, "encoder_hidden": 8,
            "plot": False, **kw}
    return ASPModule("vit_tiny_patch16_224", **args)


def trainer(root: Path, **kw) -> L.Trainer:
    args = {"accelerator": "cpu", "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
            "enable_model_summary": False, "num_sanity_val_steps": 0, "limit_train_batches": 3,
            "default_root_dir": str(root), **kw}
    return L.Trainer(**args)


@pytest.mark.parametrize("prompts, trainable", [
    ("asp", {"tip", "prompt_encoder", "classifier"}), ("vpt", {"tip", "classifier"}),
    ("l2p", {"pool", "classifier"}), ("none", {"classifier"})])
def test_only_the_prompts_their_encoder_and_the_classifier_train(prompts: str, trainable: set[str]) -> None:
    m = module(prompts=prompts)
    names = {n.removeprefix("net.").split(".")[0] for n, p in m.named_parameters() if p.requires_grad}
    assert names == trainable
    assert not any(p.requires_grad for p in m.net.vit.parameters())


@pytest.mark.parametrize("prompts, tokens", [("asp", 2 + 2), ("vpt", 2), ("l2p", 2 * 2), ("none", 0)])
def test_every_block_gets_its_prompt_tokens(prompts: str, tokens: int) -> None:
    m = module(prompts=prompts).eval()
    lengths = []
    hooks = [b.register_forward_pre_hook(lambda mod, args: lengths.append(args[0].shape[1])) for b in m.net.vit.blocks]
    m.net(torch.randn(3, 1, 8, 8))
    for h in hooks:
        h.remove()
    frozen_pass = [] if prompts in ("vpt", "none") else [5, 5]  # the encoder's f(x) runs unprompted first
    assert lengths == frozen_pass + [5 + tokens] * 2


def test_sigma_is_a_shifted_softplus_and_the_kl_is_the_closed_form() -> None:
    enc = PromptEncoder(dim=6, tokens=2, hidden=4)
    tip, feature = torch.randn(3, 6), torch.randn(5, 6)
    mu, sigma = enc(tip, feature)
    u = torch.cat([tip[None].expand(5, -1, -1), feature[:, None].expand(-1, 3, -1)], -1)
    assert mu.shape == (5, 3, 2, 6)
    assert torch.allclose(sigma, F.softplus(enc.f_sigma(u) - 5).view(5, 3, 2, 6))
    assert torch.allclose(mu, enc.f_mu(u).view(5, 3, 2, 6))
    normal = torch.distributions.Normal
    reference = torch.distributions.kl_divergence(normal(mu, sigma), normal(0.0, 1.0)).sum() / (5 * 3)
    assert torch.allclose(gaussian_kl(mu, sigma), reference, rtol=1e-5)


def test_anchor_is_the_example_closest_to_its_class_mean_and_the_losses_agree() -> None:
    features, labels = torch.randn(40, 5), torch.arange(40) % 4
    classes = torch.tensor([0, 1, 2, 3])
    means = torch.stack([features[labels == c].mean(0) for c in classes])
    index = anchor_indices(features, labels, classes, means)
    for c in classes:
        members = (labels == c).nonzero().squeeze(1)
        cosine = F.cosine_similarity(features[members], means[c][None], dim=-1)
        assert index[c] == members[cosine.argmax()]
    anchors = torch.randn(4, 5)
    batch, y = torch.randn(12, 5, requires_grad=True), torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 3, 3, 3, 1])
    naive = torch.stack([1 - F.cosine_similarity(batch[i], anchors[y[i]], dim=0) for i in range(12)]).mean()
    assert torch.allclose(anchor_loss(batch, anchors[y]), naive)
    # the release's per-copy form equals the per-class form when every copy of a class is the same anchor
    assert torch.allclose(anchor_loss_per_copy(batch, y, anchors[y]), naive)
    anchor_loss(batch, anchors[y].requires_grad_()).backward()
    assert batch.grad is not None


def test_evaluation_is_deterministic_and_training_perturbs_the_task_specific_prompts() -> None:
    m, images = module(), torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        m.net.prompt_encoder.f_mu[1].bias.add_(0.5)  # non-zero prompts, so the noise shows
        first, second = m.net(images)[0], m.net(images)[0]
        noisy = m.net(images, perturb=1.0)[0]
    assert torch.equal(first, second)
    assert not torch.allclose(first, noisy)


def test_a_session_updates_p_avg_by_ema_then_appends_mean_feature_prototypes() -> None:
    dm = stream()
    dm.setup("fit")
    m = module()
    m.task_classes, p0 = dm.task_classes(), torch.randn_like(m.net.p_avg)
    m.net.p_avg.copy_(p0)
    m.session.fill_(0)
    before = m.classifier.weight.detach().clone()
    data = dm._task_subset("train", 1)
    images = torch.stack([data[i]["image"] for i in range(len(data))])
    labels = torch.stack([data[i]["label"] for i in range(len(data))])
    with torch.no_grad():
        mu = m.net.prompt_encoder(m.net.tip[:, 0], m.net.frozen_features(images))[0]
    m._start_session(1, data)
    assert torch.allclose(m.net.p_avg, 0.99 * p0 + 0.01 * mu.mean(0), atol=1e-6)  # EMA
    with torch.no_grad():
        features = m.net(images)[0]  # with the updated p_avg
    for c in (4, 5):
        assert torch.allclose(m.classifier.weight[c], features[labels == c].mean(0), atol=1e-5)
    untouched = [c for c in range(10) if c not in (4, 5)]
    assert torch.equal(m.classifier.weight[untouched], before[untouched]) and int(m.session) == 1


def test_a_fit_runs_all_sessions_with_base_prototypes_and_logs_the_fscil_metrics(tmp_path: Path) -> None:
    L.seed_everything(0)
    dm, m = stream(), module(anchor_copies="per_sample", plot=True)
    base_check = _BasePrototypes(dm)
    t = trainer(tmp_path, callbacks=[base_check])
    t.fit(m, dm)
    assert int(m.session) == 3 and t.current_epoch == 5 and base_check.checked
    metrics = m.session_metrics()
    assert len(metrics["sessions"]) == 4
    logged = t.callback_metrics
    assert float(logged["val/acc_session_3"]) == pytest.approx(metrics["sessions"][-1])
    assert float(logged["val/avg_acc"]) == pytest.approx(metrics["avg"])
    assert {"val/pd", "val/hm", "train/anchor", "train/kl"} <= set(logged)
    assert (tmp_path / "acc_per_session.png").stat().st_size > 0  # the curve is drawn after the last session
    t.test(m, dm)
    assert float(t.callback_metrics["test/acc"]) == pytest.approx(metrics["sessions"][-1])


class _BasePrototypes(L.Callback):
    """When session 1 starts (callbacks run before the module's hook): base rows = base class means."""

    def __init__(self, dm: ClassIncrementalStream) -> None:
        self.dm, self.checked = dm, False

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: ASPModule) -> None:
        if trainer.current_epoch != 2:
            return
        images, labels, cls = pl_module._collect(self.dm._task_subset("train", 0))
        features = pl_module._features(images, cls)
        means = torch.stack([features[labels == c].mean(0) for c in range(4)])
        assert torch.allclose(pl_module.classifier.weight[:4], means, atol=1e-5) and int(pl_module.session) == 0
        self.checked = True


@pytest.mark.slow
def test_a_resume_between_sessions_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(root: Path, max_epochs: int | None = None, ckpt: str | None = None) -> ASPModule:
        L.seed_everything(0)
        m = module()
        # ModelCheckpoint saves only after optimizer steps: here after each base epoch
        saver = ModelCheckpoint(dirpath=root, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
        t = trainer(root, enable_checkpointing=True, callbacks=[saver], max_epochs=max_epochs)
        t.fit(m, stream(), ckpt_path=ckpt)
        t.save_checkpoint(root / "end.ckpt")
        return m

    whole = run(tmp_path / "whole")
    run(tmp_path / "part", max_epochs=3)  # base (2 epochs) + session 1, then stop
    for ckpt in ("epoch=1.ckpt", "end.ckpt"):  # after the base session; after session 1
        resumed = run(tmp_path / f"resumed_{ckpt}", ckpt=str(tmp_path / "part" / ckpt))
        assert int(resumed.session) == int(whole.session) == 3
        for a, b in ((resumed.net.p_avg, whole.net.p_avg), (resumed.classifier.weight, whole.classifier.weight),
                     (resumed.net.tip, whole.net.tip), (resumed.history["correct"], whole.history["correct"])):
            assert torch.allclose(a, b, atol=1e-6)


class _RankState(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_fit_end(self, trainer: L.Trainer, pl_module: ASPModule) -> None:
        torch.save({"p_avg": pl_module.net.p_avg.clone(), "weight": pl_module.classifier.weight.detach().clone()},
                   self.out / f"rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_ddp_ranks_hold_identical_prototypes_and_p_avg(tmp_path: Path) -> None:
    L.seed_everything(0)
    t = trainer(tmp_path, strategy="ddp_spawn", devices=2, callbacks=[_RankState(tmp_path)], limit_train_batches=2)
    t.fit(module(), stream())
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert torch.equal(ranks[0]["p_avg"], ranks[1]["p_avg"]) and ranks[0]["p_avg"].abs().sum() > 0
    assert torch.equal(ranks[0]["weight"], ranks[1]["weight"])


def test_bad_backbone_and_class_count_are_named(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="model.init_args.backbone"):
        ASPModule("resnet18", backbone_kwargs={"num_classes": 0})
    with pytest.raises(ValueError, match="model.init_args.num_classes=12"):
        trainer(tmp_path, fast_dev_run=True).fit(module(num_classes=12), stream())
