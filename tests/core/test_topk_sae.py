"""TopK SAE: sparsity, decoder constraint, geometric median, AuxK, PCA comparison, SAELens layout."""

from __future__ import annotations

import json

import pytest
import torch

from core.topk_sae import CFG_FILE, WEIGHTS_FILE, TopKSAE, geometric_median


def sparse_data(n: int = 2048, d: int = 16, atoms: int = 64, k: int = 3, seed: int = 0) -> torch.Tensor:
    """Non-negative combinations of k random unit atoms: what a k-sparse dictionary can represent."""
    g = torch.Generator().manual_seed(seed)
    dictionary = torch.nn.functional.normalize(torch.randn(atoms, d, generator=g), dim=1)
    idx = torch.stack([torch.randperm(atoms, generator=g)[:k] for _ in range(n)])
    coef = torch.rand(n, k, generator=g) + 0.5
    return (coef[..., None] * dictionary[idx]).sum(1) + 0.3


def test_encode_keeps_exactly_k_nonnegative_codes() -> None:
    sae = TopKSAE(8, expansion=4, k=5)
    with torch.no_grad():
        sae.b_enc.fill_(10.0)  # every pre-activation positive: exactly k survive, not fewer
    z = sae.encode(torch.randn(32, 8))
    assert ((z != 0).sum(-1) == 5).all() and (z >= 0).all()
    pre = sae.pre_activations(torch.randn(3, 8))
    assert (sae.encode_dense(torch.zeros(3, 8)) >= 0).all() and pre.shape == (3, 32)


def test_geometric_median_differs_from_mean_on_skewed_data() -> None:
    g = torch.Generator().manual_seed(0)
    points = torch.cat([torch.randn(90, 2, generator=g) * 0.1, torch.randn(10, 2, generator=g) * 0.1 + 50])
    median = geometric_median(points)

    def cost(p: torch.Tensor) -> float:
        return float((points - p).norm(dim=1).sum())

    assert (median - points.mean(0)).norm() > 1.0  # the outliers drag the mean, not the median
    assert median.norm() < 0.5
    for shift in torch.eye(2) * 0.05:  # a local minimum of the summed distances
        assert cost(median) <= cost(median + shift) and cost(median) <= cost(median - shift)


def test_decoder_gradient_projection_and_renormalisation() -> None:
    sae = TopKSAE(8, 2, 3)
    x = torch.randn(64, 8)
    sae.loss(x)["loss"].backward()
    sae.remove_parallel_gradient()
    assert torch.allclose((sae.W_dec.grad * sae.W_dec).sum(1), torch.zeros(16), atol=1e-6)
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    sae.normalize_decoder()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(16), atol=1e-6)


def test_auxk_reaches_dead_latents_only_when_some_are_dead() -> None:
    torch.manual_seed(0)
    # rank-1 inputs: the same few latents win every token, so some are dead whatever the initialisation
    x = torch.randn(64, 1) @ torch.randn(1, 8)
    alive = TopKSAE(8, 4, 2, auxk=4, dead_tokens=10**9)
    assert alive.loss(x)["auxk"] == 0
    sae = TopKSAE(8, 4, 2, auxk=4, dead_tokens=0)  # anything that did not fire in this batch is dead
    sae.loss(x)
    out = sae.loss(x)
    assert out["dead_fraction"] > 0 and out["auxk"] > 0
    out["loss"].backward()
    dead = sae.tokens_since_fired > 0
    assert sae.W_enc.grad[:, dead].abs().sum() > 0  # the AuxK term trains dead latents


def test_padding_weight_excludes_tokens() -> None:
    sae = TopKSAE(8, 2, 3)
    x = torch.randn(10, 8)
    padded = torch.cat([x, 100 * torch.randn(5, 8)])
    weight = torch.cat([torch.ones(10), torch.zeros(5)])
    assert torch.allclose(TopKSAE.loss(sae, padded, weight)["mse"], sae.loss(x)["mse"], atol=1e-5)


@pytest.mark.slow
def test_reconstruction_beats_pca_at_equal_sparsity() -> None:
    torch.manual_seed(0)
    data = sparse_data()
    train, val = data[:1536], data[1536:]
    sae = TopKSAE(16, expansion=8, k=3, auxk=16, dead_tokens=4096)
    sae.initialize(train)
    opt = torch.optim.Adam(sae.parameters(), lr=3e-3, eps=6.25e-10)
    for _ in range(600):
        batch = train[torch.randint(0, len(train), (256,))]
        opt.zero_grad()
        sae.loss(batch)["loss"].backward()
        sae.remove_parallel_gradient()
        opt.step()
        sae.normalize_decoder()
    mean = train.mean(0)
    basis = torch.linalg.svd(train - mean, full_matrices=False).Vh[:3]
    pca_err = ((val - mean) @ basis.T @ basis + mean - val).pow(2).sum(-1).mean()
    with torch.no_grad():
        sae_err = (sae(val) - val).pow(2).sum(-1).mean()
    assert sae_err < 0.7 * pca_err


def test_saelens_layout_and_round_trip(tmp_path) -> None:
    sae = TopKSAE(6, expansion=4, k=2, hook_name="layer.3", model_name="tiny")
    expected = {"W_enc": (6, 24), "b_enc": (24,), "W_dec": (24, 6), "b_dec": (6,)}  # SAELens TopK SAE
    assert {k: tuple(v.shape) for k, v in sae.sae_state_dict().items()} == expected
    folder = sae.save(tmp_path / "sae")
    cfg = json.loads((folder / CFG_FILE).read_text())
    assert (folder / WEIGHTS_FILE).is_file()
    assert cfg["architecture"] == "topk" and cfg["d_in"] == 6 and cfg["d_sae"] == 24 and cfg["k"] == 2
    assert cfg["apply_b_dec_to_input"] is True and cfg["hook_name"] == "layer.3"
    back = TopKSAE.load(folder)
    x = torch.randn(4, 6)
    assert torch.equal(back(x), sae(x))
    # An SAELens-written cfg without litzoo's extras (legacy activation_fn_kwargs form) loads too.
    cfg = {k: v for k, v in cfg.items() if k not in ("litzoo", "k")}
    (folder / CFG_FILE).write_text(json.dumps(cfg))
    assert TopKSAE.load(folder).k == 2


def test_bad_k_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="k=100"):
        TopKSAE(4, 2, 100)
