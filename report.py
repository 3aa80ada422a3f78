"""What evaluations look like (README, "Evaluation"): the published table with paired changes (format_table), and
the curriculum as a picture (plot_curriculum). eval.py computes the numbers; this file imports nothing of ours."""

import math
from pathlib import Path


def rl_step(summary):
    """The step a column is known by: RL steps since SFT, as in the published "GRPO (300)"."""
    return (summary.get("global_step") or 0) - (summary.get("sft_steps") or 0)


# The table in the published layout: its five rows first, then ours; the outcomes as rewards.OUTCOME_LABELS, best first.
OUTCOME_ORDER = ("correct_abstention", "correct_answer", "incorrect", "hallucination", "missing_proof", "format_error")


def _pct(x):
    return "n/a" if x is None else f"{100 * x:.1f}".removesuffix(".0") + "%"


def _num(digits):
    return lambda x: "n/a" if x is None else f"{x:.{digits}f}"


TABLE_ROWS = {
    "dipg": [
        ("Safe Response Rate", "safe_response_rate", _pct),
        ("Hallucination Rate", "medical_hallucination_rate", _pct),
        ("Reasoning Consistency", "reasoning_consistency_rate", _pct),
        ("Mean Reward", "mean_reward", _num(2)),
        ("Max Reward", "max_reward", _num(1)),
        ("Refusal Rate", "refusal_rate", _pct),
        ("Format Error Rate", "format_error_rate", _pct),
        ("Median Reward", "median_reward", _num(1)),
        ("Std Reward", "std_reward", _num(2)),
        ("Min Reward", "min_reward", _num(1)),
        ("Mean Reward 95% CI", "mean_reward_ci", lambda ci: "n/a" if ci is None else f"[{ci[0]:.2f}, {ci[1]:.2f}]"),
        ("Outcomes: abstained / answered / wrong / ungrounded / no proof / unparsed", "outcomes",
         lambda counts: "n/a" if counts is None else " / ".join(str(counts.get(o, 0)) for o in OUTCOME_ORDER))],
    "gsm8k": [
        ("Answer Extraction", "answer_extraction_rate", _pct),
        ("Refusal Rate", "refusal_rate", _pct),
        ("Accuracy", "accuracy", _pct),
        ("Mean Length (chars)", "mean_length", _num(1)),
        ("Mean Wrong-Answer Length (chars)", "mean_wrong_length", _num(1)),
        ("Strict Format Rate", "format_rate", _pct),
        ("Dodge Rate (an <answer> attempting nothing)", "dodge_rate", _pct),
        ("Mean Reward (phase-2 rewards)", "mean_reward", _num(2))]}


# The published numbers (Gemma-3-1B-IT), drawn faintly behind our curve; SFT's mean reward was not reported.
PUBLISHED = {
    "model": "gemma-3-1b-it", "steps": [0, 300, 600, 900, 1200],  # step 0 = SFT, the start of GRPO
    "safe_response_rate": [0.30, 0.64, 0.72, 0.88, 0.82],
    "medical_hallucination_rate": [0.50, 0.12, 0.14, 0.04, 0.12],
    "reasoning_consistency_rate": [0.30, 0.64, 0.70, 0.88, 0.80],
    "mean_reward": [None, -1.66, -2.08, 0.58, 0.12]}

PROTOCOL_NOTES = {
    "published": "Protocol: published (as the published table was made: the system prompt and the context, NOT the "
                 "question; <think> prefilled; each column a new seeded random draw from the eval set, ids in its "
                 "summary.json; the response scored up to the first <end_of_turn>).",
    "clean": "Protocol: clean (the training prompt, context and question; the same first vignettes for every column; "
             "the response scored up to the end of the turn)."}


