"""``curves.png``: the training loss and the validation metrics per epoch, a run at a glance.

Drawn from the records of ``history.jsonl`` with matplotlib's Agg backend (no display needed), and written
atomically after every epoch, so a run killed at any point still has the curves up to its last epoch.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .metrics import LOWER_IS_BETTER


def available() -> bool:
    """Whether matplotlib can be imported (it is a declared dependency of the app, but may be missing)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write_curves(records: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Plots ``records`` (``history.jsonl`` rows) to ``path``: loss on the left, validation metrics on the right."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import MaxNLocator

    path = Path(path)
    epochs = [record["epoch"] for record in records]
    figure, (loss_axes, val_axes) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    loss_axes.plot(epochs, [record["train_loss"] for record in records], marker=".", color="tab:red")
    loss_axes.set(title="training loss", xlabel="epoch", ylabel="loss")
    validated = [record for record in records if record.get("val")]
    for name in (validated[0]["val"] if validated else ()):
        style = "--" if name in LOWER_IS_BETTER else "-"
        val_axes.plot([r["epoch"] for r in validated], [r["val"][name] for r in validated], style, marker=".",
                      label=name + (" (lower is better)" if name in LOWER_IS_BETTER else ""))
    val_axes.set(title="validation", xlabel="epoch", ylim=(0.0, 1.0))
    if validated:
        val_axes.legend(loc="best", fontsize="small")
    for axes in (loss_axes, val_axes):
        axes.grid(alpha=0.3)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_xlim(min(epochs, default=1) - 0.5, max(epochs, default=1) + 0.5)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        figure.savefig(temporary, dpi=100, format="png")
        os.replace(temporary, path)
    finally:
        plt.close(figure)
        temporary.unlink(missing_ok=True)
    return path
