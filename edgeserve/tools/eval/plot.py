"""The plots (matplotlib, Agg: no display needed): accuracy vs deadline, accuracy vs token budget."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from edgeserve.tools.eval.stats import GroupStats


def _label(s: GroupStats, many_styles: bool, many_hints: bool) -> str:
    parts = [s.policy]
    if many_styles:
        parts.append(s.style)
    if many_hints:
        parts.append("hint on" if s.hint else "hint off")
    if s.forcing is not None:
        parts.append("forcing on" if s.forcing else "forcing off")
    return ", ".join(parts)


def _plot(stats: Sequence[GroupStats], x_of: str, path: Path, title: str, x_label: str,
          log_x: bool) -> Path:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    many_styles = len({s.style for s in stats}) > 1
    many_hints = len({s.hint for s in stats}) > 1
    lines: dict[str, list[GroupStats]] = {}
    for s in stats:
        lines.setdefault(_label(s, many_styles, many_hints), []).append(s)
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=110)
    for position, (label, members) in enumerate(lines.items()):
        members = sorted(members, key=lambda s: getattr(s, x_of) or 0)
        # Lines are nudged apart a little (log x: a factor) so their error bars do not hide each other.
        nudge = 1 + 0.025 * (position - (len(lines) - 1) / 2) if log_x else 1.0
        xs = [(getattr(s, x_of) or 0) / (1000 if x_of == "deadline_ms" else 1) * nudge for s in members]
        ys = [100 * s.accuracy for s in members]
        low = [max(0.0, 100 * (s.accuracy - s.interval[0])) for s in members]
        high = [max(0.0, 100 * (s.interval[1] - s.accuracy)) for s in members]
        dashed = any(not s.hint for s in members) and many_hints
        ax.errorbar(xs, ys, yerr=[low, high], marker="o", capsize=3, label=label,
                    linestyle="--" if dashed else "-")
    if log_x:
        ax.set_xscale("log")
        ticks = sorted({(getattr(s, x_of) or 0) / (1000 if x_of == "deadline_ms" else 1) for s in stats})
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{t:g}" for t in ticks])
        ax.minorticks_off()
    ax.set_xlabel(x_label)
    ax.set_ylabel("accuracy (%), 95 % Wilson interval")
    ax.set_ylim(bottom=0)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def plot_accuracy_vs_deadline(stats: Sequence[GroupStats], path: Path, title: str) -> Path:
    """One line per policy (× style × hint when several were run), x = deadline in seconds."""
    rows = [s for s in stats if s.mode == "deadline"]
    return _plot(rows, "deadline_ms", path, title, "deadline (s)", log_x=True)


def plot_accuracy_vs_budget(stats: Sequence[GroupStats], path: Path, title: str) -> Path:
    """One line per pinned variant (× style × hint), x = max_tokens."""
    rows = [s for s in stats if s.mode == "sweep"]
    return _plot(rows, "budget", path, title, "token budget (max_tokens)", log_x=True)
