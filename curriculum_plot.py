"""The curriculum as a picture, for eval.py: each rate (with its 95% interval) and the mean reward
against the GRPO step, every training block shaded by its penalty level; SFT (and Base) sit at step 0,
where GRPO starts. Drawing only (matplotlib); what the numbers mean is eval.py's chapter.
"""

import math
from pathlib import Path

from eval import rl_step, sft_steps

PLOT_METRICS = {
    "dipg": [("safe_response_rate", "Safe response", "#1b9e77", "o"),
             ("reasoning_consistency_rate", "Reasoning consistency", "#386cb0", "^"),
             ("medical_hallucination_rate", "Hallucination", "#d95f02", "s"),
             ("refusal_rate", "Refusal", "#7f7f7f", "D")],
    "gsm8k": [("answer_extraction_rate", "Answer extraction", "#386cb0", "^"),
              ("accuracy", "Accuracy", "#1b9e77", "o"),
              ("format_rate", "Strict format", "#d95f02", "s"),
              ("refusal_rate", "Refusal", "#7f7f7f", "D")],
}
BLOCK_COLOURS = {"soft": "#cfe8cf", "medium": "#f7d3b5", "format": "#dbe4f3", "correctness": "#cfe8cf",
                 "generalize": "#eadcf0"}


def _x(summary, base_x):
    phase = summary.get("phase")
    if phase == "base":
        return base_x
    if phase == "sft":
        return 0
    return rl_step(summary)


def _blocks(summaries):
    """Every training block seen in the runs or their lineage: (start, end, level), deduplicated."""
    blocks = {}
    for s in summaries:
        offset = sft_steps(s)  # plotted in RL steps, like the published table
        for b in list(s.get("lineage") or []) + [s]:
            phase = b.get("phase")
            if phase in (None, "base", "sft"):
                continue
            end = b.get("end_step", b.get("global_step"))
            start = b.get("start_step") or 1
            if end is None:
                continue
            blocks[(start - 1 - offset, end - offset)] = b.get("penalty") or phase
    return sorted((s, e, level) for (s, e), level in blocks.items())


