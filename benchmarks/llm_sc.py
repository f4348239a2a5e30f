"""LLM-SC vs its baselines on held-out CPython-docs sentences, SmolLM2-135M-Instruct as the prior.

Every receiver sees the same transmitted words and the same noise (keyed by seed, batch and SNR):
``llm_sc`` (MAP beam search, width 10), ``greedy`` (width 1), ``ml`` (prior off), ``uncoded``
(hard decisions), and DeepSC (trained here, one model per channel, on the training documents).
Channels AWGN and Rayleigh fast fading (perfect CSI), modulations 8-QAM (release star) and 16-QAM.

    OMP_NUM_THREADS=1 python benchmarks/llm_sc.py --out benchmarks/results/llm_sc.json   # full (~25 min alone)
    OMP_NUM_THREADS=1 python benchmarks/llm_sc.py --quick --out /tmp/llm_sc_quick.json  # smoke run

JSON keys: ``ber``, ``ter``, ``bleu1``, ``bleu4``, ``similarity`` as [system][channel][modulation][snr]
(DeepSC's own learned code ignores the modulation: both entries hold the same run); each value is the
mean over sentences, ``ci95`` holds the half widths; ``awgn_uncoded_ber`` (and ``_theory``) for BPSK,
QPSK, 16-QAM; ``coding_gain_db_at_ber_1e-3``; ``deepsc_crossover_db``; ``speed``; ``protocol_validity``
(ceiling - floor of each text metric); ``targets``; ``settings``. Raw per-sentence rows:
``<out stem>_raw.jsonl``. DeepSC checkpoints are cached under ``--cache`` by a hash of their settings.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from core.fading_channel import transmit, uncoded_ber_awgn  # noqa: E402
from core.map_beam_decoder import map_beam_decode  # noqa: E402
from core.packaged_models import resolve_model  # noqa: E402
from core.rng import keyed_generator  # noqa: E402
from core.semantic_link import run_link  # noqa: E402
from core.sequence_priors import CausalLMPrior  # noqa: E402
from core.text_metrics import SentenceSimilarity, normalise, sentence_scores  # noqa: E402
from core.token_modem import TokenModem, ids_to_bits  # noqa: E402
from datamodules.llm_sc import DeepSCDataModule, LLMSCDataModule, collate_tokens  # noqa: E402
from datamodules.sources import smollm2_path  # noqa: E402
from lit_modules.llm_sc import load_causal_lm  # noqa: E402
from lit_modules.llm_sc_deepsc import DeepSCModule  # noqa: E402

CHANNELS = {"awgn": "awgn", "rayleigh": "fast"}
MODULATIONS = ("8qam", "16qam")
LLM_SYSTEMS = ("llm_sc", "greedy", "ml", "uncoded")
METRICS = ("ber", "ter", "bleu1", "bleu4", "similarity")
DEEPSC = dict(d_model=64, num_heads=4, dff=256, num_layers=2, dropout=0.1, train_snr_db=(0.0, 20.0), lr=1e-3)


def settings(quick: bool) -> dict:
    grid = [0, 4, 8, 12, 16, 20] if quick else list(range(0, 21, 2))
    # Sized for the shared 2-core machine: the beam-10 SmolLM2 decoder costs ~50 GFLOP per sentence and SNR.
    return {"sentences": 4 if quick else 12, "batch_size": 4 if quick else 12, "beam_width": 10,
            "snr_grid_db": grid, "llm_snr_grid_db": [0, 8, 16] if quick else [0, 4, 8, 12, 16, 20],
            "uncoded_check_bits": 20_000 if quick else 1_200_000, "deepsc_epochs": 2 if quick else 25,
            "deepsc": DEEPSC, "seed": 0, "speed_sentences": 2 if quick else 4, "candidate_topk": None}


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and 95 % normal half width over sentences."""
    n = len(values)
    m = sum(values) / n
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return m, 1.96 * sd / math.sqrt(n)


