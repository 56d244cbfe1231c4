"""The star-graph results: printed table, JSON and a bar chart like the paper's Fig. 2(b)."""

from __future__ import annotations

import json
import os

LABELS = {
    "pretrained": "Pretrained",
    "reinforce": "REINFORCE",
    "dpo": "DPO",
    "rpo": "RPO",
    "grpo": "GRPO",
    "cd": "CD",
    "qsharp": "Q#",
    "qsharp_online": "Q# online",
}


def table(results: dict, degree: int) -> str:
    rows = [f"{'method':<12} {'test accuracy':>13} {'mean KL to ref':>15} {'graphs':>7}"]
    for name, r in results.items():
        rows.append(f"{LABELS.get(name, name):<12} {r['accuracy']:>13.3f} {r['mean_kl']:>15.3f} {r['n']:>7d}")
    rows.append(f"(1/degree = {1 / degree:.3f}: the Clever-Hans shortcut's expected accuracy)")
    return "\n".join(rows)


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)


def bar_chart(path: str, results: dict, title: str, degree: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    acc = [results[n]["accuracy"] for n in names]
    palette = dict(
        pretrained="#7f7f7f", reinforce="#1f77b4", dpo="#2ca02c", rpo="#17becf", grpo="#bcbd22", cd="#ff7f0e",
        qsharp="#d62728", qsharp_online="#9467bd",
    )  # fmt: skip
    fig, ax = plt.subplots(figsize=(7.6, 3.6), dpi=120)
    bars = ax.bar([LABELS.get(n, n) for n in names], acc, color=[palette.get(n, "#8c564b") for n in names])
    for b, n in zip(bars, names):
        ax.text(
            b.get_x() + b.get_width() / 2, b.get_height() + 0.015,
            f"{results[n]['accuracy']:.2f}\nKL {results[n]['mean_kl']:.2f}", ha="center", va="bottom", fontsize=7,
            bbox=dict(facecolor="white", edgecolor="none", pad=0.5), zorder=3,
        )  # fmt: skip
    ax.axhline(1 / degree, color="k", ls="--", lw=0.8, label=f"1/degree = {1 / degree:.2f}")
    ax.set_ylim(0, 1.18)
    ax.set_ylabel("test accuracy (exact path)")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def curves_chart(path: str, pretrain_curve: list, classifier_curves: dict, title: str, degree: int) -> None:
    """Left: the reference's pretraining (loss; teacher-forced accuracy at the first decision and
    at every other target token). Right: the classifier's held-out first-decision pair accuracy
    (``classifier_curves``: {label: curve}, steps as they should be plotted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.3), dpi=120)
    steps = [p["step"] for p in pretrain_curve]
    a.plot(steps, [p["loss"] for p in pretrain_curve], "k-", label="next-token loss")
    a.plot(steps, [p["other_tokens_acc"] for p in pretrain_curve], "g--", label="TF acc, other tokens")
    a.plot(steps, [p["first_decision_acc"] for p in pretrain_curve], "r--", label="TF acc, first decision")
    a.axhline(1 / degree, color="gray", lw=0.6, ls=":")
    a.set_xlabel("pretraining step")
    a.set_title("reference (pi_ref)", fontsize=9)
    a.legend(fontsize=7, frameon=False)
    for name, curve in classifier_curves.items():
        if curve:
            xs = [p["step"] for p in curve]
            first = [p["first_decision_pair_acc"] for p in curve]
            (line,) = b.plot(xs, first, "o-", label=f"{name}: first decision")
            # the goal-token position needs one lookup: it is learned first
            last = [p["position_acc"][-1] for p in curve]
            b.plot(xs, last, "x--", color=line.get_color(), label=f"{name}: last position")
    b.axhline(0.5, color="gray", lw=0.6, ls=":")
    b.set_ylim(0, 1.03)
    b.set_xlabel("classifier step")
    b.set_title("classifier on held-out pairs", fontsize=9)
    b.legend(fontsize=7, frameon=False, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
