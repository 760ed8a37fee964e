"""The comparison's picture (PNG): learn vs forget per row, and each method's loss curves.

    plot_report(report, out / "compare.png")

Left: exact match on the test split against forgetting (general-text loss after minus before), one point per
row; up and to the left is better. Middle: training loss per step of each method row. Right: the held-out
general-text loss during training (rising means forgetting as it happens). matplotlib is the [compare] extra.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nibblora.errors import ExportError

MARKERS = {"method": "o", "rank": "^", "mitigation": "s"}


def plot_report(report: Mapping[str, Any], path: Path) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise ExportError(
            "plotting the comparison: matplotlib is not installed; pip install 'nibblora[compare]'"
        ) from None
    rows = report["rows"]
    fig, (scatter, train_loss, general) = plt.subplots(1, 3, figsize=(18, 5.5))
    for r in rows:
        scatter.scatter(r["forgetting"], 100 * r["exact_match"], marker=MARKERS[r["group"]], s=40)
        scatter.annotate(
            r["name"], (r["forgetting"], 100 * r["exact_match"]), fontsize=7, xytext=(3, 3), textcoords="offset points"
        )
    scatter.set_xlabel("forgetting: general-text loss after - before")
    scatter.set_ylabel("test exact match (%)")
    scatter.set_title("learn vs forget (o method, ^ LoRA rank, s full FT + mitigation)")
    scatter.grid(alpha=0.3)
    for r in rows:
        if r["group"] != "method":
            continue
        curves = report["curves"][r["run_id"]]
        steps, values = zip(*curves["loss"]) if curves["loss"] else ((), ())
        train_loss.plot(steps, values, label=r["name"], linewidth=1)
        if curves["eval_general_loss"]:  # from step 0: the loss before fine-tuning
            steps, values = zip([0, r["general_loss_before"]], *curves["eval_general_loss"])
            general.plot(steps, values, label=r["name"], marker=".", linewidth=1)
    train_loss.set_xlabel("step")
    train_loss.set_ylabel("training loss (task)")
    train_loss.set_yscale("log")
    train_loss.set_title("training loss, each method at its best lr")
    train_loss.legend(fontsize=7)
    general.set_xlabel("step")
    general.set_ylabel("held-out general-text loss")
    general.set_title("forgetting during training")
    general.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
