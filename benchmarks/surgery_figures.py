"""Figures of ``benchmarks/surgery.py``: learning curves, per-layer representation bias, the table."""

from __future__ import annotations

import statistics
from pathlib import Path

from lit_modules.surgery_report import plot_bias, plot_table


def draw(result: dict, raws: list[dict], stem: Path, merges: list[str], variants: tuple[str, ...]) -> list[str]:
    """Curves (accuracy vs step per merge), per-layer bias (merged vs + V1 vs + V2, task arithmetic), the table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(merges), figsize=(3.2 * len(merges), 3), sharey=True)
    for ax, m in zip(axes, merges):
        for v in variants:
            points = result["curves"][m][v]
            ax.plot([int(s) for s in points], [100 * a for a in points.values()], marker="o", label=v)
        ax.axhline(100 * result["acc_experts"]["mean"], ls="--", c="k", lw=0.8, label="experts")
        ax.axhline(100 * result["acc_zero_shot"]["mean"], ls=":", c="gray", lw=0.8, label="zero-shot")
        ax.set_title(m)
        ax.set_xlabel("step")
    axes[0].set_ylabel("mean test accuracy (%)")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    curves = stem.with_name(stem.name + "_curves.png")
    fig.savefig(curves, dpi=110)
    plt.close(fig)
    bias = {label: [statistics.fmean(r["bias"]["ta"][key][i] for r in raws) for i in range(len(raws[0]["bias"]["ta"][key]))]
            for label, key in (("merged (TA)", "plain"), ("+ Surgery V1", "surgery"), ("+ V1 matched", "surgery_matched"),
                               ("+ SurgeryV2", "surgeryv2"))}
    bias_png = plot_bias(bias, stem.with_name(stem.name + "_bias.png"), "representation bias per layer (task arithmetic)")
    columns = {"plain": "acc_plain", "+ Surgery r16": "acc_surgery", "+ Surgery matched": "acc_surgery_matched",
               "+ SurgeryV2 r16": "acc_surgeryv2"}
    table = {m: {c: 100 * result[key][m]["mean"] for c, key in columns.items()} for m in merges}
    table["zero-shot"] = {"plain": 100 * result["acc_zero_shot"]["mean"]}
    table["experts"] = {"plain": 100 * result["acc_experts"]["mean"]}
    table_png = plot_table(table, stem.with_name(stem.name + "_table.png"), f"mean test accuracy (%), {len(raws)} seeds")
    return [str(p) for p in (curves, bias_png, table_png)]
