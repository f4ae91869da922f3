"""``m6rec plot RUN_DIR``: training curves from ``metrics.jsonl`` to a PNG.

For people without a W&B dashboard.  Four panels: loss and validation loss,
learning rate, throughput (tokens/s, MFU on a second axis) and gradient norm.
Metrics a run did not log leave their panel empty with a note.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

Series = dict[str, tuple[list[int], list[float]]]


def read_metrics(path: str | Path) -> Series:
    """metric -> (steps, values), sorted by step.

    A step logged twice keeps its last value: a resumed run re-logs the steps
    after its last checkpoint, and those are the ones that count.  Values of
    ``None`` (NaN/inf in the log) and lines cut short by a crash are skipped.
    """
    by_metric: dict[str, dict[int, float]] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(row, dict) or "step" not in row:
            continue
        for k, v in row.items():
            if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool):
                by_metric.setdefault(k, {})[int(row["step"])] = float(v)
    return {k: (sorted(d), [d[s] for s in sorted(d)]) for k, d in by_metric.items()}


def _draw(ax: Any, series: Series, names: list[str], title: str, ylabel: str) -> bool:
    drawn = False
    for name in names:
        if name in series:
            steps, values = series[name]
            ax.plot(steps, values, label=name, marker="." if len(steps) < 30 else None)
            drawn = True
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if not drawn:
        ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
    return drawn


def plot_run(run_dir: str | Path, out_png: str | Path | None = None) -> Path:
    """Draw ``RUN_DIR/metrics.jsonl`` to ``out_png`` (default ``RUN_DIR/metrics.png``)."""
    # matplotlib: only drawing needs it.  Figure + Agg canvas directly: no pyplot, so no global
    # backend and no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a training run directory?")
    series = read_metrics(path)
    out = Path(out_png) if out_png else run_dir / "metrics.png"

    fig = Figure(figsize=(12, 8), layout="constrained")
    FigureCanvasAgg(fig)
    (ax_loss, ax_lr), (ax_tps, ax_gn) = fig.subplots(2, 2)
    if _draw(ax_loss, series, ["loss", "val_loss"], "loss", "nats / token"):
        ax_loss.legend()
    _draw(ax_lr, series, ["lr"], "learning rate", "lr")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    if _draw(ax_tps, series, ["tokens_per_s"], "throughput", "tokens / s (all ranks)"):
        ax_tps.set_ylim(bottom=0)  # from zero, so a small wobble does not look like a collapse
    if "mfu_pct" in series:
        ax_mfu = ax_tps.twinx()
        ax_mfu.plot(*series["mfu_pct"], color="tab:red", label="mfu_pct")
        ax_mfu.set_ylabel("MFU %", color="tab:red")
        ax_mfu.set_ylim(bottom=0)
    _draw(ax_gn, series, ["grad_norm"], "gradient norm (before clipping)", "L2 norm")
    fig.suptitle(run_dir.resolve().name)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out


def main(cfg: Any, args: Any) -> int:
    """``m6rec plot RUN_DIR [--out FILE.png]``."""
    try:
        out = plot_run(args.run_dir, getattr(args, "out", None))
    except FileNotFoundError as e:
        print(f"m6rec plot: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0
