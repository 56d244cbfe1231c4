"""What a Q# run shows a person: the summary table, the eta sweep (table, CSV and the
accuracy-vs-KL plot of the paper's Fig. 3), with every number's standard error."""

from __future__ import annotations

import csv
import os

KL_NOTE = (
    "KL = mean over samples of the trajectory KL(pi || pi_ref): per token, the top-p-truncated sampled "
    "distribution against the untruncated reference at the same temperature (spec 4.5 / 8.9), so even "
    "pi_ref's own row is > 0. +- is one standard error over problems; pass@1_vs_pi_ref is the per-problem "
    "accuracy minus pi_ref's on the same problems and keys, with the paired standard error."
)


def summary_table(results: dict[str, dict]) -> str:
    """Plain-text table, one row per evaluated policy, metrics in a fixed order; a metric with
    a standard error prints as ``value+-se``."""
    keys = {
        k
        for m in results.values()
        for k, v in m.items()
        if isinstance(v, int | float) and k not in ("seconds", "num_problems") and not k.endswith("_se")
    }
    first = (
        ["pass@1", "pass@1_vs_pi_ref"]
        + sorted(k for k in keys if k.startswith("maj1@"))
        + sorted(k for k in keys if k.startswith("pass@") and not k.startswith("pass@1"))
        + sorted(k for k in keys if k.startswith("rm_"))
        + ["kl", "mean_length", "inv_eta"]
    )
    columns = [k for k in first if k in keys] + sorted(keys - set(first))

    def cell(m: dict, k: str) -> str:
        if k not in m:
            return "-"
        se = m.get(f"{k}_se")
        return f"{m[k]:.3f}" + (f"+-{se:.3f}" if se is not None and se == se else "")

    header = ["policy"] + columns
    rows = [[name] + [cell(m, k) for k in columns] for name, m in results.items()]
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    fmt = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip()
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def sweep_rows(sweep: dict[str, dict]) -> list[dict]:
    """Flat rows (policy, method, inv_eta, metric, metric_se, ...) in sweep order."""
    rows = []
    for name, m in sweep.items():
        row = {"policy": name, "method": m.get("method", name), "inv_eta": m.get("inv_eta", 0.0)}
        row.update({k: v for k, v in m.items() if k not in row})
        rows.append(row)
    return rows


def write_csv(path: str, sweep: dict[str, dict]) -> None:
    rows = sweep_rows(sweep)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def plot_accuracy_vs_kl(path: str, sweep: dict[str, dict], metric: str = "pass@1", title: str = "") -> None:
    """One line per method through its eta values (annotated with 1/eta), pi_ref as a point;
    error bars are one standard error on both axes."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    methods: dict[str, list[dict]] = {}
    for m in sweep.values():
        methods.setdefault(m.get("method", "pi_ref"), []).append(m)
    styles = {"pi_ref": ("k", "s"), "qsharp": ("tab:blue", "o"), "cd": ("tab:orange", "^"), "grpo": ("tab:green", "D")}
    labels = {"pi_ref": "π_ref", "qsharp": "Q#", "cd": "CD", "grpo": "GRPO"}
    for method, points in methods.items():
        points = sorted(points, key=lambda p: p["kl"])
        color, marker = styles.get(method, ("tab:gray", "x"))
        ax.errorbar(
            [p["kl"] for p in points],
            [p[metric] for p in points],
            xerr=[p.get("kl_se", 0.0) for p in points],
            yerr=[p.get(f"{metric}_se", 0.0) for p in points],
            color=color,
            marker=marker,
            linestyle="-" if len(points) > 1 else "none",
            capsize=3,
            label=labels.get(method, method),
        )
        for p in points:
            guided = method in ("qsharp", "cd") and "inv_eta" in p
            knob = p.get("label") or (f"1/η={p['inv_eta']:g}" if guided else "")
            if knob:
                ax.annotate(knob, (p["kl"], p[metric]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    kls = [p["kl"] for p in sweep.values() if p["kl"] > 0]
    if kls and max(kls) > 20 * min(kls):  # e.g. CD's KL explodes with 1/eta: keep the small ones readable
        ax.set_xscale("log")
    ax.set_xlabel("KL(π ‖ π_ref) per response (nats)")
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} vs KL")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
