"""What a Surgery run leaves behind: the merged encoder and surgery modules as safetensors, a model card,
and two figures (per-layer representation bias; per-task accuracy of plain merge, corrected merge, experts).

The figures are drawn from :meth:`SurgeryModule.representation_report`; the benchmark draws the same
bias plot for merged vs merged + V1 vs merged + V2 and the table of every merge.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from core.model_card import write_model_card
from core.timm_models import export_weights


def free_folder(root: str | Path, name: str = "export") -> Path:
    """``root/name``, or ``root/name_1``, ``name_2``, ... : a new folder, never one an earlier run wrote."""
    root = Path(root)
    folder, n = root / name, 0
    while folder.exists():
        n += 1
        folder = root / f"{name}_{n}"
    folder.mkdir(parents=True)
    return folder


def level_names(levels: int) -> list[str]:
    return [f"block {i + 1}" for i in range(levels - 1)] + ["output"]


def plot_bias(curves: Mapping[str, Sequence[float]], path: str | Path, title: str) -> Path:
    """One line per model: the representation bias (mean |z - z_expert|) at every block and at the output."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, values in curves.items():
        ax.plot(range(len(values)), values, marker="o", label=label)
    ax.set_xticks(range(len(values)), level_names(len(values)))
    ax.set_ylabel("representation bias (L1 to expert)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_table(rows: Mapping[str, Mapping[str, float]], path: str | Path, title: str, fmt: str = "{:.1f}") -> Path:
    """A table of numbers as a figure (rows x columns, cells shaded by value): ``rows[row][column]``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    columns = list(next(iter(rows.values())))
    values = np.array([[rows[r].get(c, np.nan) for c in columns] for r in rows], dtype=float)
    fig, ax = plt.subplots(figsize=(1.3 * len(columns) + 2.5, 0.45 * len(rows) + 1.2))
    ax.imshow(values, cmap="Greens", aspect="auto", vmin=np.nanmin(values), vmax=np.nanmax(values))
    for (i, j), v in np.ndenumerate(values):
        ax.text(j, i, "-" if np.isnan(v) else fmt.format(v), ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(columns)), columns, rotation=20, ha="right")
    ax.set_yticks(range(len(rows)), list(rows))
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def _card(module: nn.Module, report: Mapping[str, Any], folder: Path) -> Path:
    hp = module.hparams
    rows = ["| task | plain merge | + surgery | expert |", "|---|---|---|---|"]
    rows += [f"| {task} | {r['plain']['acc']:.3f} | {r['corrected']['acc']:.3f} | {r['expert']['acc']:.3f} |"
             for task, r in report.items()]
    files = ("`merged.safetensors`: the merged encoder. `surgery.safetensors`: `surgery.<task>.<level>.{down,up}.weight`, "
             "one low-rank module per task and level; the last level corrects the output. `report.json` and the figures.")
    usage = (f"import timm\nfrom safetensors.torch import load_file\n\nencoder = timm.create_model({hp.model!r}, "
             f"**{json.dumps(hp.model_kwargs or {})})\nencoder.load_state_dict(load_file('merged.safetensors'))")
    return write_model_card(
        folder, f"Surgery {hp.version} on a {hp.merge} merge",
        "Representation Surgery (Yang et al., ICML 2024) / SurgeryV2 (arXiv 2410.14389), trained by litzoo: a "
        f"{hp.merge} merge (scaling {hp.scaling}) of the experts with one rank-{hp.rank} surgery module per task. "
        "The test split was used without labels to adapt (transductive, as in the papers).",
        base_model=str(hp.pretrained_checkpoint or hp.model),  # theta_0's file, else the timm architecture
        data={"tasks": ", ".join(module.tasks), "frozen towers (state hashes)": json.dumps(module._hashes)},
        config=dict(hp), tags=["model-merging", "representation-surgery"], usage=usage,
        sections={"Accuracy per task (test)": "\n".join(rows), "Files": files})


def write_report(module: nn.Module, report: Mapping[str, Any], root: str | Path, logger: Any = None) -> Path:
    """Export weights, card and figures of a trained :class:`SurgeryModule` into a new ``root/export*`` folder."""
    folder = free_folder(root)
    export_weights(module.merged, folder / "merged.safetensors")
    export_weights(module.surgery, folder / "surgery.safetensors")
    _card(module, report, folder)
    (folder / "report.json").write_text(json.dumps(report, indent=1))
    mean = lambda name: [sum(v) / len(report) for v in zip(*(r[name]["bias"] for r in report.values()))]  # noqa: E731
    figures = {
        "bias_per_layer": plot_bias({"merged": mean("plain"), f"merged + surgery {module.hparams.version}": mean("corrected")},
                                    folder / "bias_per_layer.png", "representation bias, mean over tasks"),
        "accuracy": plot_table({name: {t: 100 * r[key]["acc"] for t, r in report.items()}
                                for name, key in (("merged", "plain"), ("+ surgery", "corrected"), ("experts", "expert"))},
                               folder / "accuracy.png", "test accuracy (%)"),
    }
    if hasattr(logger, "log_image"):  # W&B: the same figures as media
        for key, png in figures.items():
            logger.log_image(key=f"surgery/{key}", images=[str(png)])
    return folder
