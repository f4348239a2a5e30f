"""TGR's core pieces against naive references: similarity, grouping, Fisher, inversion, ResNet zoo, combined zoos."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core.conv4 import Conv4
from core.model_zoo import ZooTeacher, combine_zoos, load_zoo, save_zoo
from core.resnet import ResNet
from core.stacked_resnet import StackedResNet
from core.task_embedding import batch_fisher, check_probe_labels, teacher_embedding
from core.task_similarity import (
    group_models,
    mean_within_group,
    normalised_cosine_similarity,
    pairwise_similarity_loop,
    stack_embeddings,
)
from core.teacher_inversion import fresh_generator, invert


def _embeddings(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"w": torch.rand(3, 4, generator=g) ** 3, "b": torch.rand(5, generator=g) ** 2} for _ in range(n)]


def test_similarity_matches_the_naive_formula_and_is_symmetric_with_unit_diagonal() -> None:
    embeddings = _embeddings(7)
    sim = normalised_cosine_similarity(*stack_embeddings(embeddings), block_elements=40)  # several row blocks
    i, j = 1, 4  # hand formula for one pair: the mean over tensors of cos(a / (a + b + eps), b / (a + b + eps))
    values = []
    for name in ("w", "b"):
        a, b = embeddings[i][name].flatten(), embeddings[j][name].flatten()
        an, bn = a / (a + b + 1e-6), b / (a + b + 1e-6)
        values.append((an @ bn) / (an.norm() * bn.norm()))
    assert sim[i, j] == pytest.approx(float(sum(values) / 2), abs=1e-6)
    torch.testing.assert_close(sim, pairwise_similarity_loop(embeddings), atol=1e-6, rtol=0)
    assert torch.equal(sim, sim.T) and torch.equal(sim.diagonal(), torch.ones(7))
    with pytest.raises(ValueError, match="other parameter tensors"):
        stack_embeddings([{"w": torch.ones(2)}, {"v": torch.ones(2)}])
    shuffled = [dict(reversed(list(e.items()))) for e in embeddings]  # a cached file comes back in sorted order
    torch.testing.assert_close(normalised_cosine_similarity(*stack_embeddings(embeddings[:1] + shuffled[1:])), sim)


def _three_types(n: int = 12) -> torch.Tensor:
    """S of three model types: members of a type are alike (about 0.8), across types unlike (about 0.2)."""
    kind = torch.arange(n) % 3
    noise = 0.05 * torch.rand(n, n, generator=torch.Generator().manual_seed(0))
    sim = torch.where(kind[:, None] == kind[None], 0.8, 0.2) + noise
    return ((sim + sim.T) / 2).fill_diagonal_(1.0)


def test_heterogeneous_groups_are_less_alike_than_homogeneous_ones() -> None:
    sim = _three_types()
    hetero = group_models(sim, 3, "heterogeneous")
    homo = group_models(sim, 3, "homogeneous")
    assert sorted(map(sorted, homo)) == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]]  # the types
    assert mean_within_group(sim, hetero) < 0.4 < 0.8 < mean_within_group(sim, homo)
    assert sorted(m for g in hetero for m in g) == list(range(12))
    rand = group_models(sim, 3, "random", seed=1)
    assert sorted(m for g in rand for m in g) == list(range(12)) and rand == group_models(sim, 3, "random", seed=1)
    with pytest.raises(ValueError, match="n_groups=13 but the zoo has 12 teachers"):
        group_models(sim, 13)


def test_batch_fisher_is_the_mean_of_squared_batch_gradients() -> None:
    torch.manual_seed(0)
    probe = Conv4(1, 3, 4, 16)
    x, y = torch.rand(12, 1, 16, 16), torch.randint(0, 4, (12,))
    g = torch.Generator().manual_seed(3)
    order = torch.randperm(12, generator=torch.Generator().manual_seed(3))
    fisher = batch_fisher(probe, x, y, batch_size=5, generator=g)
    net = copy.deepcopy(probe).train()
    expected = {k: torch.zeros_like(p) for k, p in net.named_parameters()}
    for idx in order.split(5):  # batches of 5, 5, 2 in the same shuffled order
        net.zero_grad()
        F.cross_entropy(net(x[idx]), y[idx]).backward()
        for k, p in net.named_parameters():
            expected[k] += p.grad.square() / 3
    for k in expected:
        torch.testing.assert_close(fisher[k], expected[k])
    assert torch.equal(probe.blocks[0].bn.running_mean, torch.zeros(3))  # the probe itself is untouched


def test_per_sample_fisher_matches_a_loop_over_examples_with_the_fitted_head() -> None:
    torch.manual_seed(0)
    probe = Conv4(1, 3, 2, 16)
    x, y = torch.rand(6, 1, 16, 16), torch.randint(0, 3, (6,))  # three labels: needs a fitted 3-way head
    torch.manual_seed(1)
    fisher = teacher_embedding(probe, x, y, "per_sample")
    from core.task_embedding import fit_head

    torch.manual_seed(1)
    net = fit_head(probe, x, y)
    torch.func.replace_all_batch_norm_modules_(net)
    net.train()
    expected = {k: torch.zeros_like(p) for k, p in net.named_parameters()}
    for i in range(6):  # one example at a time: its own BatchNorm statistics, as the vectorised estimator
        net.zero_grad()
        (-net(x[i:i + 1]).log_softmax(-1)[0, y[i]]).backward()
        for k, p in net.named_parameters():
            expected[k] += p.grad.square() / 6
    for k in expected:
        torch.testing.assert_close(fisher[k], expected[k], atol=1e-6, rtol=1e-4)


def test_a_probe_head_narrower_than_the_teacher_labels_is_refused() -> None:
    with pytest.raises(ValueError, match="probe's head has 2 outputs but the teachers have 5 classes"):
        check_probe_labels(Conv4(1, 3, 2, 16), 5)


def test_inversion_keeps_the_images_of_the_lowest_loss_step() -> None:
    gen = fresh_generator(8, 4, 16, 1, torch.Generator().manual_seed(0))
    target = torch.rand(1, 1, 16, 16)
    seen = []

    def loss_fn(images: torch.Tensor) -> torch.Tensor:
        loss = (images - target).square().mean() + 0.3 * torch.rand(()).item()  # a noisy, non-monotone loss
        seen.append((float(loss.detach()), images.detach().clone()))
        return loss

    torch.manual_seed(0)
    best, best_loss = invert(gen, torch.randn(4, 8), loss_fn, steps=6, lr=1e-2)
    value, images = min(seen, key=lambda s: s[0])
    assert float(best_loss) == pytest.approx(value) and torch.equal(best, images)


@pytest.mark.parametrize("arch", ["resnet10", "resnet18"])
def test_stacked_resnet_exports_plain_resnets_with_their_own_statistics(arch: str) -> None:
    torch.manual_seed(0)
    stacked = StackedResNet(3, arch, 1, 5, 16, width=4)
    x = torch.rand(3, 6, 1, 16, 16)
    out = stacked.train()(x)  # also updates every network's running statistics
    out_eval = stacked.eval()(x)
    for i in range(3):
        for mode, expected in ((True, out[i]), (False, out_eval[i])):
            plain = ResNet(**stacked.arch_kwargs())
            plain.load_state_dict(stacked.export(i))
            torch.testing.assert_close(plain.train(mode)(x[i]), expected, atol=1e-5, rtol=1e-4)


def _zoo(folder: Path, source: str, n_classes: int, classes: list[list[int]], arch: str = "conv4") -> Path:
    kwargs = {"in_channels": 1, "hidden": 2, "num_classes": 2, "image_size": 16} if arch == "conv4" else \
        {"arch": arch, "in_channels": 1, "num_classes": 2, "image_size": 16, "width": 2}
    net = Conv4(**kwargs) if arch == "conv4" else ResNet(**kwargs)
    teachers = [ZooTeacher("", arch, kwargs, classes=c) for c in classes]
    meta = {"source": source, "n_classes": n_classes, "class_names": [str(k) for k in range(n_classes)]}
    return save_zoo(folder, [net.state_dict() for _ in classes], teachers, meta)


def test_combined_zoos_keep_each_domains_classes_apart(tmp_path: Path) -> None:
    a = _zoo(tmp_path / "a", "glyphs", 6, [[0, 1], [4, 5]])
    b = _zoo(tmp_path / "b", "digits", 5, [[0, 1]])
    c = _zoo(tmp_path / "c", "glyphs", 6, [[0, 2]], arch="resnet10")  # same domain as a: same class ids
    models, records, meta = load_zoo(combine_zoos([a, b, c], tmp_path / "all"))
    assert [r.classes for r in records] == [[0, 1], [4, 5], [6, 7], [0, 2]]
    assert [r.domain for r in records] == ["glyphs", "glyphs", "digits", "glyphs"]
    assert meta["n_classes"] == 11 and meta["class_names"][6] == "digits:0"
    assert isinstance(models[3], ResNet) and isinstance(models[0], nn.Module)