def ratio_ci(errors: list[float], totals: list[float]) -> tuple[float, float]:
    """Pooled error rate sum(e)/sum(b) and its 95 % half width, sentences as clusters (ratio estimator)."""
    n, tot = len(errors), sum(totals)
    r = sum(errors) / tot
    var = sum((e - r * b) ** 2 for e, b in zip(errors, totals, strict=True)) / max(n - 1, 1) * n / tot**2
    return r, 1.96 * math.sqrt(var)


def uncoded_check(bits: int, seed: int) -> tuple[dict, dict]:
    """Empirical uncoded BER over AWGN (>= ``bits`` bits per point) and its closed form."""
    emp: dict = {}
    theory: dict = {}
    for mod in ("bpsk", "qpsk", "16qam"):
        modem = TokenModem(2**12, mod)
        tokens = -(-bits // 12)
        emp[mod], theory[mod] = {}, {}
        for snr in range(0, 13, 2):
            g = keyed_generator(seed, 7, snr)
            ids = torch.randint(0, 2**12, (tokens,), generator=g)
            y, _, _ = transmit(modem.modulate(ids)[None], float(snr), modem.es, "awgn", g)
            errors = int((modem.hard_bits(y[0]) != ids_to_bits(ids, 12)).sum())
            emp[mod][str(snr)] = errors / (tokens * 12)
            theory[mod][str(snr)] = float(uncoded_ber_awgn(mod, torch.tensor(float(snr))))
    return emp, theory


def train_deepsc(channel: str, epochs: int, cache: Path, seed: int) -> tuple[DeepSCModule, DeepSCDataModule, dict]:
    """DeepSC for one channel, trained on the training documents (reused from ``cache`` by settings hash)."""
    key = hashlib.sha256(json.dumps([DEEPSC, channel, epochs, seed, "pydoc", 1], sort_keys=True).encode()).hexdigest()[:16]
    ckpt = cache / f"deepsc_{channel}_{key}.ckpt"
    dm = DeepSCDataModule(source="pydoc", batch_size=32)
    module = DeepSCModule(channel=channel, eval_snr_db=[10.0], seed=seed, **DEEPSC)
    L.seed_everything(seed, verbose=False)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, default_root_dir=cache)
    info = {"checkpoint": ckpt.name, "epochs": epochs}
    if ckpt.is_file():
        dm.setup("fit")
        module.trainer = trainer  # configure_model reads the vocabulary from the datamodule
        trainer.datamodule = dm
        module.configure_model()
        module.load_state_dict(torch.load(ckpt, weights_only=True))
        info["cached"] = True
    else:
        start = time.time()
        trainer.fit(module, dm)
        info.update(cached=False, train_seconds=round(time.time() - start, 1))
        cache.mkdir(parents=True, exist_ok=True)
        torch.save(module.state_dict(), ckpt.with_suffix(".tmp"))
        ckpt.with_suffix(".tmp").replace(ckpt)
    info["parameters"] = sum(p.numel() for p in module.net.parameters())
    module.eval()
    return module, dm, info


def deepsc_rows(module: DeepSCModule, dm: DeepSCDataModule, texts: list[str], grid: list[int], seed: int,
                similarity: SentenceSimilarity) -> list[dict]:
    """DeepSC on the same test sentences (normalised words, unknown ones -> <UNK>) at every SNR."""
    vocab = dm.vocab
    src = torch.nn.utils.rnn.pad_sequence([vocab.encode(normalise(t)) for t in texts], batch_first=True)
    rows = []
    for snr in grid:
        hyps = module.decode(src, float(snr), keyed_generator(seed, 11, snr))
        scores = sentence_scores(texts, hyps, similarity)
        for i, hyp in enumerate(hyps):
            rows.append({"snr": snr, "sentence": i, "hypothesis": hyp, **{k: float(v[i]) for k, v in scores.items()}})
    return rows