def format_table(summaries, task="dipg", references=(), comparisons=()):
    """Markdown table: a row per metric, a column per summary and reference policy, then the paired changes."""
    references = list(references)
    summaries = list(summaries) + references
    lines = ["| Metric | " + " | ".join(s["label"] for s in summaries) + " |", "|---|" + "---|" * len(summaries)]
    lines += [f"| {name} | " + " | ".join(fmt(s.get(key)) for s in summaries) + " |"
              for name, key, fmt in TABLE_ROWS[task]]
    ns = sorted({s.get("total") for s in summaries if s.get("total") is not None})
    settings = summaries[0].get("settings", {}) if summaries else {}
    how = ("scored with rewards.EVAL_CONFIG (the environment's evaluation path)" if task == "dipg"
           else "GSM8K KPIs of gsm8k.phase_metrics")
    if settings.get("max_new_tokens"):
        how = (f"{settings.get('model')}, greedy, {settings['max_new_tokens']} new tokens, "
               f"{settings.get('dataset')}; {how}")
    lines += ["", f"n = {', '.join(map(str, ns))} per column; {how}."]
    if settings.get("protocol") and task == "dipg":  # which prompt and which rows (eval.py's PROTOCOLS; ids in each summary.json)
        lines.append(PROTOCOL_NOTES[settings["protocol"]])
    if references:
        lines.append(f"{', '.join(s['label'] for s in references)}: scripted policies "
                     "(vignettes.REFERENCE_POLICIES), no model, scored the same way.")
    if comparisons:
        lines += ["", format_comparisons(comparisons, task)]
    return "\n".join(lines) + "\n"


def format_comparisons(comparisons, task="dipg"):
    """Markdown: a column "A → B" per comparison (stats.compare): McNemar p per rate, bootstrap interval of reward."""
    def cell(c, key, fmt):
        if not c["shared"]:
            return "n/a"
        if key == "mean_reward":
            (a, b), (lo, hi) = c["mean_reward"], c["mean_reward_diff_ci95"]
            return f"{a:.2f} → {b:.2f}: {b - a:+.2f} [{lo:+.2f}, {hi:+.2f}]"
        p = c[key + "_p"]
        return f"{fmt(c[key][0])} → {fmt(c[key][1])} ({'p < 0.001' if p < 0.001 else f'p = {p:.3g}'})"

    rows = [("Shared vignettes", lambda c: f"{c['shared']} (of {c['n_a']}, {c['n_b']})"),
            ("Reward up / down / same", lambda c: "{improved} / {worsened} / {same}".format(**c["reward_change"]))]
    rows += [(name, lambda c, key=key, fmt=fmt: cell(c, key, fmt)) for name, key, fmt in TABLE_ROWS[task]
             if key + "_p" in comparisons[0] or key == "mean_reward"]
    lines = ["| Change, paired | " + " | ".join(f"{c['a']} → {c['b']}" for c in comparisons) + " |",
             "|---|" + "---|" * len(comparisons)]
    lines += [f"| {name} | " + " | ".join(map(show, comparisons)) + " |" for name, show in rows]
    lines += ["", "Each column compares the vignettes both evaluations saw (matched by content). Rates: before → "
              "after, exact McNemar p (two-sided). Mean reward: before → after: difference [paired bootstrap "
              "95% interval]. p > 0.05, or an interval across 0, is a change the data cannot tell from noise."]
    return "\n".join(lines)


def write_table(summaries, path, task="dipg", references=(), comparisons=()):
    text = format_table(summaries, task, references, comparisons)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)
    return text


# The curriculum as a picture

PLOT_METRICS = {
    "dipg": [("safe_response_rate", "Safe response", "#1b9e77", "o"),
             ("reasoning_consistency_rate", "Reasoning consistency", "#386cb0", "^"),
             ("medical_hallucination_rate", "Hallucination", "#d95f02", "s"),
             ("refusal_rate", "Refusal", "#7f7f7f", "D")],
    "gsm8k": [("answer_extraction_rate", "Answer extraction", "#386cb0", "^"),
              ("accuracy", "Accuracy", "#1b9e77", "o"),
              ("format_rate", "Strict format", "#d95f02", "s"),
              ("refusal_rate", "Refusal", "#7f7f7f", "D")]}
BLOCK_COLOURS = {"soft": "#cfe8cf", "medium": "#f7d3b5", "format": "#dbe4f3", "correctness": "#cfe8cf",
                 "generalize": "#eadcf0"}
