"""Fisher estimators against naive per-example loops; CL metrics on a hand-made matrix; batched augmentation."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core.continual_metrics import save_accuracy_heatmap, stream_metrics
from core.fisher import DiagonalFisher, dataset_fisher
from core.rng import keyed_generator, keyed_seed
from core.tensor_augment import random_crop_flip


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(12, 4))


def naive_fisher(model: nn.Module, x: torch.Tensor, y: torch.Tensor, variant: str, train_bn: bool) -> dict:
    """One example at a time, plain backward (BatchNorm on a copy, in train mode: batch of one)."""
    net = copy.deepcopy(model).train(train_bn)
    total = {n: torch.zeros_like(p) for n, p in net.named_parameters()}
    for i in range(len(x)):
        log_p = net(x[i : i + 1]).log_softmax(-1)[0]
        labels = range(log_p.numel()) if variant == "exact" else [int(y[i])]
        for c in labels:
            net.zero_grad()
            log_p[c].backward(retain_graph=True)
            weight = 1.0 if variant == "empirical" else log_p[c].exp().item()
            for n, p in net.named_parameters():
                total[n] += weight * p.grad.square()
    return {n: t / len(x) for n, t in total.items()}


@pytest.mark.parametrize("variant", ["mammoth", "empirical", "exact"])
@pytest.mark.parametrize("bn_mode", ["train", "eval"])
def test_fisher_matches_a_per_example_loop(variant: str, bn_mode: str) -> None:
    model = small_net()
    model[1].running_mean.uniform_(-0.5, 0.5)  # eval mode must use these
    running = model[1].running_mean.clone()
    x, y = torch.randn(6, 1, 5, 5, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 3, 0, 1])
    estimate = DiagonalFisher(model, variant, bn_mode, chunk_size=4)
    estimate.update(x[:4], y[:4])
    estimate.update(x[4:], y[4:])
    got, want = estimate.mean(), naive_fisher(model, x, y, variant, bn_mode == "train")
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-7)
    assert torch.equal(model[1].running_mean, running)  # the model itself is untouched


def test_exact_fisher_sums_the_classes_one_at_a_time_above_the_jacobian_budget() -> None:
    model = small_net()
    x, y = torch.randn(5, 1, 5, 5, generator=torch.Generator().manual_seed(2)), torch.tensor([0, 1, 2, 3, 0])
    chunked = DiagonalFisher(model, "exact", "eval", chunk_size=2, max_jacobian_bytes=0)
    chunked.update(x, y)
    want = naive_fisher(model, x, y, "exact", False)
    for name, value in chunked.mean().items():
        torch.testing.assert_close(value, want[name], rtol=1e-4, atol=1e-7)


def test_dataset_fisher_shards_and_reduces_like_one_process() -> None:
    model = small_net()
    data = [{"image": torch.randn(1, 5, 5, generator=torch.Generator().manual_seed(i)), "label": torch.tensor(i % 4)}
            for i in range(10)]
    examples = lambda b: (b["image"], b["label"])  # noqa: E731
    whole = dataset_fisher(model, data, examples, lambda t: t, batch_size=3)
    # two "ranks" whose sums are added by a fake all-reduce give the same mean
    shards = [dataset_fisher(model, data, examples, lambda t: t, rank=r, world_size=2, batch_size=3)
              for r in range(2)]
    for name in whole:
        torch.testing.assert_close((shards[0][name] * 5 + shards[1][name] * 5) / 10, whole[name])
    xs, ys = torch.stack([d["image"] for d in data]), torch.stack([d["label"] for d in data])
    reference = naive_fisher(model, xs, ys, "mammoth", train_bn=True)
    for name in whole:
        torch.testing.assert_close(whole[name], reference[name], rtol=1e-4, atol=1e-7)


def test_stream_metrics_follow_mammoth_formulas() -> None:
    a = torch.tensor([[0.9, 0.1, 0.0], [0.6, 0.8, 0.2], [0.5, 0.7, 0.9]])
    r = torch.tensor([0.3, 0.1, 0.25])
    m = stream_metrics(a, r)
    assert m["final_avg_acc"] == pytest.approx((0.5 + 0.7 + 0.9) / 3)
    assert m["bwt"] == pytest.approx(((0.5 - 0.9) + (0.7 - 0.8)) / 2)
    assert m["forgetting"] == pytest.approx(((0.9 - 0.5) + (0.8 - 0.7)) / 2)
    assert m["fwt"] == pytest.approx(((0.1 - 0.1) + (0.2 - 0.25)) / 2)
    assert m["avg_incremental_acc"] == pytest.approx((0.9 + 0.7 + 0.7) / 3)
    # forgetting takes the best accuracy *after* learning the task: a high pre-training value does not count
    b = torch.tensor([[0.5, 0.95], [0.4, 0.6]])
    assert stream_metrics(b)["forgetting"] == pytest.approx(0.1)
    assert set(stream_metrics(a[:1, :1])) == {"final_avg_acc", "avg_incremental_acc"}
    with pytest.raises(ValueError, match="square"):
        stream_metrics(a[:2])


def test_heatmap_is_written(tmp_path) -> None:
    png = save_accuracy_heatmap(torch.eye(3), tmp_path / "sub" / "m.png", "title")
    assert png.read_bytes()[:4] == b"\x89PNG" and not list(tmp_path.rglob("*.tmp.png"))


def test_crop_flip_matches_a_per_image_reference() -> None:
    images = torch.arange(2 * 2 * 4 * 5, dtype=torch.float32).view(2, 2, 4, 5)
    out = random_crop_flip(images, 2, True, keyed_generator(0))
    gen = keyed_generator(0)
    offsets = torch.randint(0, 5, (2, 2), generator=gen)
    mirrored = torch.rand(2, generator=gen) < 0.5
    for b in range(2):
        padded = F.pad(images[b], (2, 2, 2, 2))
        source = padded.flip(-1) if mirrored[b] else padded
        dx = offsets[1, b] if not mirrored[b] else 4 - offsets[1, b]
        want = source[:, offsets[0, b] : offsets[0, b] + 4, dx : dx + 5]
        assert torch.equal(out[b], want)
    assert random_crop_flip(images, 0, False, keyed_generator(0)) is images


def test_keyed_generators_are_pure_functions_of_their_keys() -> None:
    assert keyed_seed(1, 2) == keyed_seed(1, 2) != keyed_seed(2, 1)
    a = torch.rand(3, generator=keyed_generator(5, 7))
    assert torch.equal(a, torch.rand(3, generator=keyed_generator(5, 7)))
