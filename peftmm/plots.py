"""Pictures of results people look at (training curves), saved as PNG."""

from __future__ import annotations

import io
from pathlib import Path

from .io import atomic_write_bytes


def plot_curves(records: list[dict], path: Path, title: str = "") -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r for r in records if "loss" in r and "step" in r]
    evals = [r for r in records if any(k.startswith("val_") for k in r) and "epoch" in r]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=0.8, color="tab:blue")
    left.set(xlabel="optimizer step", ylabel="training loss", title="loss")
    left.set_yscale("log")
    metric_keys = sorted({k for r in evals for k in r if k.startswith("val_") and k != "val_loss"})
    for key in metric_keys:
        right.plot([r["epoch"] for r in evals], [r[key] for r in evals], marker="o", label=key)
    right.set(xlabel="epoch", title="validation")
    right.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    right.legend()
    fig.suptitle(title)
    save_figure(fig, path)


def save_figure(fig, path: Path, dpi: int = 110) -> None:
    """Lay ``fig`` out tightly and write it to ``path`` as PNG, atomically (never a half-written
    picture), then close it (pyplot keeps every open figure alive)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write_bytes(path, image.getvalue())