def llm_rows(systems: tuple[str, ...], modem: TokenModem, prior: CausalLMPrior, tok, data: LLMSCDataModule,
             fading: str, grid: list[int], cfg: dict, similarity: SentenceSimilarity, bar: tqdm) -> list[dict]:
    """Per-sentence results of the token receivers at every SNR of ``grid``."""
    rows = []
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    for b, batch in enumerate(data.test_dataloader()):
        ids, lengths = batch["ids"], batch["lengths"]
        prompt = torch.full_like(ids[:, :1], start)
        for snr in grid:
            for system in systems:
                gen = keyed_generator(cfg["seed"], b, snr * 100)  # same noise for every receiver
                res = run_link(system, modem, prior, ids, lengths, prompt, float(snr), fading, gen, cfg["beam_width"],
                               cfg["candidate_topk"], pad_id=0)
                hyps = [tok.decode([min(i, modem.vocab_size - 1) for i in hat[:n]])
                        for hat, n in zip(res.ids.tolist(), lengths.tolist(), strict=True)]
                scores = sentence_scores(batch["text"], hyps, similarity)
                for i, hyp in enumerate(hyps):
                    rows.append({"system": system, "snr": snr, "sentence": b * cfg["batch_size"] + i,
                                 "bit_errors": int(res.bit_errors[i]), "bits": int(res.bits[i]),
                                 "token_errors": int(res.token_errors[i]), "tokens": int(res.tokens[i]),
                                 "hypothesis": hyp, **{k: float(v[i]) for k, v in scores.items()}})
                bar.update(1)
    return rows


def speed(modem: TokenModem, lm, data: LLMSCDataModule, cfg: dict) -> dict:
    """Tokens/s of the beam decoder with KV-cache reuse, with prefix recomputation, and at beam 1."""
    batch = collate_tokens(data.rows[-cfg["speed_sentences"]:])
    ids, lengths = batch["ids"], batch["lengths"]
    y, h, n0 = transmit(modem.modulate(ids), 8.0, modem.es, "awgn", keyed_generator(cfg["seed"], 99))
    prompt = torch.zeros_like(ids[:, :1])
    out, hyps = {}, {}
    for name, use_cache, width in (("beam10_cache", True, 10), ("beam10_recompute", False, 10), ("beam1_cache", True, 1)):
        start = time.perf_counter()
        hyps[name] = map_beam_decode(CausalLMPrior(lm, use_cache), modem, y, None, n0, lengths, prompt, width)[0]
        out[f"tokens_per_s_{name}"] = float(lengths.sum()) / (time.perf_counter() - start)
    out["cache_speedup"] = out["tokens_per_s_beam10_cache"] / out["tokens_per_s_beam10_recompute"]
    out["beam1_over_beam10"] = out["tokens_per_s_beam1_cache"] / out["tokens_per_s_beam10_cache"]
    out["same_hypotheses_cache_vs_recompute"] = bool(torch.equal(hyps["beam10_cache"], hyps["beam10_recompute"]))
    out["sentences"], out["tokens"] = len(lengths), int(lengths.sum())
    return out


def crossing(points: dict[int, float], level: float, floor: float) -> float | None:
    """Lowest SNR where a decreasing curve reaches ``level`` (log-linear interpolation; 0 -> ``floor``)."""
    snrs = sorted(points)
    vals = [max(points[s], floor) for s in snrs]
    for (s0, v0), (s1, v1) in zip(zip(snrs, vals), zip(snrs[1:], vals[1:]), strict=False):
        if v0 > level >= v1:
            return s0 + (s1 - s0) * (math.log10(v0) - math.log10(level)) / (math.log10(v0) - math.log10(v1))
    return snrs[0] if vals[0] <= level else None


def rise_crossing(a: dict[int, float], b: dict[int, float]) -> dict:
    """SNR from which curve ``a`` stays at or above ``b`` (linear interpolation of a - b)."""
    snrs = sorted(set(a) & set(b))
    diff = [a[s] - b[s] for s in snrs]
    below = [i for i, d in enumerate(diff) if d < 0]
    if not below:
        return {"snr_db": None, "a_above_everywhere": True, "a_below_at_top": False}
    i = below[-1]
    if i == len(snrs) - 1:
        return {"snr_db": None, "a_above_everywhere": False, "a_below_at_top": True}
    s0, s1, d0, d1 = snrs[i], snrs[i + 1], diff[i], diff[i + 1]
    return {"snr_db": s0 + (s1 - s0) * (-d0) / (d1 - d0), "a_above_everywhere": False, "a_below_at_top": False}


