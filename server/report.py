"""The federation report's PNG: per-round test metrics of every site, the run next to its baselines."""

from __future__ import annotations

import io
from pathlib import Path

from matplotlib.figure import Figure  # the object API: no pyplot, no global figure state, no display
from matplotlib.ticker import MaxNLocator

from common.fileio import atomic_write_bytes

PANELS = (("accuracy", "accuracy"), ("auroc", "AUROC"))


def _series(results: dict, metric: str) -> dict[str, tuple[list[int], list[float]]]:
    """{site: (rounds, values)} of `metric` from a run's per-site evaluation replies."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for rnd, phases in sorted(results.get("per_site", {}).items(), key=lambda kv: int(kv[0])):
        for site, m in phases.get("evaluate", {}).items():
            if metric in m:
                xs, ys = out.setdefault(site, ([], []))
                xs.append(int(rnd))
                ys.append(float(m[metric]))
    return out


def curves_png(results: dict, baseline_real: dict | None = None) -> bytes:
    """A PNG: for accuracy and AUROC, each site's test figure per round in the federated run
    (solid), in the FedAvg-on-real-data baseline run (dashed), and its local-only model (dotted)."""
    fig = Figure(figsize=(10, 4), dpi=100, layout="constrained")
    axes = fig.subplots(1, len(PANELS))
    for ax, (metric, title) in zip(axes, PANELS):
        colours = {}
        local_only = _series(results, f"local-only-{metric}")
        for site, (xs, ys) in sorted(_series(results, metric).items()):
            (line,) = ax.plot(xs, ys, marker="o", label=f"{site} federated")
            colours[site] = line.get_color()
            local = local_only.get(site)
            if local:
                ax.axhline(local[1][-1], color=colours[site], linestyle=":", linewidth=1)
        for site, (xs, ys) in sorted(_series(baseline_real or {}, metric).items()):
            ax.plot(xs, ys, linestyle="--", marker=".", color=colours.get(site), label=f"{site} FedAvg real")
        ax.set(title=f"test {title} (dotted: local only)", xlabel="round", ylim=(0, 1.02))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_curves(path: Path, results: dict, baseline_real: dict | None = None) -> None:
    atomic_write_bytes(Path(path), curves_png(results, baseline_real))