FAINT = dict(mfc="none", lw=1, ls=":", alpha=0.6, zorder=2)  # the published curve, behind ours


def _x(summary, base_x):
    """Where a column sits: Base just left of SFT, SFT at 0 (where GRPO starts), the rest at their RL step."""
    return {"base": base_x, "sft": 0}.get(summary.get("phase"), rl_step(summary))


def _blocks(summaries):
    """Every training block seen in the runs or their lineage: (start, end, level), deduplicated."""
    blocks = {}
    for s in summaries:
        offset = s.get("sft_steps") or 0  # plotted in RL steps, like the published table
        for b in list(s.get("lineage") or []) + [s]:
            end = b.get("end_step", b.get("global_step"))
            if b.get("phase") in (None, "base", "sft") or end is None:
                continue
            blocks[((b.get("start_step") or 1) - 1 - offset, end - offset)] = b.get("penalty") or b["phase"]
    return sorted((s, e, level) for (s, e), level in blocks.items())


def _errorbars(values, cis, scale=1):
    """(ys, yerr) for errorbar: a missing value leaves a gap, a missing interval (None) draws no bar."""
    ys = [scale * v if v is not None else math.nan for v in values]
    cis = [ci or (v, v) for ci, v in zip(cis, values)]
    return ys, [[max(0.0, y - scale * ci[0]) if ci[0] is not None else 0 for y, ci in zip(ys, cis)],
                [max(0.0, scale * ci[1] - y) if ci[1] is not None else 0 for y, ci in zip(ys, cis)]]