def summarise(rows: list[dict], metric: str) -> tuple[float, float]:
    if metric == "ber":
        return ratio_ci([r["bit_errors"] for r in rows], [r["bits"] for r in rows])
    if metric == "ter":
        return ratio_ci([r["token_errors"] for r in rows], [r["tokens"] for r in rows])
    return mean_ci([r[metric] for r in rows])


def aggregate(rows: list[dict]) -> tuple[dict, dict]:
    """``metric -> system -> channel -> modulation -> snr`` means and 95 % half widths."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["system"], r["channel"], r["modulation"], str(r["snr"])), []).append(r)
    mean: dict = {m: {} for m in METRICS}
    ci: dict = {m: {} for m in METRICS}
    for (system, channel, mod, snr), group in sorted(groups.items()):
        for metric in METRICS:
            if metric in group[0] or (metric in ("ber", "ter") and "bits" in group[0]):
                m, h = summarise(group, metric)
                mean[metric].setdefault(system, {}).setdefault(channel, {}).setdefault(mod, {})[snr] = m
                ci[metric].setdefault(system, {}).setdefault(channel, {}).setdefault(mod, {})[snr] = h
    return mean, ci


def analyse(mean: dict, rows: list[dict]) -> tuple[dict, dict, dict]:
    """Coding gain at BER 1e-3, DeepSC crossover in BLEU-1, and the issue's targets."""
    gain, cross, targets = {}, {}, {}
    for channel in CHANNELS:
        for mod in MODULATIONS:
            name = f"{channel}_{mod}"
            ber = {s: {int(k): v for k, v in mean["ber"][s][channel][mod].items()} for s in ("llm_sc", "uncoded")}
            bits = min(sum(r["bits"] for r in rows if r["system"] == "llm_sc" and r["channel"] == channel
                           and r["modulation"] == mod and r["snr"] == s) for s in ber["llm_sc"])
            llm, unc = crossing(ber["llm_sc"], 1e-3, 0.5 / bits), crossing(ber["uncoded"], 1e-3, 0.5 / bits)
            gain[name] = {"llm_sc_snr_db": llm, "uncoded_snr_db": unc,
                          "gain_db": None if llm is None or unc is None else unc - llm,
                          "ber_resolution": 1.0 / bits}
            b1 = {s: {int(k): v for k, v in mean["bleu1"][s][channel][mod].items()} for s in ("llm_sc", "deepsc")}
            cross[name] = rise_crossing(b1["llm_sc"], b1["deepsc"])
            top = max(b1["llm_sc"])
            targets[name] = {
                "llm_ber_below_uncoded_from_4db": all(v < ber["uncoded"][s] for s, v in ber["llm_sc"].items() if s >= 4),
                "llm_above_deepsc_bleu1_at_top_snr": b1["llm_sc"][top] > b1["deepsc"][top],
                "llm_error_free_bleu1_at_top_snr": b1["llm_sc"][top] >= 0.99,
            }
    return gain, cross, targets