def plot_curriculum(summaries, path, task="dipg", title=None, published=None):
    """Save the curriculum figure to `path` (PNG). summaries: dicts as in summary.json."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    points = sorted(summaries, key=lambda s: (s.get("phase") != "base", s.get("phase") != "sft", rl_step(s)))
    steps = [_x(s, 0) for s in points] + (published["steps"] if published else [])
    max_step = max(steps + [1])
    has_sft = published is not None or any(s.get("phase") == "sft" for s in points)
    base_x = -max(0.08 * max_step, 1) if has_sft else 0  # Base sits just left of SFT (step 0), if any
    xs = [_x(s, base_x) for s in points]
    blocks = _blocks(points)

    style = {"font.size": 13, "axes.spines.top": False, "axes.spines.right": False}
    with plt.rc_context(style):  # a talk-sized figure, without changing the caller's defaults
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 7.5), sharex=True,
                                          gridspec_kw={"height_ratios": [3, 1.6], "hspace": 0.08})
        for ax in (top, bottom):
            for start, end, level in blocks:
                ax.axvspan(start, end, color=BLOCK_COLOURS.get(level, "#eeeeee"), alpha=0.7, lw=0, zorder=0)
                ax.axvline(end, color="white", lw=2, zorder=0)  # so two blocks at the same level stay two
            if has_sft:
                ax.axvline(0, color="#555555", lw=1, ls=":", zorder=1)
            ax.grid(axis="y", color="#dddddd", lw=0.8, zorder=0)
        for start, end, level in blocks:
            top.text((start + end) / 2, 103, level, ha="center", va="bottom", fontsize=11, color="#444444")

        dodge = 0.006 * (max_step - base_x)  # nudge each metric sideways so the interval bars don't overlap
        for i, (key, name, colour, marker) in enumerate(PLOT_METRICS[task]):
            values = [s.get(key) for s in points]
            if all(v is None for v in values):
                continue
            ys = [100 * v if v is not None else math.nan for v in values]
            shifted = [x + (i - 1.5) * dodge for x in xs]
            cis = [s.get(f"{key}_ci") or (v, v) for s, v in zip(points, values)]  # no interval: no bar
            lows = [max(0.0, y - 100 * ci[0]) if ci[0] is not None else 0 for y, ci in zip(ys, cis)]
            highs = [max(0.0, 100 * ci[1] - y) if ci[1] is not None else 0 for y, ci in zip(ys, cis)]
            minor = key == "refusal_rate"
            top.errorbar(shifted, ys, yerr=[lows, highs], color=colour, marker=marker, ms=6 if minor else 8,
                         lw=1.2 if minor else 2.4, ls="--" if minor else "-", capsize=4, elinewidth=1,
                         alpha=0.8 if minor else 1, label=name, zorder=3)
            if published and key in published:
                top.plot(published["steps"], [100 * v for v in published[key]], color=colour, marker=marker,
                         mfc="none", ms=8, lw=1, ls=":", alpha=0.6, zorder=2)
        top.set_ylim(-3, 112)
        has_ci = any(s.get(f"{key}_ci") for s in points for key, *_ in PLOT_METRICS[task])
        top.set_ylabel("rate (%)   [bars: 95% CI]" if has_ci else "rate (%)")

        mean_key = "mean_reward" if task == "dipg" else "mean_length"
        means = [s.get(mean_key) for s in points]
        bottom.plot(xs, [m if m is not None else math.nan for m in means], color="black", marker="o", lw=2.4,
                    ms=7, zorder=3, label="mean reward" if task == "dipg" else "mean length")
        for x, m in zip(xs, means):
            if m is not None:
                bottom.annotate(f"{m:+.2f}" if task == "dipg" else f"{m:.0f}", (x, m), textcoords="offset points",
                                xytext=(0, 9), ha="center", fontsize=10)
        if published and task == "dipg":
            pub = [(x, m) for x, m in zip(published["steps"], published["mean_reward"]) if m is not None]
            bottom.plot([p[0] for p in pub], [p[1] for p in pub], color="black", marker="o", mfc="none",
                        ms=7, lw=1, ls=":", alpha=0.6, zorder=2)
        if task == "dipg":
            bottom.axhline(0, color="#888888", lw=0.8)
        bottom.set_ylabel("mean reward" if task == "dipg" else "mean length\n(chars)")
        lo, hi = bottom.get_ylim()
        bottom.set_ylim(lo - 0.15 * (hi - lo), hi + 0.3 * (hi - lo))

        ticks = {x: ("SFT" if x == 0 else f"GRPO\n({x})") for x in (published["steps"] if published else [])}
        ticks.update({x: s["label"].replace(" (", "\n(") for x, s in zip(xs, points)})
        bottom.set_xticks(list(ticks), list(ticks.values()), fontsize=11)
        bottom.set_xlabel("GRPO step (SFT at 0)" if task == "dipg" else "global step")
        handles = top.get_legend_handles_labels()[0]
        levels = [level for level in dict.fromkeys(b[2] for b in blocks)]
        handles += [Patch(color=BLOCK_COLOURS.get(level, "#eeeeee"), label=f"{level} penalties"
                          if task == "dipg" else f"{level} phase") for level in levels]
        if published:
            handles.append(plt.Line2D([], [], color="#555555", marker="o", mfc="none", ls=":",
                                      label=f"published ({published['model']})"))
        top.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=11)
        if title is None:
            first = points[0] if points else {}
            title = (f"{'DIPG Safety Gym' if task == 'dipg' else 'GSM8K'} across the curriculum \u2013 "
                     f"{first.get('settings', {}).get('model', '')}, {first.get('total', '?')} held-out "
                     f"prompts, greedy")
        top.set_title(title, fontsize=14, loc="left")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return path
