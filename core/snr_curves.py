"""Metric-vs-SNR curves drawn to a PNG (one panel per metric, one line per system)."""

from __future__ import annotations

from pathlib import Path

from core.figures import save_figure


def save_snr_curves(curves: dict[str, dict[str, dict[float, float]]], path: str | Path, title: str,
                    log_metrics: tuple[str, ...] = ("ber", "ter")) -> Path:
    """Draw ``curves[metric][system][snr_db] = value``; metrics in ``log_metrics`` on a log axis.

    Written atomically (temporary file, then rename), so an interrupted run leaves no half PNG.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metrics = list(curves)
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for system, points in sorted(curves[metric].items()):
            snrs = sorted(points)
            values = [points[s] for s in snrs]
            if metric in log_metrics:
                values = [max(v, 1e-6) for v in values]  # zero errors drawn at the floor of the axis
            ax.plot(snrs, values, marker="o", ms=3, label=system)
        if metric in log_metrics:
            ax.set_yscale("log")
        ax.set_xlabel("Es/N0 (dB)")
        ax.set_title(metric, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)