def validity(texts: list[str], similarity: SentenceSimilarity) -> dict:
    """Ceiling (the sent sentence) and floor (another test sentence) of each text metric, same code."""
    ceiling = sentence_scores(texts, texts, similarity)
    floor = sentence_scores(texts, texts[1:] + texts[:1], similarity)
    return {k: {"ceiling": float(ceiling[k].mean()), "floor": float(floor[k].mean()),
                "ceiling_minus_floor": float(ceiling[k].mean() - floor[k].mean())} for k in ceiling}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny grid and 4 sentences (smoke run)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/llm_sc.json"))
    parser.add_argument("--cache", type=Path, default=Path("runs/llm_sc/benchmark_cache"),
                        help="DeepSC checkpoints, keyed by a hash of their settings")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = settings(args.quick)
    t0 = time.time()
    emp, theory = uncoded_check(cfg["uncoded_check_bits"], cfg["seed"])
    smollm2_path()
    tok, lm = load_causal_lm("smollm2", "float32", False, "smollm2")
    data = LLMSCDataModule(tokenizer="smollm2", num_test=cfg["sentences"], batch_size=cfg["batch_size"],
                           seed=cfg["seed"])
    data.setup("test")
    texts = [r["text"] for r in data.rows]
    similarity = SentenceSimilarity(resolve_model("minilm"))
    grid, llm_grid = cfg["snr_grid_db"], cfg["llm_snr_grid_db"]
    batches = -(-len(data.rows) // cfg["batch_size"])
    bar = tqdm(total=len(CHANNELS) * len(MODULATIONS) * batches * (2 * len(llm_grid) + 2 * len(grid)), desc="links")
    rows: list[dict] = []
    for channel, fading in CHANNELS.items():
        for mod in MODULATIONS:
            modem = TokenModem(len(tok), mod)
            prior = CausalLMPrior(lm)
            for systems, snrs in ((("llm_sc", "greedy"), llm_grid), (("ml", "uncoded"), grid)):
                for r in llm_rows(systems, modem, prior, tok, data, fading, snrs, cfg, similarity, bar):
                    rows.append({"channel": channel, "modulation": mod, **r})
    bar.close()
    deepsc_info = {}
    for channel, fading in CHANNELS.items():
        module, dm, deepsc_info[channel] = train_deepsc(fading, cfg["deepsc_epochs"], args.cache, cfg["seed"])
        unk = sum(int((dm.vocab.encode(normalise(t)) == dm.vocab.unk_id).sum()) for t in texts)
        deepsc_info[channel]["test_unknown_word_rate"] = unk / sum(len(normalise(t).split()) for t in texts)
        for r in deepsc_rows(module, dm, texts, grid, cfg["seed"], similarity):
            rows.extend({"system": "deepsc", "channel": channel, "modulation": mod, **r} for mod in MODULATIONS)
    mean, ci = aggregate(rows)
    gain, cross, targets = analyse(mean, rows)
    modem = TokenModem(len(tok), "8qam")
    result = {
        **mean, "ci95": ci, "awgn_uncoded_ber": emp, "awgn_uncoded_ber_theory": theory,
        "coding_gain_db_at_ber_1e-3": gain, "deepsc_crossover_db": cross, "targets": targets,
        "speed": speed(modem, lm, data, cfg), "protocol_validity": validity(texts, similarity),
        "deepsc": deepsc_info,
        "settings": {**cfg, "quick": args.quick, "model": "SmolLM2-135M-Instruct (fp32)", "vocab_size": len(tok),
                     "bits_per_token": modem.n_bits, "symbols_per_token": {m: TokenModem(len(tok), m).symbols_per_token
                                                                          for m in MODULATIONS},
                     "snr": "Es/N0 per complex symbol (nominal Es), dB; Eb/N0 = Es/N0 - 10 log10(rate)",
                     "ebn0_offset_db": {m: TokenModem(len(tok), m).ebn0_db(0.0) for m in MODULATIONS},
                     "test_sentences": texts, "threads": args.threads, "wall_seconds": None},
    }
    result["settings"]["wall_seconds"] = round(time.time() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    raw = args.out.with_name(args.out.stem + "_raw.jsonl")
    raw.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args.out.write_text(json.dumps(result, indent=1))
    print_table(mean, gain, cross, result["speed"], result["settings"]["wall_seconds"])


def print_table(mean: dict, gain: dict, cross: dict, spd: dict, wall: float) -> None:
    for channel in CHANNELS:
        for mod in MODULATIONS:
            print(f"\n{channel} {mod}: BER / BLEU-1 per system")
            for system in ("llm_sc", "greedy", "ml", "uncoded", "deepsc"):
                ber = mean["ber"].get(system, {}).get(channel, {}).get(mod, {})
                b1 = mean["bleu1"][system][channel][mod]
                print(f"  {system:8s}", " ".join(f"{s}:{ber.get(s, float('nan')):.1e}/{v:.2f}" for s, v in b1.items()))
            name = f"{channel}_{mod}"
            print(f"  coding gain @1e-3: {gain[name]['gain_db']}  DeepSC crossover: {cross[name]}")
    print(f"\ncache speedup {spd['cache_speedup']:.1f}x, beam1/beam10 {spd['beam1_over_beam10']:.1f}x; wall {wall:.0f} s")


if __name__ == "__main__":
    main()
