"""ReservoirBuffer: capacity, uniform inclusion (statistical), batch = sequential insertion, state round trip."""

from __future__ import annotations

import pytest
import torch

from core.buffer import ReservoirBuffer
from core.rng import keyed_generator


def fill(buffer: ReservoirBuffer, n: int, batch: int) -> None:
    for start in range(0, n, batch):
        ids = torch.arange(start, min(n, start + batch))
        buffer.add(ids.float()[:, None], ids, logits=ids.float()[:, None].repeat(1, 3), task_labels=ids // 100)


def test_fills_in_order_then_keeps_capacity() -> None:
    buffer = ReservoirBuffer(10, seed=0)
    fill(buffer, 7, batch=3)
    assert len(buffer) == 7 and buffer.labels[:7].tolist() == list(range(7))
    fill(buffer, 50, batch=4)
    assert len(buffer) == 10 and int(buffer.num_seen) == 57
    # every stored row is consistent across fields
    assert torch.equal(buffer.examples[:, 0].long(), buffer.labels)
    assert torch.equal(buffer.logits[:, 1].long(), buffer.labels)


def test_each_seen_example_is_kept_with_equal_probability() -> None:
    # 2000 independent streams of 40 examples into 8 slots: each example is kept with p = 8/40.
    n, capacity, trials = 40, 8, 2000
    counts = torch.zeros(n)
    for seed in range(trials):
        buffer = ReservoirBuffer(capacity, seed=seed)
        fill(buffer, n, batch=5)
        counts[buffer.labels] += 1
    expected = trials * capacity / n
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    # chi-square with 39 degrees of freedom: the 99.9 % quantile is 72.05
    assert chi2 < 72.05, (chi2, counts)
    # early and late examples are equally likely (algorithm R, not "keep the first" or "keep the last")
    assert abs(counts[:20].mean() - counts[20:].mean()) < 0.1 * expected


def test_a_batch_inserts_like_the_same_examples_one_by_one() -> None:
    buffer = ReservoirBuffer(5, seed=3)
    fill(buffer, 30, batch=30)
    # sequential reference: algorithm R with the same draws
    slots_ref = list(range(-1, -6, -1))
    draws = torch.rand(30, generator=keyed_generator(3, 0), dtype=torch.float64)
    for p in range(30):
        j = p if p < 5 else int(draws[p] * (p + 1))
        if j < 5:
            slots_ref[j] = p
    assert buffer.labels.tolist() == slots_ref


def test_sampling_is_without_replacement_and_seeded() -> None:
    buffer = ReservoirBuffer(20, seed=0)
    fill(buffer, 20, batch=20)
    a = buffer.sample(8, torch.Generator().manual_seed(1))
    b = buffer.sample(8, torch.Generator().manual_seed(1))
    assert len(set(a["labels"].tolist())) == 8 and torch.equal(a["labels"], b["labels"])
    assert set(a) == {"examples", "labels", "logits", "task_labels"}
    assert len(buffer.sample(100, torch.Generator())["labels"]) == 20


def test_state_dict_round_trip_resumes_insertion_exactly() -> None:
    full = ReservoirBuffer(6, seed=2)
    fill(full, 40, batch=4)
    first = ReservoirBuffer(6, seed=2)
    fill(first, 20, batch=4)
    resumed = ReservoirBuffer(6, seed=2)  # not yet allocated: shapes come from the checkpoint
    resumed.load_state_dict(first.state_dict())
    assert len(resumed) == len(first) == 6 and not resumed.is_empty()  # the host-side count follows the load
    for start in range(20, 40, 4):
        ids = torch.arange(start, start + 4)
        resumed.add(ids.float()[:, None], ids, logits=ids.float()[:, None].repeat(1, 3), task_labels=ids // 100)
    for key, value in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


def test_bad_use_is_reported() -> None:
    with pytest.raises(ValueError, match="capacity >= 1"):
        ReservoirBuffer(0)
    with pytest.raises(RuntimeError, match="empty replay buffer"):
        ReservoirBuffer(3).sample(2, torch.Generator())
    buffer = ReservoirBuffer(3)
    buffer.add(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long), logits=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="logits"):
        buffer.add(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long))
