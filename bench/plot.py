"""Plots of `afdserve bench sweep` results: throughput against the SLO's latency, and the Pareto front.

Two panels, one line per sweep (a server, or a server under different flags):
- output tok/s against TPOT at the SLO's percentile, with the SLO drawn as a vertical line: the highest point left
  of it is the throughput the server sustains within the SLO;
- output tok/s per user (1000 / mean TPOT in ms: the speed each stream sees) against output tok/s in total, the
  trade-off InferenceMAX publishes; up and to the right is better.
matplotlib is an optional dependency (`pip install 'afdserve[plot]'`), imported only here.
"""
from __future__ import annotations

from pathlib import Path


def pyplot():
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("plots need matplotlib: pip install 'afdserve[plot]' (or matplotlib)") from None
    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt
    return plt


def pareto_points(result: dict) -> list[tuple[float, float]]:
    """(output tok/s in total, output tok/s per user) per load point that has a TPOT, in load order."""
    return [(p["output_tok_s"], 1000.0 / p["tpot_ms"]["mean"]) for p in result["points"]
            if p["tpot_ms"]["mean"]]


def save_figure(plt, fig, path: str | Path) -> Path:
    """Writes `fig` to `path` (.png, .svg, .pdf) and closes it."""
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_sweeps(sweeps: dict[str, dict], path: str | Path) -> Path:
    """Writes the two panels for `sweeps` (label -> a run_sweep result) to `path` (.png, .svg, .pdf)."""
    plt = pyplot()
    return save_figure(plt, sweep_figure(sweeps, plt), path)


def sweep_figure(sweeps: dict[str, dict], plt=None):
    """The figure of plot_sweeps: axes[0] throughput against TPOT, axes[1] the Pareto; one line per sweep."""
    plt = plt or pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    slo_lines = set()
    for label, result in sweeps.items():
        spec = result["spec"]
        at = f"p{spec['slo_percentile']:g}"
        key = result["load"]
        points = [p for p in result["points"] if p["tpot_ms"][at] is not None]
        line, = left.plot([p["tpot_ms"][at] for p in points], [p["output_tok_s"] for p in points], "o-",
                          label=label)
        for p in points:
            left.annotate(f"{p[key]:g}", (p["tpot_ms"][at], p["output_tok_s"]), fontsize=7,
                          textcoords="offset points", xytext=(3, 3), color=line.get_color())
        if "tpot" in spec["slo"]:
            slo_lines.add((spec["slo"]["tpot"], at))
        pareto = pareto_points(result)
        right.plot([t for t, _ in pareto], [u for _, u in pareto], "o-", label=label, color=line.get_color())
    for ms, at in sorted(slo_lines):
        left.axvline(ms, color="grey", linestyle="--", linewidth=1)
        left.annotate(f"SLO: TPOT {at} {ms:g} ms", (ms, 0), xycoords=("data", "axes fraction"), fontsize=8,
                      textcoords="offset points", xytext=(4, 6), color="grey")
    first = next(iter(sweeps.values()))
    at = f"p{first['spec']['slo_percentile']:g}"
    left.set(xlabel=f"TPOT {at} (ms)", ylabel="output tok/s", title=f"Throughput against TPOT ({first['load']} "
                                                                     f"labels the points)")
    right.set(xlabel="output tok/s (total)", ylabel="output tok/s per user (1000 / mean TPOT)",
              title="Per-user speed against total throughput")
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
        ax.set_ylim(bottom=0)
        ax.set_xlim(left=0)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
