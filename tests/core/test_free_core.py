"""FREE's core pieces: stacked zoo, zoo files, generator adaptation, pool, functional MAML, losses."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.func import functional_call

from core.conv4 import Conv4
from core.dfml_losses import distill, hard_sample_loss
from core.episodes import mean_ci95
from core.maml import adapt, maml_accuracy, maml_query, protonet_accuracy, transductive
from core.meta_generator import Generator, adapt_generator
from core.model_zoo import ZooTeacher, load_zoo, save_zoo
from core.stacked_conv4 import StackedConv4
from core.task_pool import TaskPool


@pytest.mark.parametrize("train", [True, False])
def test_stacked_forward_of_teacher_i_equals_conv4_with_its_exported_weights(train: bool) -> None:
    torch.manual_seed(0)
    zoo = StackedConv4(3, 1, 8, 5, 16)
    zoo(torch.rand(3, 16, 1, 16, 16))  # move the running statistics away from their init
    zoo.train(train)
    x = torch.rand(3, 6, 1, 16, 16)
    out = zoo(x)
    for i in range(3):
        net = Conv4(1, 8, 5, 16)
        net.load_state_dict(zoo.export(i))  # strict: the exported keys are exactly Conv4's
        torch.testing.assert_close(net.train(train)(x[i]), out[i], atol=1e-5, rtol=1e-4)


def test_stacked_gradients_are_per_teacher() -> None:
    torch.manual_seed(0)
    zoo = StackedConv4(2, 1, 4, 3, 16)
    x = torch.rand(2, 5, 1, 16, 16)
    zoo(x)[0].sum().backward()  # only teacher 0's output
    rows = zoo.per_model_tensors()
    grads = torch.cat([p.grad.view(2, -1) for p in zoo.parameters()], 1)
    assert grads[0].abs().sum() > 0 and grads[1].abs().sum() == 0
    assert set(rows) >= {"convs.0.weight", "bns.0.running_mean", "head_weight"}


def _zoo(tmp_path, n: int = 3) -> tuple:
    torch.manual_seed(0)
    stacked = StackedConv4(n, 1, 4, 5, 16)
    kwargs = {"in_channels": 1, "hidden": 4, "num_classes": 5, "image_size": 16}
    teachers = [ZooTeacher("", "conv4", kwargs, classes=list(range(i, i + 5)), accuracy=0.5) for i in range(n)]
    path = save_zoo(tmp_path / "zoo", [stacked.export(i) for i in range(n)], teachers, {"n_classes": n + 4})
    return stacked, path


def test_zoo_round_trip_and_manifest(tmp_path) -> None:
    stacked, path = _zoo(tmp_path)
    models, records, meta = load_zoo(path.parent)
    assert meta == {"n_classes": 7} and [r.classes[0] for r in records] == [0, 1, 2]
    x = torch.rand(4, 1, 16, 16)
    stacked.eval()
    torch.testing.assert_close(models[1](x), stacked(x[None].expand(3, -1, -1, -1, -1))[1], atol=1e-5, rtol=1e-4)
    assert not any(p.requires_grad for p in models[0].parameters()) and not models[0].training
    with pytest.raises(FileExistsError, match="exists"):
        save_zoo(tmp_path / "zoo", [stacked.export(0)], records[:1])


def test_zoo_bad_input_names_the_key(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="model.init_args.zoo=.*no zoo manifest"):
        load_zoo(tmp_path / "nothing", key="model.init_args.zoo")
    stacked, path = _zoo(tmp_path)
    save_file({k: v + 1 for k, v in stacked.export(0).items()}, str(path.parent / "teacher_000.safetensors"))
    with pytest.raises(ValueError, match="teacher 0 .* does not match its manifest hash"):
        load_zoo(path)
    record = json.loads(path.read_text())
    record["teachers"][1]["arch_kwargs"]["hidden"] = 8
    path.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="teacher 1 weights do not fit architecture conv4"):
        load_zoo(path, check_hash=False)
    record["teachers"][1]["arch_kwargs"]["hidden"] = 4
    path.write_text(json.dumps(record))
    (path.parent / "teacher_002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="teacher 2 file"):
        load_zoo(path, check_hash=False)


def test_generator_output_shape_and_range() -> None:
    gen = Generator(nz=8, ngf=4, image_size=16, channels=1)
    x = gen(torch.randn(6, 8))
    assert x.shape == (6, 1, 16, 16) and x.min() >= 0 and x.max() <= 1
    with pytest.raises(ValueError, match="multiple of 4"):
        Generator(image_size=30)


def test_first_order_meta_gradient_is_the_sum_of_the_last_step_gradients() -> None:
    torch.manual_seed(0)
    gen, teacher = Generator(8, 4, 16, 1), Conv4(1, 4, 5, 16).eval()
    targets = torch.arange(10) % 5
    loss_fn = lambda x: F.cross_entropy(teacher(x), targets)  # noqa: E731
    total = [torch.zeros_like(p) for p in gen.parameters()]
    for seed in range(2):
        z = torch.randn(10, 8, generator=torch.Generator().manual_seed(seed))
        _, grads, _ = adapt_generator(gen, z, loss_fn, steps=3, lr=1e-2)
        # reference: two explicit Adam steps on a copy, then the gradient at the twice-adapted weights
        ref = Generator(8, 4, 16, 1)
        ref.load_state_dict(gen.state_dict())
        zz = z.clone().requires_grad_(True)
        opt = torch.optim.Adam([{"params": ref.parameters()}, {"params": [zz]}], lr=1e-2, betas=(0.5, 0.999))
        for _ in range(2):
            opt.zero_grad()
            loss_fn(ref(zz)).backward()
            opt.step()
        ref.zero_grad()
        loss_fn(ref(zz)).backward()
        for acc, g, r in zip(total, grads, ref.parameters()):
            torch.testing.assert_close(g, r.grad)
            acc.add_(g)
    assert all(t.abs().sum() > 0 for t in total[:1])


def test_generator_adaptation_lowers_the_teacher_loss() -> None:
    torch.manual_seed(0)
    gen, teacher = Generator(8, 8, 16, 1), Conv4(1, 4, 5, 16).eval()
    targets = torch.arange(20) % 5
    loss_fn = lambda x: F.cross_entropy(teacher(x), targets)  # noqa: E731
    z = torch.randn(20, 8)
    _, _, first = adapt_generator(gen, z, loss_fn, steps=1, lr=1e-2)
    _, _, later = adapt_generator(gen, z, loss_fn, steps=20, lr=1e-2)
    assert later < first


def test_pool_ring_sampling_relabelling_and_round_trip() -> None:
    pool = TaskPool(num_classes=6, capacity=4, quantize=True)
    images = torch.arange(6 * 5, dtype=torch.float32).div(255).view(30, 1, 1, 1).expand(30, 1, 2, 2)
    classes = torch.arange(30) % 6  # 5 images per class, the ring keeps the last 4
    pool.add(images, classes)
    assert pool.sizes().tolist() == [4] * 6
    support, query, picked = pool.sample(3, 1, 2, 7, torch.Generator().manual_seed(0))
    assert support.shape == (7, 3, 1, 1, 2, 2) and query.shape == (7, 3, 2, 1, 2, 2)
    value = torch.cat([support, query], 2)[..., 0, 0, 0].mul(255).round().long()  # image id k has class k % 6
    assert torch.equal(value % 6, picked[:, :, None].expand_as(value))
    assert (value >= 6).all()  # the oldest write of every class (ids 0..5) was overwritten
    assert len(torch.unique(value[0].flatten())) == 9  # without replacement inside an episode
    again = TaskPool(6, 4, True)
    again.load_state_dict(pool.state_dict())
    torch.testing.assert_close(again.sample(3, 1, 2, 7, torch.Generator().manual_seed(0))[0], support)


def test_empty_pool_names_the_fix() -> None:
    pool = TaskPool(10, 8)
    pool.add(torch.rand(4, 1, 2, 2), torch.tensor([0, 0, 1, 1]))
    with pytest.raises(ValueError, match="fewer than n_way = 5"):
        pool.sample(5, 1, 1, 1, torch.Generator())


def test_maml_second_order_differs_from_first_order_and_batched_equals_loop() -> None:
    torch.manual_seed(0)
    net = transductive(Conv4(1, 4, 3, 16))
    support, query = torch.rand(2, 3, 2, 1, 16, 16), torch.rand(2, 3, 2, 1, 16, 16)
    params = dict(net.named_parameters())
    grads = {}
    for first_order in (True, False):
        loss, acc = maml_query(net, params, support, query, 2, 0.1, first_order)
        grads[first_order] = torch.autograd.grad(loss.sum(), list(params.values()))
    assert any(not torch.allclose(a, b) for a, b in zip(grads[True], grads[False]))
    ys, yq = torch.arange(3).repeat_interleave(2), torch.arange(3).repeat_interleave(2)
    losses = []
    for e in range(2):  # naive reference: explicit autograd inner loop, one episode at a time
        fast = params
        for _ in range(2):
            inner = F.cross_entropy(functional_call(net, fast, (support[e].flatten(0, 1),)), ys)
            g = torch.autograd.grad(inner, list(fast.values()), create_graph=True)
            fast = {k: v - 0.1 * gi for (k, v), gi in zip(fast.items(), g)}
        losses.append(F.cross_entropy(functional_call(net, fast, (query[e].flatten(0, 1),)), yq))
    ref = torch.autograd.grad(sum(losses), list(params.values()))
    for a, b in zip(grads[False], ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    acc = maml_accuracy(net, support, query, steps=3, lr=0.1, chunk_size=1)
    fast = adapt(net, {k: v.detach() for k, v in params.items()}, support[1].flatten(0, 1), ys, 3, 0.1, True)
    pred = functional_call(net, fast, (query[1].flatten(0, 1),)).argmax(-1)
    assert acc.shape == (2,) and acc[1] == (pred == yq).float().mean()


def test_protonet_accuracy_on_separable_features() -> None:
    support = torch.eye(3).repeat_interleave(2, 0).view(1, 3, 2, 3)[..., None, None].expand(4, 3, 2, 3, 1, 1)
    acc = protonet_accuracy(lambda x: x.flatten(1), support, support + 0.01)
    assert acc.tolist() == [1.0] * 4


def test_ci_formula() -> None:
    mean, ci = mean_ci95([0.0, 1.0, 0.0, 1.0])
    assert mean == 0.5 and ci == pytest.approx(1.96 * 0.5 / 2)


def test_distillation_losses_against_references() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(6, 5), torch.randn(6, 5)
    ref = F.kl_div(F.log_softmax(s, -1), F.softmax(t, -1), reduction="batchmean")
    torch.testing.assert_close(distill(s, t), ref)
    quirk = (t.softmax(-1) * (t.log_softmax(-1) - s.softmax(-1))).mean()  # probabilities as the log-input
    torch.testing.assert_close(distill(s, t, release=True), quirk)
    agree = (s.argmax(-1) == t.argmax(-1)).float()
    kl = (t.softmax(-1) * (t.log_softmax(-1) - s.log_softmax(-1))).sum(-1)
    torch.testing.assert_close(hard_sample_loss(s, t), -(agree * kl).mean())
    p_s = s.softmax(-1)
    torch.testing.assert_close(hard_sample_loss(s, t, release=True),
                               -(agree * (p_s * (p_s.log() - t.softmax(-1))).sum(-1)).mean())


def test_step_source_restarts_each_epoch_when_the_loop_stops_after_len_items() -> None:
    from core.resumable_range import ResumableRange

    steps = ResumableRange(3)
    for _epoch in range(2):  # Lightning takes len() items and never exhausts the generator
        it = iter(steps)
        assert [next(it) for _ in range(3)] == [0, 1, 2]
