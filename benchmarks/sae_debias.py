"""SAE Debias end to end on the offline demo world: image-level gender bias before and after, 3 seeds.

Stages (each cached under ``--cache``/<stage>-<hash of its settings>, default runs/sae_debias/benchmark_cache):
1. the biased tiny text-to-image model (pixel-space UNet on the frozen all-MiniLM-L6-v2; trained once);
2. the attribute classifier (Conv4 on clean glyph renders; trained once);
3. per seed: the TopK SAE and its direction banks (SAE, dense mean difference, random latents), then
   images of neutral prompts ("a photo of a {p}") for every profession with the same noise seeds for
   every row: ``none``, ``sae`` and ``dense`` (lambda sweeps), ``sae_random`` (at sae's lambda),
   ``prompt`` ("..., male or female") and ``prompt_random`` (a random explicit gender word per image:
   the ceiling of the protocol; ``none`` is its floor).
lambda is chosen per seed on the training professions only (lowest bias with profession accuracy within
5 points of ``none``) and reported for the training and the held-out professions.

    OMP_NUM_THREADS=1 python benchmarks/sae_debias.py --out benchmarks/results/sae_debias.json   # full
    OMP_NUM_THREADS=1 python benchmarks/sae_debias.py --quick --out /tmp/sae_debias_quick.json  # smoke

JSON keys: ``bias``, ``profession_acc``, ``quality`` (classifier confidence) and ``frechet``, each
``[split][row] = {mean, std}`` over seeds; ``probe_bias[split][row]`` (embedding space); ``sweep``;
``sae`` (mse, explained_variance, dead_fraction, pca_explained_variance with k components);
``hook_overhead``; ``diagnosis`` (:func:`diagnose`); ``protocol_validity``; ``targets``; ``settings``; raw per-seed rows in ``*_raw.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from tqdm import tqdm  # noqa: E402

from core.attribute_eval import image_metrics, read_attributes, train_attribute_classifier  # noqa: E402
from core.bias_directions import DirectionBank  # noqa: E402
from core.conv4 import Conv4  # noqa: E402
from core.gender_probe import GenderProbe, bias_of, conditioning  # noqa: E402
from core.pixel_pipeline import generate  # noqa: E402
from core.text_layers import layer_features  # noqa: E402
from datamodules.sae_debias import HELDOUT_PROFESSIONS, TRAIN_PROFESSIONS, SAECorpusDataModule  # noqa: E402
from datamodules.sae_debias_images import BiasedCaptionsDataModule  # noqa: E402
from lit_modules.sae_debias import SAEDebiasModule  # noqa: E402
from lit_modules.sae_debias_plots import plot_grid, plot_sweeps  # noqa: E402
from lit_modules.sae_debias_t2i import GlyphT2IModule  # noqa: E402
from train import cli_main  # noqa: E402

SPLITS = {"train": list(TRAIN_PROFESSIONS), "heldout": list(HELDOUT_PROFESSIONS)}
PROFESSIONS = SPLITS["train"] + SPLITS["heldout"]
FULL = {"t2i_steps": 800, "sae_epochs": 10, "images": 16, "seeds": [0, 1, 2], "strengths": [0.5, 1.0, 1.5],
        "layer": 4, "k": 32, "expansion": 4, "sae_lr": 2e-3, "classifier_steps": 400}
QUICK = {**FULL, "t2i_steps": 40, "sae_epochs": 1, "images": 2, "seeds": [0], "strengths": [1.0],
         "classifier_steps": 40}


def key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def trainer(root: Path, **kw) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                     enable_model_summary=False, default_root_dir=str(root), num_sanity_val_steps=0, **kw)


T2I_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "sae_debias" / "demo_t2i.yaml"
PER_RUN = ("bank", "strength", "samples_per_profession")  # drawing options of the demo, not the model


def t2i_settings(config: dict, steps: int) -> dict:
    """What produces the T2I weights: the demo config's model and data arguments, steps and seed."""
    model = {k: v for k, v in config["model"]["init_args"].items() if k not in PER_RUN}
    return {"model": model, "data": config["data"]["init_args"], "steps": steps, "seed": config["seed_everything"]}


