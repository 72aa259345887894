"""Render the loss curves to a PNG, so a picture exists offline (DVC's HTML plots fetch their
renderer from the network) and the README can show it."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from charlm import io
from charlm.curves import CurvePoint


def panel_title(name: str, metrics: Mapping[str, float]) -> str:
    """The exact whole-split losses of the evaluate stage: the numbers `dvc metrics show` prints, not
    the curve's estimates."""
    return f"{name}: val_loss {metrics['val_loss']:.4f}, train_loss {metrics['train_loss']:.4f} (exact)"


def render_loss_curves(
    curves: Mapping[str, list[CurvePoint]], metrics: Mapping[str, Mapping[str, float]], path: str | Path
) -> None:
    """One panel per model. The PNG's "Title" text chunk repeats the panel titles, so a reader (or a
    test) can check the picture against `metrics/<model>.json` without looking at it."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 4), squeeze=False)
    titles = []
    for ax, (name, points) in zip(axes[0], curves.items(), strict=True):
        steps = [p.step for p in points]
        ax.plot(steps, [p.train_loss for p in points], label="train (trained weights)", color="tab:blue")
        ax.plot(steps, [p.val_loss for p in points], label="val (trained weights)", color="tab:orange")
        if any((p.average_train_loss, p.average_val_loss) != (p.train_loss, p.val_loss) for p in points):
            style = {"linestyle": "--", "linewidth": 1.2}
            ax.plot(steps, [p.average_train_loss for p in points], label="train (weight average, saved)", **style)
            ax.plot(steps, [p.average_val_loss for p in points], label="val (weight average, saved)", **style)
        titles.append(panel_title(name, metrics[name]))
        ax.set_title(titles[-1], fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("estimated loss (nats/char, random batches)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    metadata = {"Title": " | ".join(titles)}
    io.write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100, metadata=metadata))
    plt.close(fig)
