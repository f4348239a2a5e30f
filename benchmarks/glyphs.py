"""Few-shot floor and ceilings on the glyph source: what later meta-learning methods are measured against.

Protocol (5-way 1-shot and 5-shot, 15 queries, 600 meta-test episodes, the same episodes for every row):
the classes of ``glyph_splits(0)``: backbones train on ``meta_train`` images only, the number of training
epochs/episodes is chosen on ``meta_val`` episodes (classes disjoint from meta-test), and the chosen model is
scored once on ``meta_test``. Training uses the 17 non-held-out faces; meta-test is scored on those faces
and, as a second column, on the 4 held-out faces (unseen classes *and* unseen typefaces).

Rows (Conv4, 32 channels as the data-free meta-learning releases; training images shifted by up to 2 px):
- ``random_init``: an untrained Conv4's features (the floor);
- ``pretrain_linear``: Conv4 trained with cross-entropy on the meta-train classes, then a logistic-regression
  probe fitted on each episode's support set (frozen features);
- ``pretrain_proto``: the same features classified by prototypes;
- ``protonet``: Conv4 trained episodically as a prototypical network (the ceiling for metric methods).

    python benchmarks/glyphs.py            # 3 seeds (~15 min on one core)
    python benchmarks/glyphs.py --quick    # 1 seed, short training: a smoke check

Writes ``benchmarks/results/glyphs.json`` (means, CIs, per-seed values) and ``glyphs_raw.json`` (every
episode accuracy of every row, seed and shot), so the numbers can be re-scored.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from core.conv4 import Conv4
from core.episodes import mean_ci95, prototype_logits, sample_episodes
from core.tensor_augment import random_crop_flip
from datamodules.sources import GlyphSet

RESULTS = Path(__file__).resolve().parent / "results"
N_WAY, N_QUERY, SHOTS = 5, 15, (1, 5)
EVAL_SEED = 12345  # the meta-test episodes; the same for every row and training seed


def _data(split: str, per_class: int, faces: str, seed: int) -> tuple[Tensor, Tensor]:
    images, labels = GlyphSet(split, per_class=per_class, faces=faces, seed=seed).tensors()
    return images, labels


@torch.no_grad()
def _features(net: Conv4, images: Tensor, batch: int = 1024) -> Tensor:
    net.eval()
    return torch.cat([net.features(images[i : i + batch]) for i in range(0, len(images), batch)])


def _linear_probe(support: Tensor, query: Tensor, steps: int = 100, lr: float = 0.1, decay: float = 1e-3) -> Tensor:
    """Logistic regression per episode, all episodes at once: (E, W, K, D), (E, M, D) -> (E, M, W) logits."""
    e, w, k, d = support.shape
    mean = support.mean(dim=(1, 2), keepdim=True).squeeze(2)
    scale = support.flatten(1, 2).std(dim=1, keepdim=True).clamp_min(1e-6)
    xs = ((support.flatten(1, 2) - mean) / scale).detach()
    xq = (query - mean) / scale
    ys = torch.arange(w).repeat_interleave(k).expand(e, -1)
    weight = torch.zeros(e, d, w, requires_grad=True)
    bias = torch.zeros(e, 1, w, requires_grad=True)
    opt = torch.optim.Adam([weight, bias], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        logits = xs @ weight + bias
        loss = F.cross_entropy(logits.flatten(0, 1), ys.flatten()) + decay * weight.pow(2).sum() / e
        loss.backward()
        opt.step()
    return (xq @ weight + bias).detach()


def episode_accuracy(features: Tensor, labels: Tensor, shot: int, n_episodes: int, probe: str) -> Tensor:
    """Per-episode accuracy of ``probe`` (``proto`` or ``linear``) on frozen ``features`` (N, D)."""
    episodes = sample_episodes(labels, N_WAY, shot, N_QUERY, n_episodes, torch.Generator().manual_seed(EVAL_SEED))
    feats = features[episodes]  # (E, W, shot + Q, D)
    support, query = feats[:, :, :shot], feats[:, :, shot:].flatten(1, 2)
    truth = torch.arange(N_WAY).repeat_interleave(N_QUERY)
    with torch.enable_grad():
        logits = prototype_logits(support, query) if probe == "proto" else _linear_probe(support, query)
    return (logits.argmax(-1) == truth).float().mean(dim=1)


def _val_score(net: Conv4, val: tuple[Tensor, Tensor], episodes: int) -> float:
    return float(episode_accuracy(_features(net, val[0]), val[1], 5, episodes, "proto").mean())


def train_pretrain(train: tuple[Tensor, Tensor], val: tuple[Tensor, Tensor], epochs: int, seed: int,
                   val_episodes: int) -> tuple[Conv4, dict]:
    """Cross-entropy on the meta-train classes; the epoch with the best meta-val 5-shot accuracy is kept."""
    torch.manual_seed(seed)
    images, labels = train
    net = Conv4(1, 32, int(labels.max()) + 1, images.shape[-1])
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    best, best_state, curve = -1.0, None, []
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        net.train()
        for idx in torch.randperm(len(labels), generator=generator).split(128):
            x = random_crop_flip(images[idx], 2, False, generator)
            loss = F.cross_entropy(net(x), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        curve.append(_val_score(net, val, val_episodes))
        if curve[-1] > best:
            best, best_state = curve[-1], {k: v.clone() for k, v in net.state_dict().items()}
    net.load_state_dict(best_state)
    return net, {"val_curve": curve, "chosen_epoch": int(np.argmax(curve)) + 1}


def train_protonet(train: tuple[Tensor, Tensor], val: tuple[Tensor, Tensor], episodes: int, seed: int,
                   val_episodes: int, check_every: int = 250) -> tuple[Conv4, dict]:
    """Prototypical network, 5-way 5-shot 15-query training episodes; the best meta-val checkpoint is kept."""
    torch.manual_seed(seed)
    images, labels = train
    net = Conv4(1, 32, 0, images.shape[-1])
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    plan = sample_episodes(labels, N_WAY, 5, N_QUERY, episodes, generator)
    truth = torch.arange(N_WAY).repeat_interleave(N_QUERY)
    best, best_state, curve = -1.0, None, []
    for step, episode in enumerate(plan, start=1):
        net.train()
        feats = net.features(random_crop_flip(images[episode.flatten()], 2, False, generator)).view(N_WAY, 5 + N_QUERY, -1)
        logits = prototype_logits(feats[None, :, :5], feats[:, 5:].flatten(0, 1)[None])[0]
        loss = F.cross_entropy(logits, truth)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % check_every == 0 or step == episodes:
            curve.append(_val_score(net, val, val_episodes))
            if curve[-1] > best:
                best, best_state = curve[-1], {k: v.clone() for k, v in net.state_dict().items()}
    net.load_state_dict(best_state)
    return net, {"val_curve": curve, "chosen_episode": (int(np.argmax(curve)) + 1) * check_every}


def run(seeds: list[int], epochs: int, protonet_episodes: int, per_class: int, n_episodes: int,
        val_episodes: int) -> tuple[dict, dict]:
    test_sets = {faces: _data("meta_test", 40, faces, EVAL_SEED) for faces in ("train", "heldout")}
    raw: dict = {}
    meta: dict = {}
    for seed in tqdm(seeds, desc="seeds"):
        train = _data("meta_train", per_class, "train", seed)
        val = _data("meta_val", 40, "train", 1000 + seed)
        torch.manual_seed(seed)
        nets = {"random_init": (Conv4(1, 32, 0, 28), "proto")}
        start = time.perf_counter()
        pre, meta[f"pretrain_seed{seed}"] = train_pretrain(train, val, epochs, seed, val_episodes)
        meta[f"pretrain_seed{seed}"]["seconds"] = time.perf_counter() - start
        start = time.perf_counter()
        proto, meta[f"protonet_seed{seed}"] = train_protonet(train, val, protonet_episodes, seed, val_episodes)
        meta[f"protonet_seed{seed}"]["seconds"] = time.perf_counter() - start
        nets.update(pretrain_linear=(pre, "linear"), pretrain_proto=(pre, "proto"), protonet=(proto, "proto"))
        for row, (net, probe) in nets.items():
            for faces, (images, labels) in test_sets.items():
                feats = _features(net, images)
                for shot in SHOTS:
                    acc = episode_accuracy(feats, labels, shot, n_episodes, probe)
                    raw.setdefault(row, {}).setdefault(faces, {}).setdefault(str(shot), {})[str(seed)] = acc.tolist()
    return raw, meta


def summarise(raw: dict) -> dict:
    """``acc[row][faces][shot]``: mean and CI over all episodes of all seeds, and the per-seed means."""
    out: dict = {}
    for row, by_faces in raw.items():
        for faces, by_shot in by_faces.items():
            for shot, by_seed in by_shot.items():
                pooled = [a for accs in by_seed.values() for a in accs]
                mean, ci = mean_ci95(pooled)
                per_seed = [float(np.mean(v)) for v in by_seed.values()]
                out.setdefault(row, {}).setdefault(faces, {})[shot] = {
                    "mean": mean, "ci95": ci, "std_over_seeds": float(np.std(per_seed)), "per_seed": per_seed}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 seed, short training (smoke check)")
    parser.add_argument("--out", type=Path, default=RESULTS / "glyphs.json")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        settings = dict(seeds=[0], epochs=2, protonet_episodes=200, per_class=20, n_episodes=100, val_episodes=50)
    else:
        settings = dict(seeds=[0, 1, 2], epochs=15, protonet_episodes=3000, per_class=60, n_episodes=600,
                        val_episodes=200)
    start = time.perf_counter()
    raw, meta = run(**settings)
    acc = summarise(raw)
    result = {
        "protocol": {"n_way": N_WAY, "shots": list(SHOTS), "queries": N_QUERY, "episodes": settings["n_episodes"],
                     "split_seed": 0, "train_faces": "train", "test_faces": ["train", "heldout"], **settings},
        "acc": acc,
        # validity: the gap between the floor and the ceilings on the standard (seen-faces) test
        "gap_protonet_minus_random": {s: acc["protonet"]["train"][s]["mean"] - acc["random_init"]["train"][s]["mean"]
                                      for s in map(str, SHOTS)},
        "training": meta,
        "seconds": time.perf_counter() - start,
        "threads": args.threads,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    args.out.with_name(args.out.stem + "_raw.json").write_text(json.dumps(raw))
    print(f"{'row':18s} {'faces':8s} " + " ".join(f"{s}-shot (mean +- ci95)" for s in SHOTS))
    for row, by_faces in acc.items():
        for faces, by_shot in by_faces.items():
            cells = " ".join(f"{by_shot[str(s)]['mean']:.3f} +- {by_shot[str(s)]['ci95']:.3f}     " for s in SHOTS)
            print(f"{row:18s} {faces:8s} {cells}")
    print(f"wrote {args.out} in {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