def t2i_model(cache: Path, cfg: dict, reuse: Path | None) -> tuple[GlyphT2IModule, BiasedCaptionsDataModule]:
    """The demo's T2I stage (configs/sae_debias/demo_t2i.yaml), trained once per settings hash; ``reuse``: a
    demo run directory whose resolved config.yaml has the same settings (its UNet is copied, not retrained)."""
    own = yaml.safe_load(T2I_CONFIG.read_text())
    settings = t2i_settings(own, cfg["t2i_steps"])
    folder = cache / f"t2i-{key(settings)}"
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    if not weights.is_file() and reuse is not None:
        run = yaml.safe_load((reuse / "config.yaml").read_text())
        theirs = t2i_settings(run, run["trainer"]["max_steps"])
        same = {part: {k: theirs[part][k] for k in settings[part]} for part in ("model", "data")}
        if {**theirs, **same} != settings:
            raise ValueError(f"--reuse-t2i {reuse}: its config differs from {T2I_CONFIG.name} x {cfg['t2i_steps']} steps")
        shutil.copytree(reuse / "unet", folder / "unet")
        (folder / "reused_from.txt").write_text(str(reuse))
    if not weights.is_file():
        cli_main(["fit", "--config", str(T2I_CONFIG), f"--trainer.max_steps={cfg['t2i_steps']}", "--trainer.logger=false",
                  "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={folder}",
                  "--model.init_args.samples_per_profession=2"])
    (folder / "settings.json").write_text(json.dumps(settings, indent=1))
    module = GlyphT2IModule(**settings["model"])
    module.unet.load_state_dict(load_file(str(weights)))
    return module.eval(), BiasedCaptionsDataModule(**settings["data"])


def classifier(cache: Path, data: BiasedCaptionsDataModule, cfg: dict) -> Conv4:
    settings = {"steps": cfg["classifier_steps"], "per_combination": 40, "seed": 1}
    path = cache / f"classifier-{key(settings)}.safetensors"
    images, prof, gender = data.clean_set(settings["per_combination"], settings["seed"])
    model = Conv4(2, 32, len(data.professions) + 2, data.hparams.size)
    if path.is_file():
        model.load_state_dict(load_file(str(path)))
        return model.eval()
    model = train_attribute_classifier((images + 1) / 2, prof, gender, steps=settings["steps"])
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), str(path))
    return model


def train_sae(cache: Path, cfg: dict, seed: int) -> tuple[SAEDebiasModule, SAECorpusDataModule, dict]:
    L.seed_everything(seed)
    module = SAEDebiasModule(layer=cfg["layer"], k=cfg["k"], expansion=cfg["expansion"], lr=cfg["sae_lr"])
    data = SAECorpusDataModule(seed=seed)
    trainer(cache / f"sae-seed{seed}", max_epochs=cfg["sae_epochs"]).fit(module, datamodule=data)
    return module, data, sae_quality(module, data, cfg["k"])


@torch.no_grad()
def sae_quality(module: SAEDebiasModule, data: SAECorpusDataModule, k: int) -> dict:
    """Validation-token MSE / explained variance of the SAE against PCA with k components (fit on train)."""
    def tokens(dataset):
        b = dataset.encoded
        h = layer_features(module.encoder, b["input_ids"], b["attention_mask"], module.hparams.layer)
        return h[b["attention_mask"].bool()]

    train, val = tokens(data.train_set), tokens(data.val_set)
    var = (val - val.mean(0)).pow(2).sum(-1).mean()
    err = (module.sae(val) - val).pow(2).sum(-1).mean()
    mean = train.mean(0)
    basis = torch.linalg.svd(train - mean, full_matrices=False).Vh[:k]
    pca = ((val - mean) @ basis.T @ basis + mean - val).pow(2).sum(-1).mean()
    dead = (module.sae.encode(torch.cat([train, val])) > 0).sum(0) == 0
    return {"mse": float(err / val.shape[-1]), "explained_variance": float(1 - err / var),
            "dead_fraction": float(dead.float().mean()), "pca_explained_variance": float(1 - pca / var)}


