"""Render the loss curves to a PNG, so a picture exists offline (DVC's HTML plots fetch their
renderer from the network) and the README can show it."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from charlm import io
from charlm.curves import CurvePoint


def render_loss_curves(curves: Mapping[str, list[CurvePoint]], path: str | Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 4), squeeze=False)
    for ax, (name, points) in zip(axes[0], curves.items(), strict=True):
        steps = [p.step for p in points]
        ax.plot(steps, [p.train_loss for p in points], label="train", color="tab:blue")
        ax.plot(steps, [p.val_loss for p in points], label="val", color="tab:orange")
        best = min(points, key=lambda p: p.val_loss)
        ax.set_title(f"{name}: final val {points[-1].val_loss:.3f} (best {best.val_loss:.3f})")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/char)")
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    io.write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
