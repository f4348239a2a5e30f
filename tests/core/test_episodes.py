"""Episode sampling, ProtoNet logits and the confidence interval against naive references; Conv4 shapes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from core.conv4 import Conv4
from core.episodes import mean_ci95, prototype_logits, sample_episodes


def _labels() -> torch.Tensor:
    return torch.tensor([3] * 6 + [0] * 9 + [7] * 5 + [1] * 8 + [5] * 7)[torch.randperm(35, generator=torch.Generator().manual_seed(1))]


def test_episodes_are_valid_draws() -> None:
    labels = _labels()
    episodes = sample_episodes(labels, n_way=3, k_shot=2, q_query=3, n_episodes=200, generator=torch.Generator().manual_seed(0))
    assert episodes.shape == (200, 3, 5)
    drawn = labels[episodes]
    assert (drawn == drawn[..., :1]).all()  # one class per way
    assert all(len(set(row[:, 0].tolist())) == 3 for row in drawn)  # distinct classes per episode
    assert all(len(set(e.flatten().tolist())) == 15 for e in episodes)  # no image twice
    # every class and every image of the smallest class gets drawn over 200 episodes
    assert set(drawn.flatten().tolist()) == {0, 1, 3, 5, 7}
    assert set(episodes.flatten().tolist()) >= set(torch.nonzero(labels == 7).flatten().tolist())
    again = sample_episodes(labels, 3, 2, 3, 200, torch.Generator().manual_seed(0))
    assert torch.equal(episodes, again)


def test_episode_errors_name_the_setting() -> None:
    labels = _labels()
    with pytest.raises(ValueError, match="n_way=6"):
        sample_episodes(labels, 6, 1, 1, 1, torch.Generator())
    with pytest.raises(ValueError, match="k_shot \\+ q_query = 6 but class 7 has only 5"):
        sample_episodes(labels, 2, 1, 5, 1, torch.Generator())


def test_prototype_logits_match_a_loop() -> None:
    g = torch.Generator().manual_seed(0)
    support, query = torch.randn(2, 4, 3, 5, generator=g), torch.randn(2, 6, 5, generator=g)
    logits = prototype_logits(support, query)
    for e in range(2):
        for m in range(6):
            for w in range(4):
                expected = -((query[e, m] - support[e, w].mean(0)) ** 2).sum()
                assert math.isclose(float(logits[e, m, w]), float(expected), rel_tol=1e-4, abs_tol=1e-4)


def test_mean_ci95_is_the_release_formula() -> None:
    values = [0.2, 0.5, 0.9, 0.4, 0.6]
    mean, half = mean_ci95(values)
    assert mean == pytest.approx(np.mean(values))
    assert half == pytest.approx(1.96 * np.std(values) / math.sqrt(5))
    assert mean_ci95([0.7]) == (pytest.approx(0.7), 0.0)


@pytest.mark.parametrize(("size", "dim"), [(28, 32), (32, 128), (84, 800)])
def test_conv4_feature_dim(size: int, dim: int) -> None:
    net = Conv4(in_channels=3, hidden=32, num_classes=5, image_size=size)
    x = torch.randn(2, 3, size, size)
    assert net.feature_dim == dim and net.features(x).shape == (2, dim) and net(x).shape == (2, 5)
    assert Conv4(3, 32, 0, size)(x).shape == (2, dim)