@torch.no_grad()
def diagnose(module: SAEDebiasModule, bank: DirectionBank) -> dict:
    """Why the edit costs profession accuracy, in text space (training professions only):
    ``direction_cosine``: mean cosine between the directions of two different professions (1: one shared
    direction); ``profession_token``: per profession, the coefficient <h_t - c, u_p> at the profession word's
    last token of "a photo of a {p}" (what the projection removes there) and the same coefficient's change
    between "a photo of a male {p}" and "... female {p}" (how much of it is gender)."""
    names = SPLITS["train"]
    u = torch.stack([bank.directions[p] for p in names])
    cos = u @ u.T
    coeff = {}
    for p in names:
        enc = module.tokenizer([f"a photo of a {p}", f"a photo of a male {p}", f"a photo of a female {p}"],
                               padding="max_length", max_length=module.tokenizer.model_max_length, return_tensors="pt")
        h = layer_features(module.encoder, enc.input_ids, enc.attention_mask, module.hparams.layer)
        last = enc.attention_mask.sum(1) - 2  # the token before [SEP]: the profession word's last piece
        c = ((h[torch.arange(3), last] - bank.origin) @ bank.directions[p]).tolist()
        coeff[p] = {"neutral": c[0], "male_minus_female": c[1] - c[2]}
    return {"direction_cosine": float((cos.sum() - len(names)) / (len(names) * (len(names) - 1))),
            "profession_token": coeff,
            "mean_abs_neutral": float(np.mean([abs(v["neutral"]) for v in coeff.values()])),
            "mean_abs_gender_change": float(np.mean([abs(v["male_minus_female"]) for v in coeff.values()]))}


def evaluate(clf: Conv4, images: torch.Tensor, reference: dict[str, torch.Tensor], n: int) -> dict:
    """Per split: mean over professions of bias / accuracy / confidence, and the pooled Frechet distance."""
    labels = torch.arange(len(PROFESSIONS)).repeat_interleave(n)
    out = {}
    for split, names in SPLITS.items():
        rows = [image_metrics(clf, images[labels == PROFESSIONS.index(p)], labels[labels == PROFESSIONS.index(p)],
                              reference[split]) for p in names]
        mask = torch.isin(labels, torch.tensor([PROFESSIONS.index(p) for p in names]))
        pooled = image_metrics(clf, images[mask], labels[mask], reference[split])
        out[split] = {"bias": float(np.mean([r["bias"] for r in rows])),
                      "profession_acc": float(np.mean([r["profession_acc"] for r in rows])),
                      "quality": float(np.mean([r["confidence"] for r in rows])), "frechet": pooled["frechet"],
                      "p_male": {p: r["p_male"] for p, r in zip(names, rows)}}
    return out