def plot_curriculum(summaries, path, task="dipg", published=None, comparisons=(), steps=(), criteria=None):
    """Save the curriculum figure (PNG): rates, mean reward and paired changes per step (README section 5)."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    points = sorted(summaries, key=lambda s: (s.get("phase") != "base", s.get("phase") != "sft", rl_step(s)))
    max_step = max([_x(s, 0) for s in points] + (published["steps"] if published else []) + [1])
    has_sft = published is not None or any(s.get("phase") == "sft" for s in points)
    base_x = -max(0.08 * max_step, 1) if has_sft else 0  # Base sits just left of SFT (step 0), if any
    xs = [_x(s, base_x) for s in points]
    blocks = _blocks(points)

    dipg = task == "dipg"
    with plt.rc_context({"font.size": 13, "axes.spines.top": False, "axes.spines.right": False}):
        x_of = {s.get("label"): x for s, x in zip(points, xs)}
        changes = [c for c in comparisons or () if c.get("shared") and c.get("b") in x_of]
        panels = 3 if changes else 2
        fig, axes = plt.subplots(panels, 1, figsize=(11, 7.5 + 2.3 * (panels - 2)), sharex=True,
                                 gridspec_kw={"height_ratios": [3, 1.6, 1.6][:panels], "hspace": 0.08})
        top, bottom, last = axes[0], axes[1], axes[-1]
        for ax in axes:
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
            ys, yerr = _errorbars(values, [s.get(f"{key}_ci") for s in points], scale=100)
            line = dict(ms=6, lw=1.2, ls="--", alpha=0.8) if key == "refusal_rate" else dict(ms=8, lw=2.4, ls="-")
            top.errorbar([x + (i - 1.5) * dodge for x in xs], ys, yerr=yerr, color=colour, marker=marker, capsize=4,
                         elinewidth=1, label=name, zorder=3, **line)
            if published and key in published:
                top.plot(published["steps"], [100 * v for v in published[key]], color=colour, marker=marker, ms=8, **FAINT)
        if steps:  # as it trained: each step's completions (thin), and seed 002's exit thresholds (dotted)
            top.plot([r["step"] for r in steps], [100 * r["answer_extraction_rate"] for r in steps], color="#386cb0",
                     lw=1, alpha=0.5, label="Answer extraction (training step)")
            bottom.plot([r["step"] for r in steps], [r["mean_length_chars"] for r in steps], color="black", lw=1, alpha=0.4)
        for key, colour in (("exit_extraction", "#386cb0"), ("exit_refusal", "#7f7f7f")) if criteria else ():
            top.axhline(100 * criteria[key], color=colour, ls=":", lw=1.2, label=f"exit: {key[5:]} {criteria[key]:.0%}")
        top.set_ylim(-3, 112)
        has_ci = any(s.get(f"{key}_ci") for s in points for key, *_ in PLOT_METRICS[task])
        top.set_ylabel("rate (%)   [bars: 95% CI]" if has_ci else "rate (%)")

        means = [s.get("mean_reward" if dipg else "mean_length") for s in points]
        ys, yerr = _errorbars(means, [s.get("mean_reward_ci") if dipg else None for s in points])
        bottom.errorbar(xs, ys, yerr=yerr, color="black", marker="o", lw=2.4, ms=7, capsize=4, elinewidth=1, zorder=3,
                        label="mean reward" if dipg else "mean length")
        for x, m in zip(xs, means):
            if m is not None:
                bottom.annotate(f"{m:+.2f}" if dipg else f"{m:.0f}", (x, m), textcoords="offset points",
                                xytext=(7, 5), ha="left", fontsize=10)  # beside the interval bar, not on it
        if dipg:
            if published:
                pub = [(x, m) for x, m in zip(published["steps"], published["mean_reward"]) if m is not None]
                bottom.plot(*zip(*pub), color="black", marker="o", ms=7, **FAINT)
            bottom.axhline(0, color="#888888", lw=0.8)
        has_ci = dipg and any(s.get("mean_reward_ci") for s in points)
        bottom.set_ylabel(("mean reward\n[95% CI]" if has_ci else "mean reward") if dipg else "mean length\n(chars)")
        lo, hi = bottom.get_ylim()
        bottom.set_ylim(lo - 0.15 * (hi - lo), hi + 0.3 * (hi - lo))
        if changes:  # the paired change against the previous column, on the vignettes both saw
            diffs = [c["mean_reward_diff"] for c in changes]
            ys, yerr = _errorbars(diffs, [c["mean_reward_diff_ci95"] for c in changes])
            last.errorbar([x_of[c["b"]] for c in changes], ys, yerr=yerr, color="#6a3d9a", marker="D", ms=7,
                          ls="none", capsize=5, elinewidth=1.5, zorder=3)
            for d, c in zip(diffs, changes):
                last.annotate(f"{d:+.2f}  (n={c['shared']}, {PLOT_METRICS[task][0][1].lower()} p="
                              f"{c[PLOT_METRICS[task][0][0] + '_p']:.3g})",
                              (x_of[c["b"]], d), textcoords="offset points", xytext=(8, 0), va="center", fontsize=9)
            last.axhline(0, color="#888888", lw=0.8)
            last.set_ylabel("mean reward change\nvs previous\n[paired 95% CI]")

        ticks = {x: ("SFT" if x == 0 else f"GRPO\n({x})") for x in (published["steps"] if published else [])}
        ticks.update({x: s["label"].replace(" (", "\n(") for x, s in zip(xs, points)})
        last.set_xticks(list(ticks), list(ticks.values()), fontsize=11)
        last.set_xlabel("GRPO step (SFT at 0)" if dipg else "global step")
        handles = top.get_legend_handles_labels()[0]
        handles += [Patch(color=BLOCK_COLOURS.get(lvl, "#eeeeee"), label=f"{lvl} {'penalties' if dipg else 'phase'}")
                    for lvl in dict.fromkeys(b[2] for b in blocks)]
        if published:
            handles.append(plt.Line2D([], [], color="#555555", marker="o", mfc="none", ls=":",
                                      label=f"published ({published['model']})"))
        top.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=11)
        first = points[0] if points else {}
        settings = first.get("settings", {})
        title = (f"{'DIPG Safety Gym' if dipg else 'GSM8K'} across the curriculum \u2013 {settings.get('model', '')}, "
                 f"{first.get('total', '?')} held-out prompts, greedy, {settings.get('protocol', '?')} protocol")
        top.set_title(title, fontsize=14, loc="left")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return path
