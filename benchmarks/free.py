"""FREE on the glyph source: recovery speed, accuracy against floor and ceiling, stacked-zoo speed.

Protocol: a zoo of Conv4 teachers (32 channels), each on 5 random ``meta_train`` glyph classes; data-free
meta-learning from the zoo; 5-way 1-shot and 5-shot MAML fine-tuning (10 steps, lr 0.01, transductive BN)
on the same fixed ``meta_test`` episodes for every row (classes unseen by every teacher). Model selection
on ``meta_val`` episodes only, by the test protocol itself (MAML fine-tuning, 5-shot, every ``val_every``
steps; the first evaluation sees the untrained learner). One meta-learner per row and seed is trained
with 5-shot replay episodes and scored at both shots (the release trains one per shot).

Scale (one CPU core): 16 px glyphs, 20 teachers, 24 FREE steps (8 warm-up) with 2 replay meta-batches of
4 episodes each, generator nz 64 / ngf 16, 50 images per teacher, outer lr 1e-3 (the release's), three
training seeds. The release runs 1000 steps with >= 100 replay episodes each. The alignment scale alpha is
1, chosen on meta-val (docs/methods/free.md): the release's 67 makes the alignment pseudo-gradient swamp
the second moments of the Adam it shares with replay, which at 2 replay meta-updates per step (the
release makes >= 10) freezes replay.

Rows: ``random_init`` (floor: an untrained Conv4, the same initial weights as every trained row of its
seed), ``averaging`` (parameter average of the teachers), ``no_alignment`` (FREE without the alignment
step: pool replay only), ``free_first_order`` (first-order MAML replay), ``free``, and ``real_data``
(ceiling: the same MAML replay on real meta-train episodes, as many meta-updates as FREE makes). Also:
``recovery_speedup_*`` (FIVE's claim: iterations and seconds a fresh generator needs to reach the teacher
CE the meta-generator reaches within its 5 adaptation iterations, on held-out teachers) and ``zoo_speedup``
(one stacked epoch vs the same epoch as a loop over teachers).

    python benchmarks/free.py                    # the full run: seeds 0 1 2, 600 test episodes per shot
    python benchmarks/free.py --quick            # smoke run
    # or one process per seed, then one JSON:
    python benchmarks/free.py --seeds 1 --out runs/free_s1.json   (etc.)
    python benchmarks/free.py --merge benchmarks/results/free_raw.json runs/free_s1_raw.json ...

Writes ``benchmarks/results/free.json`` and ``free_raw.json`` (every episode accuracy of every row, shot
and seed, the validation curves and the recovery curves). The zoo is cached under the litzoo cache,
keyed by a hash of its settings.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/<name>.py` from the repo root

from callbacks.gradient_alignment import GradientAlignment  # noqa: E402
from core.conv4 import Conv4  # noqa: E402
from core.episodes import mean_ci95, sample_episodes  # noqa: E402
from core.maml import maml_accuracy, maml_query, protonet_accuracy, transductive  # noqa: E402
from core.meta_generator import Generator  # noqa: E402
from core.model_zoo import load_zoo, read_manifest  # noqa: E402
from core.packaged_models import default_cache_dir  # noqa: E402
from core.rng import keyed_generator  # noqa: E402
from datamodules.few_shot import labelled_split  # noqa: E402
from datamodules.free import FewShotEpisodes  # noqa: E402
from datamodules.model_zoo import ZooData  # noqa: E402
from datamodules.sources import glyph_splits  # noqa: E402
from lit_modules.free import FREEModule  # noqa: E402
from lit_modules.model_zoo import ZooModule  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
SHOTS, N_WAY, N_QUERY, EVAL_SEED = (1, 5), 5, 15, 12345
FULL = dict(size=16, teachers=20, holdout=2, zoo_per_class=60, zoo_epochs=10, steps=24, warmup=8, val_every=8,
            val_episodes=50, test_episodes=600, replay_batches=2, episode_batch=4, seeds=[0, 1, 2], fresh_steps=200,
            recovery_seeds=2)
QUICK = dict(size=16, teachers=8, holdout=2, zoo_per_class=30, zoo_epochs=2, steps=6, warmup=2, val_every=3,
             val_episodes=20, test_episodes=40, replay_batches=1, episode_batch=2, seeds=[0], fresh_steps=30,
             recovery_seeds=1)
FREE_ARGS = dict(hidden=32, nz=64, ngf=16, teachers_per_step=4, images_per_class=10, generator_steps=5,
                 augment_flip=False, replay_k_shot=5, replay_q_query=5, replay_patience=0, pool_capacity=100,
                 evaluation="maml", outer_lr=1e-3)
ALIGN = dict(mode="sequential", alpha=1.0, inner_lr=1e-3, inner_optimizer="adam")  # alpha tuned on meta-val (release 67)


def _quiet_trainer(**kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **kwargs)


def build_zoo(cfg: dict) -> tuple[Path, float]:
    """Train (or reuse) the cached zoo; returns its directory and the stacked training seconds."""
    code = [REPO / f for f in ("core/stacked_conv4.py", "core/model_zoo.py", "lit_modules/model_zoo.py",
                               "datamodules/model_zoo.py", "datamodules/few_shot.py", "datamodules/sources/glyphs.py",
                               "datamodules/sources/glyph_classes.py", "datamodules/sources/glyph_fonts.py")]
    key = {**{k: cfg[k] for k in ("size", "teachers", "zoo_per_class", "zoo_epochs")},
           "code": [hashlib.sha256(f.read_bytes()).hexdigest() for f in code],  # what produced the zoo
           "classes": glyph_splits(0)["meta_train"]}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    out = default_cache_dir() / "benchmarks" / f"free_zoo_{digest}"
    if (out / "manifest.json").is_file():
        return out, float(read_manifest(out)[2].get("train_seconds", float("nan")))
    data = ZooData(source="glyphs", image_size=cfg["size"], per_class=cfg["zoo_per_class"],
                   n_teachers=cfg["teachers"], batch_size=32)
    module = ZooModule(hidden=32, image_size=cfg["size"], output_dir=str(out))
    start = time.perf_counter()
    _quiet_trainer(max_epochs=cfg["zoo_epochs"], default_root_dir=str(out.parent)).fit(module, datamodule=data)
    seconds = time.perf_counter() - start
    manifest = out / "manifest.json"
    record = json.loads(manifest.read_text())
    record["meta"]["train_seconds"] = seconds
    manifest.write_text(json.dumps(record, indent=1))
    return out, seconds


def zoo_speedup(cfg: dict) -> dict:
    """Seconds of one training epoch of the stacked zoo vs the same epoch as a Python loop over teachers."""
    torch.manual_seed(0)
    data = ZooData(source="glyphs", image_size=cfg["size"], per_class=cfg["zoo_per_class"],
                   n_teachers=cfg["teachers"], batch_size=32)
    data.prepare_teachers()
    batches = list(data.train_dataloader())
    from core.stacked_conv4 import StackedConv4

    stacked = StackedConv4(cfg["teachers"], 1, 32, 5, cfg["size"])
    opt = torch.optim.Adam(stacked.parameters(), lr=0.01)
    start = time.perf_counter()
    for x, y in batches:
        loss = F.cross_entropy(stacked(x.transpose(0, 1)).flatten(0, 1), y.T.flatten()) * cfg["teachers"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    t_stacked = time.perf_counter() - start
    nets = [Conv4(1, 32, 5, cfg["size"]) for _ in range(cfg["teachers"])]
    opts = [torch.optim.Adam(n.parameters(), lr=0.01) for n in nets]
    start = time.perf_counter()
    for i, (net, o) in enumerate(zip(nets, opts)):
        for x, y in batches:
            loss = F.cross_entropy(net(x[:, i]), y[:, i])
            o.zero_grad()
            loss.backward()
            o.step()
    t_loop = time.perf_counter() - start
    return {"stacked_seconds": t_stacked, "loop_seconds": t_loop, "zoo_speedup": t_loop / t_stacked}


def test_episodes(cfg: dict) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    images, labels, _ = labelled_split("glyphs", "meta_test", 40, cfg["size"])
    out = {}
    for shot in SHOTS:
        idx = sample_episodes(labels, N_WAY, shot, N_QUERY, cfg["test_episodes"], keyed_generator(EVAL_SEED, shot))
        x = images[idx]
        out[shot] = (x[:, :, :shot], x[:, :, shot:])
    return out


def score(learner: Conv4, episodes: dict) -> dict:
    """Per-episode accuracies of MAML fine-tuning (the protocol) and of prototypes, at every shot."""
    out = {}
    for shot, (support, query) in episodes.items():
        out[str(shot)] = {"maml": maml_accuracy(learner, support, query, 10, 0.01).tolist(),
                          "protonet": protonet_accuracy(learner.features, support, query).tolist()}
    return out


def train_free(zoo: Path, cfg: dict, seed: int, row: str, alignment: bool, first_order: bool) -> tuple[FREEModule, dict]:
    module = FREEModule(zoo=str(zoo), warmup=cfg["warmup"], replay_batches=cfg["replay_batches"],
                        episode_batch=cfg["episode_batch"], holdout_teachers=cfg["holdout"], alignment=alignment,
                        first_order=first_order, rng_seed=seed, **FREE_ARGS)
    data = FewShotEpisodes(source="glyphs", image_size=cfg["size"], per_class=40, k_shot=5,
                           val_episodes=cfg["val_episodes"], steps_per_epoch=cfg["val_every"], seed=seed)
    torch.manual_seed(seed)
    run_dir = Path("runs/benchmarks/free") / f"{'quick' if cfg.get('quick') else 'full'}_{row}_seed{seed}"
    curve, seconds = fit_selected(module, data, [GradientAlignment(**ALIGN)] if alignment else [], cfg, run_dir)
    return module, {"val_curve": curve, "train_seconds": seconds, "chosen": int(torch.tensor(curve).argmax())}


def fit_selected(module: L.LightningModule, data: L.LightningDataModule, callbacks: list[L.Callback], cfg: dict,
                 run_dir: Path) -> tuple[list[float], float]:
    """Train a meta-learner (free or tgr) for ``cfg["steps"]``, validating every ``cfg["val_every"]`` steps, and
    load its meta-val-selected state; returns the validation curve and the training seconds."""
    curve: list[float] = []

    class Curve(L.Callback):
        def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # after val
            curve.append(float(trainer.callback_metrics["val/acc"]))

    start = time.perf_counter()
    _quiet_trainer(max_epochs=cfg["steps"] // cfg["val_every"], callbacks=[Curve(), *callbacks],
                   default_root_dir=str(run_dir)).fit(module, datamodule=data)
    seconds = time.perf_counter() - start
    module.learner.load_state_dict(module.best_state)
    return curve, seconds


def train_real(cfg: dict, seed: int, n_updates: int) -> tuple[Conv4, dict]:
    """The ceiling: the same MAML replay (second order, 5-shot, 5 inner steps) on real meta-train episodes."""
    images, labels, _ = labelled_split("glyphs", "meta_train", 40, cfg["size"])
    val_images, val_labels, _ = labelled_split("glyphs", "meta_val", 40, cfg["size"])
    val_idx = sample_episodes(val_labels, N_WAY, 5, N_QUERY, cfg["val_episodes"], keyed_generator(seed, 1))
    val = val_images[val_idx]
    torch.manual_seed(seed)
    learner = transductive(Conv4(1, 32, N_WAY, cfg["size"]))
    opt = torch.optim.Adam(learner.parameters(), lr=FREE_ARGS["outer_lr"])
    q = FREE_ARGS["replay_q_query"]
    best, best_state, curve = -1.0, None, []
    for u in range(n_updates):
        idx = sample_episodes(labels, N_WAY, 5, q, cfg["episode_batch"], keyed_generator(seed, 4, u))
        x = images[idx]
        loss, _ = maml_query(learner, dict(learner.named_parameters()), x[:, :, :5], x[:, :, 5:], 5, 0.01, False)
        opt.zero_grad()
        loss.sum().backward()
        opt.step()
        if (u + 1) % max(1, n_updates // 5) == 0 or u == n_updates - 1:
            curve.append(float(maml_accuracy(learner, val[:, :, :5], val[:, :, 5:], 10, 0.01).mean()))
            if curve[-1] > best:
                best, best_state = curve[-1], {k: v.clone() for k, v in learner.state_dict().items()}
    learner.load_state_dict(best_state)
    return learner, {"val_curve": curve, "updates": n_updates}


def recovery(generator_state: dict, zoo: Path, cfg: dict) -> dict:
    """FIVE's speed claim on held-out teachers: iterations (and seconds) a fresh generator needs to reach the
    teacher CE the meta-generator reaches in its ``generator_steps`` adaptation iterations (the budget it was
    meta-trained for), from the same latents and the same Adam; the fresh run is cut at ``fresh_steps``
    (then the speed-up is a lower bound, counted in ``censored``)."""
    teachers, records, _ = load_zoo(zoo)
    n, budget = 5 * FREE_ARGS["images_per_class"], FREE_ARGS["generator_steps"]
    targets = torch.arange(n) % 5
    curves = {"fresh": [], "meta": []}
    steps_fresh, sec_fresh, sec_meta, target_ce, censored = [], [], [], [], 0
    for teacher in teachers[-cfg["holdout"]:]:
        for s in range(cfg["recovery_seeds"]):
            runs = {}
            for name, steps in (("meta", budget), ("fresh", cfg["fresh_steps"])):
                torch.manual_seed(100 + s)
                gen = Generator(FREE_ARGS["nz"], FREE_ARGS["ngf"], cfg["size"], 1)
                if name == "meta":
                    gen.load_state_dict(generator_state)
                z = torch.randn(n, FREE_ARGS["nz"], generator=keyed_generator(s, 9)).requires_grad_(True)
                opt = torch.optim.Adam([{"params": gen.parameters()}, {"params": [z]}], lr=1e-3, betas=(0.5, 0.999))
                ce, times, start = [], [], time.perf_counter()
                for _ in range(steps):  # ce[i]: the loss of iteration i + 1 (before its update), as FREE keeps it
                    loss = F.cross_entropy(teacher(gen(z)), targets)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    ce.append(float(loss))
                    times.append(time.perf_counter() - start)
                    if name == "fresh" and ce[-1] <= runs["meta"][0][-1]:
                        break  # reached the meta-generator's CE
                runs[name] = (ce, times)
                curves[name].append(ce)
            target = runs["meta"][0][-1]
            hit = [i for i, c in enumerate(runs["fresh"][0]) if c <= target][:1]
            censored += not hit
            i = hit[0] if hit else cfg["fresh_steps"] - 1
            target_ce.append(target)
            steps_fresh.append(i + 1)
            sec_fresh.append(runs["fresh"][1][i])
            sec_meta.append(runs["meta"][1][-1])
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    return {"recovery_speedup_steps": mean(steps_fresh) / budget,
            "recovery_speedup_seconds": mean(sec_fresh) / mean(sec_meta),
            "target_ce": target_ce, "steps_meta": budget, "steps_fresh": steps_fresh, "censored": censored,
            "fresh_ce_at_budget": [c[min(budget, len(c)) - 1] for c in curves["fresh"]], "curves": curves}


def averaged_teachers(zoo: Path, cfg: dict) -> Conv4:
    teachers, _, _ = load_zoo(zoo)
    learner = transductive(Conv4(1, 32, N_WAY, cfg["size"]))
    own = dict(learner.named_parameters())
    with torch.no_grad():
        for name, p in own.items():
            p.copy_(torch.stack([dict(t.named_parameters())[name] for t in teachers]).mean(0))
    return learner


def summarise(raw: dict) -> dict:
    acc, acc_proto = {}, {}
    for row, per_seed in raw["rows"].items():
        acc[row], acc_proto[row] = {}, {}
        for shot in map(str, SHOTS):
            maml = [a for s in per_seed.values() for a in s[shot]["maml"]]
            proto = [a for s in per_seed.values() for a in s[shot]["protonet"]]
            seed_means = [sum(s[shot]["maml"]) / len(s[shot]["maml"]) for s in per_seed.values()]
            m, ci = mean_ci95(maml)
            acc[row][shot] = {"mean": m, "ci95": ci, "seed_means": seed_means,
                              "seed_std": float(torch.tensor(seed_means).std(unbiased=False))}
            acc_proto[row][shot] = dict(zip(("mean", "ci95"), mean_ci95(proto)))
    gap = {shot: (acc["free"][shot]["mean"] - acc["random_init"][shot]["mean"])
           / max(acc["real_data"][shot]["mean"] - acc["random_init"][shot]["mean"], 1e-9) for shot in acc["free"]}
    validity = {shot: acc["real_data"][shot]["mean"] - acc["random_init"][shot]["mean"] for shot in acc["free"]}
    five = acc["free"]["5"]
    chosen = {key: info["chosen"] for key, info in raw["training"].items() if "chosen" in info}
    above = {f"free_above_{row}_5shot": five["mean"] - five["ci95"] > acc[row]["5"]["mean"] + acc[row]["5"]["ci95"]
             for row in ("no_alignment", "random_init") if row in acc}  # non-overlapping 95 % CIs
    return {"protocol_validity": validity, "acc": acc, "acc_protonet": acc_proto, "gap_closed_by_free": gap,
            "selected_evaluation": chosen, **above}  # selected 0: meta-val selection kept the untrained learner


def write(args: argparse.Namespace, raw: dict, extra: dict) -> dict:
    """Summarise what is there and write both files (after every row, so an interrupted run keeps its rows)."""
    teachers = read_manifest(extra.pop("zoo"))[1]
    args.quick = raw["config"].get("quick", args.quick)
    result = {"quick": args.quick, **extra, **(summarise(raw) if _complete(raw) else {}), "rows": list(raw["rows"]),
              "teacher_accuracy_mean": sum(t.accuracy for t in teachers) / len(teachers), "config": raw["config"]}
    if "recovery" in raw:
        for key in ("recovery_speedup_steps", "recovery_speedup_seconds"):
            per_seed = [r[key] for r in raw["recovery"].values()]
            result[key], result[key + "_per_seed"] = sum(per_seed) / len(per_seed), per_seed
        result["recovery_censored"] = sum(r["censored"] for r in raw["recovery"].values())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    args.out.with_name(args.out.stem + "_raw.json").write_text(json.dumps(raw))
    return result


def _complete(raw: dict) -> bool:
    """Floor, ceiling and FREE are there (an interrupted run may lack the other rows)."""
    return {"random_init", "free", "real_data"} <= set(raw["rows"])


def merge(args: argparse.Namespace) -> None:
    """One JSON from runs of the same mode on disjoint seeds (e.g. one process per seed)."""
    parts = [json.loads(p.read_text()) for p in args.merge]
    summaries = [json.loads(p.with_name(p.name.replace("_raw.json", ".json")).read_text()) for p in args.merge]
    raw = parts[0]
    for part in parts[1:]:
        for row, per_seed in part["rows"].items():
            raw["rows"].setdefault(row, {}).update(per_seed)
        raw["training"].update(part["training"])
        raw.setdefault("recovery", {}).update(part.get("recovery", {}))
    raw["config"]["seeds"] = sorted({int(s) for part in parts for s in part["config"]["seeds"]})
    keep = ("stacked_seconds", "loop_seconds", "zoo_speedup", "zoo_train_seconds")
    extra = {**{k: summaries[0][k] for k in keep}, "zoo": Path(summaries[0]["zoo_dir"]),
             "wall_seconds": max(s["wall_seconds"] for s in summaries), "merged_from": [str(p) for p in args.merge]}
    write(args, raw, extra)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run (minutes)")
    parser.add_argument("--out", type=Path, default=RESULTS / "free.json")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (default: the mode's)")
    parser.add_argument("--merge", type=Path, nargs="+", default=None,
                        help="summarise these raw files of runs on disjoint seeds (same mode) into --out")
    args = parser.parse_args()
    if args.merge:
        return merge(args)
    torch.set_num_threads(args.threads)
    cfg = dict(QUICK if args.quick else FULL)
    cfg["seeds"], cfg["quick"] = args.seeds or cfg["seeds"], args.quick
    t0 = time.perf_counter()
    zoo, zoo_seconds = build_zoo(cfg)
    extra = {**zoo_speedup(cfg), "zoo_train_seconds": zoo_seconds}
    episodes = test_episodes(cfg)
    raw: dict = {"config": cfg, "free_args": FREE_ARGS, "alignment": ALIGN, "rows": {}, "training": {}}
    rows = raw["rows"]

    def save() -> dict:
        return write(args, raw, {**extra, "zoo": zoo, "zoo_dir": str(zoo), "wall_seconds": time.perf_counter() - t0})

    if 0 in cfg["seeds"]:  # deterministic: scored once, by the run that has seed 0
        rows["averaging"] = {0: score(averaged_teachers(zoo, cfg), episodes)}
    for seed in cfg["seeds"]:  # floor and ceiling first: an interrupted run still has the protocol's validity
        torch.manual_seed(seed)
        rows.setdefault("random_init", {})[seed] = score(transductive(Conv4(1, 32, N_WAY, cfg["size"])), episodes)
        n_updates = (cfg["steps"] - cfg["warmup"]) * cfg["replay_batches"]
        learner, info = train_real(cfg, seed, n_updates)
        rows.setdefault("real_data", {})[seed] = score(learner, episodes)
        raw["training"][f"real_data/{seed}"] = info
        save()
        for row, alignment, first_order in (("free", True, False), ("no_alignment", False, False),
                                            ("free_first_order", True, True)):
            module, info = train_free(zoo, cfg, seed, row, alignment, first_order)
            rows.setdefault(row, {})[seed] = score(module.learner, episodes)
            raw["training"][f"{row}/{seed}"] = info
            print(f"seed {seed} {row}: val {info['val_curve']} in {info['train_seconds']:.0f} s", flush=True)
            if row == "free":  # the meta-generator of every training seed
                raw.setdefault("recovery", {})[seed] = recovery(module.generator.state_dict(), zoo, cfg)
            save()
    result = save()
    if "acc" not in result:  # a run without seed 0 (no averaging row): summarised by --merge
        return
    print(f"{'row':18s} {'1-shot':>16s} {'5-shot':>16s}")
    for row, shots in result["acc"].items():
        print(f"{row:18s} " + " ".join(f"{shots[s]['mean']:.3f} +- {shots[s]['ci95']:.3f}" for s in ("1", "5")))
    print({k: result[k] for k in ("recovery_speedup_steps", "recovery_speedup_seconds", "zoo_speedup",
                                  "gap_closed_by_free", "wall_seconds")})


if __name__ == "__main__":
    main()