def run_seed(seed: int, cfg: dict, cache: Path, t2i: GlyphT2IModule, clf: Conv4, reference: dict) -> dict:
    sae_module, sae_data, quality = train_sae(cache, cfg, seed)
    banks = sae_module.banks
    n = cfg["images"]
    neutral = [f"a photo of a {p}" for p in PROFESSIONS for _ in range(n)]
    seeds = [seed * 100_000 + i for i in range(n)] * len(PROFESSIONS)
    professions = [p for p in PROFESSIONS for _ in range(n)]
    gen = np.random.default_rng(seed)
    prompts = {"prompt": [f"a photo of a {p}, male or female" for p in professions],
               "prompt_random": [f"a photo of a {['female', 'male'][gen.integers(2)]} {p}" for p in professions]}
    rows, sweep, images = {}, {"sae": [], "dense": []}, {}
    images["none"] = generate(t2i.pipe, neutral, seeds, t2i.hparams.sample_steps, t2i.hparams.guidance)
    rows["none"] = evaluate(clf, images["none"], reference, n)
    for name in ("sae", "dense"):
        for strength in cfg["strengths"]:
            with t2i.debias_hook(banks[name], strength)(neutral, professions):
                imgs = generate(t2i.pipe, neutral, seeds, t2i.hparams.sample_steps, t2i.hparams.guidance)
            result = evaluate(clf, imgs, reference, n)
            sweep[name].append({"strength": strength, **result})
            images[f"{name}@{strength:g}"] = imgs
    chosen = {name: choose(sweep[name], rows["none"]) for name in sweep}
    for name in sweep:
        rows[name] = next(p for p in sweep[name] if p["strength"] == chosen[name])
    with t2i.debias_hook(banks["sae_random"], chosen["sae"])(neutral, professions):
        rows["sae_random"] = evaluate(clf, generate(t2i.pipe, neutral, seeds, t2i.hparams.sample_steps, t2i.hparams.guidance),
                                      reference, n)
    for name, texts in prompts.items():
        images[name] = generate(t2i.pipe, texts, seeds, t2i.hparams.sample_steps, t2i.hparams.guidance)
        rows[name] = evaluate(clf, images[name], reference, n)
    texts, male = sae_data.probe_set()
    probe = GenderProbe(conditioning(sae_module.encoder, sae_module.tokenizer, texts), male)
    neutral_sets = sae_data.neutral_set()
    probe_rows = {row: sae_module.probe_bias(probe, neutral_sets, banks.get(row), chosen.get(row, chosen["sae"]))
                  for row in ("none", "sae", "dense", "sae_random")}
    probe_bias = {split: {row: float(np.mean([bias_of(v[p]) for p in names])) for row, v in probe_rows.items()}
                  for split, names in SPLITS.items()}
    return {"seed": seed, "rows": rows, "sweep": sweep, "chosen": chosen, "sae": quality, "probe_bias": probe_bias,
            "diagnosis": diagnose(sae_module, banks["sae"]),
            "hook_overhead": hook_overhead(t2i, banks["sae"], cfg), "images": images}


def choose(points: list[dict], none: dict) -> float:
    """Lowest training-profession bias among strengths within 5 accuracy points of no intervention."""
    ok = [p for p in points if p["train"]["profession_acc"] >= none["train"]["profession_acc"] - 0.05] or points[:1]
    return min(ok, key=lambda p: p["train"]["bias"])["strength"]


def hook_overhead(t2i: GlyphT2IModule, bank: DirectionBank, cfg: dict, reps: int = 3) -> float:
    prompts, seeds = [f"a photo of a {p}" for p in PROFESSIONS] * 4, list(range(4 * len(PROFESSIONS)))

    def timed(hook) -> float:
        best = float("inf")
        for _ in range(reps):
            start = time.perf_counter()
            if hook is None:
                generate(t2i.pipe, prompts, seeds, t2i.hparams.sample_steps, t2i.hparams.guidance)
            else:
                with hook(prompts):
                    generate(t2i.pipe, prompts, seeds, t2i.hparams.sample_steps, t2i.hparams.guidance)
            best = min(best, time.perf_counter() - start)
        return best

    return timed(t2i.debias_hook(bank, 1.0)) / timed(None)


def summarise(per_seed: list[dict]) -> dict:
    def stat(values):
        return {"mean": float(np.mean(values)), "std": float(np.std(values))}

    rows = list(per_seed[0]["rows"])
    out = {metric: {split: {row: stat([s["rows"][row][split][metric] for s in per_seed]) for row in rows}
                    for split in SPLITS} for metric in ("bias", "profession_acc", "quality", "frechet")}
    out["probe_bias"] = {split: {row: stat([s["probe_bias"][split][row] for s in per_seed])
                                 for row in per_seed[0]["probe_bias"][split]} for split in SPLITS}
    out["sweep"] = {name: [{"strength": p["strength"], **{f"{split}_{m}": stat([s["sweep"][name][i][split][m]
                                                                                 for s in per_seed])
                                                            for split in SPLITS for m in ("bias", "profession_acc")}}
                           for i, p in enumerate(per_seed[0]["sweep"][name])] for name in ("sae", "dense")}
    out["chosen_strength"] = {name: [s["chosen"][name] for s in per_seed] for name in ("sae", "dense")}
    out["sae"] = {m: stat([s["sae"][m] for s in per_seed]) for m in per_seed[0]["sae"]}
    out["hook_overhead"] = stat([s["hook_overhead"] for s in per_seed])
    out["diagnosis"] = {m: stat([s["diagnosis"][m] for s in per_seed])
                        for m in ("direction_cosine", "mean_abs_neutral", "mean_abs_gender_change")}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (one seed, few steps)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/sae_debias.json"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=Path("runs/sae_debias/benchmark_cache"))
    parser.add_argument("--reuse-t2i", type=Path, default=None,
                        help="a demo_t2i run directory with the same settings: reuse its UNet instead of training")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = QUICK if args.quick else FULL
    cache = args.cache
    start = time.perf_counter()
    t2i, data = t2i_model(cache, cfg, args.reuse_t2i)
    clf = classifier(cache, data, cfg)
    ref_images, ref_prof, _ = data.clean_set(24, seed=2)
    feats = read_attributes(clf, (ref_images + 1) / 2)["features"]
    reference = {s: feats[torch.isin(ref_prof, torch.tensor([PROFESSIONS.index(p) for p in names]))]
                 for s, names in SPLITS.items()}
    per_seed = [run_seed(seed, cfg, cache, t2i, clf, reference) for seed in tqdm(cfg["seeds"], desc="seeds")]
    result = summarise(per_seed)
    b, acc = result["bias"], result["profession_acc"]
    result["protocol_validity"] = {s: b[s]["none"]["mean"] - b[s]["prompt_random"]["mean"] for s in SPLITS}
    result["targets"] = {
        "heldout_bias_reduction": 1 - b["heldout"]["sae"]["mean"] / max(b["heldout"]["none"]["mean"], 1e-9),
        "heldout_bias_halved": b["heldout"]["sae"]["mean"] <= 0.5 * b["heldout"]["none"]["mean"],
        "heldout_acc_within_5pts": acc["heldout"]["sae"]["mean"] >= acc["heldout"]["none"]["mean"] - 0.05,
        "sae_at_least_dense_heldout": b["heldout"]["sae"]["mean"] <= b["heldout"]["dense"]["mean"]
        and acc["heldout"]["sae"]["mean"] >= acc["heldout"]["dense"]["mean"] - 0.05,
        "sae_beats_pca": result["sae"]["explained_variance"]["mean"] > result["sae"]["pca_explained_variance"]["mean"],
        "hook_overhead_le_1.05": result["hook_overhead"]["mean"] <= 1.05}
    result["settings"] = {**cfg, "quick": args.quick, "threads": args.threads, "train_professions": SPLITS["train"],
                          "heldout_professions": SPLITS["heldout"], "wall_seconds": time.perf_counter() - start}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    raw = [{k: v for k, v in s.items() if k != "images"} for s in per_seed]
    args.out.with_name(args.out.stem + "_raw.json").write_text(json.dumps(raw, indent=1))
    n, first = cfg["images"], per_seed[0]
    shape = (len(PROFESSIONS), n, 2, 16, 16)
    show = ["none", f"sae@{first['chosen']['sae']:g}", f"dense@{first['chosen']['dense']:g}", "prompt_random"]
    plot_grid({k: first["images"][k].reshape(shape)[:, :6].numpy() for k in show}, PROFESSIONS,
              args.out.with_name(args.out.stem + "_samples.png"))
    plot_sweeps({name: [{"strength": p["strength"], "bias": p["heldout_bias"]["mean"],
                         "profession_acc": p["heldout_profession_acc"]["mean"]} for p in result["sweep"][name]]
                 for name in ("sae", "dense")},
                {row: {"bias": b["heldout"][row]["mean"], "profession_acc": acc["heldout"][row]["mean"]}
                 for row in ("none", "prompt", "prompt_random", "sae_random")},
                args.out.with_name(args.out.stem + "_sweep.png"))
    for split in SPLITS:
        print(f"{split:8s} " + "  ".join(f"{row}: bias {b[split][row]['mean']:.3f} acc {acc[split][row]['mean']:.3f}"
                                        for row in b[split]))
    print(json.dumps(result["targets"]), f"wall {result['settings']['wall_seconds']:.0f}s")


if __name__ == "__main__":
    main()
