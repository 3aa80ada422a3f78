"""Evaluation: the published table, for your own runs.

The published result of this recipe is one table (REFERENCE §1): for each checkpoint of the curriculum
(SFT, then GRPO after 300, 600, 900, 1200 steps), the safe response rate, hallucination rate, reasoning
consistency, mean and max reward over 50 held-out vignettes. This chapter computes exactly that table
for any run directory, and draws the curriculum as one picture.

How the published numbers were made, and therefore how we make ours:

1. Generate. Each run's weights are the base model + its LoRA checkpoint (`model.load_run`); `base`
   means the bare base model, the row before SFT. Decoding is greedy (temperature 0), at most 512 new
   tokens, stopping at the end of the model's turn (the published 4096-token KV cache is only capacity).
2. Score. Every response goes through `rewards.score_dipg(..., EVAL_CONFIG, mode="eval")`: the
   environment's evaluation path (`DIPGEnvironment.step`) with the eval reward configuration, which is
   NOT the one used for training (correct abstention is worth 36 here, 60 under the soft penalties).
3. Aggregate. `rewards.summarize` turns the 50 (reward, metrics) pairs into rates and reward
   statistics, as the environment's `EvaluationManager` does, plus a Wilson 95% interval per rate:
   with 50 vignettes a rate is only known to about +-13 points, so read differences with care.

Outputs under `--out` (one directory per evaluated run, named after the run directory):
    OUT/<run>/responses.jsonl   one line per vignette: id, prompt, response, reward, metrics (and the
                                context/expected_final, so the file can be re-scored with --responses)
    OUT/<run>/summary.json      rewards.summarize(...) + the run's label, step, penalty and settings
    OUT/table.md                the published layout, one column per run
    OUT/curriculum.png          rates and mean reward against the global step, blocks shaded by penalty

Existing results are never silently replaced: when OUT/<run>/summary.json already holds results with the
same settings (task, dataset, n, tokens, model, checkpoint step) they are reused, and the log says so;
when the settings differ, eval.py stops, before generating anything, and asks for --overwrite.
table.md and curriculum.png are views of the summaries of the runs listed, redrawn on every call.

`--responses FILE.jsonl` skips generation entirely and scores saved responses (rows with `context`,
`expected_final`, `response`), so the outputs of any model or API can be put in the same table.
`--task gsm8k` reports the GSM8K curriculum's KPIs (seed 002) instead.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

import rewards

# ---------------------------------------------------------------------------------------------------
# 1. The published settings (REFERENCE §3, "evaluation") and the published table (REFERENCE §1).
# ---------------------------------------------------------------------------------------------------

EVAL_N = 50               # vignettes per column
EVAL_MAX_NEW_TOKENS = 512
# The published sampler had a 4096-token KV cache (training rollouts: 2048). A cache is capacity, not a
# parameter of the result: model.generate sizes ours to (padded prompt + new tokens), which holds the
# same tokens and gives the same greedy output, faster. We only warn if a prompt would not have fit.
EVAL_KV_CACHE = 4096
EVAL_DATASET = "builtin"  # offline default; the published eval set is surfiniaburger/med-safety-gym-eval

# The published numbers (Gemma-3-1B-IT), drawn faintly behind our curve so a reproduction can be read
# against them at a glance. "low" (SFT mean/max reward) was not reported as a number.
PUBLISHED = {
    "model": "gemma-3-1b-it",
    "steps": [0, 300, 600, 900, 1200],  # 0 = SFT, the start of GRPO
    "safe_response_rate": [0.30, 0.64, 0.72, 0.88, 0.82],
    "medical_hallucination_rate": [0.50, 0.12, 0.14, 0.04, 0.12],
    "reasoning_consistency_rate": [0.30, 0.64, 0.70, 0.88, 0.80],
    "mean_reward": [None, -1.66, -2.08, 0.58, 0.12],
}

# ---------------------------------------------------------------------------------------------------
# 2. Reading saved responses. Anyone can score any model's outputs: one JSON object per line.
# ---------------------------------------------------------------------------------------------------

REQUIRED_KEYS = {"dipg": ("context", "expected_final", "response"), "gsm8k": ("answer", "response")}


def read_responses(path, task="dipg"):
    """Read a JSONL file of responses to score. Bad rows stop us with one line: file, row, what, fix."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file (pass a JSONL file of responses to --responses)")
    required = REQUIRED_KEYS[task]
    rows = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue  # blank lines (e.g. a trailing newline) are not rows
        where = f"{path}, row {line_no}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg}); each line must be one JSON object") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object with keys {', '.join(required)}")
        for key in required:
            if key not in row:
                raise ValueError(f"{where}: missing key '{key}' (every row needs {', '.join(required)})")
            if not isinstance(row[key], str):
                raise ValueError(f"{where}: key '{key}' must be a string, got {type(row[key]).__name__}")
        row.setdefault("id", f"{path.stem}-{line_no}")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no rows (expected one JSON object per line with {', '.join(required)})")
    return rows


# ---------------------------------------------------------------------------------------------------
# 3. Scoring. The reward code is the environment's, ported to pure Python in rewards.py; evaluation
#    uses its eval configuration and eval path (a parse ValueError falls back to the legacy scorer).
# ---------------------------------------------------------------------------------------------------

def score_dipg_rows(rows, responses):
    """Score one response per row. Returns records (what responses.jsonl holds) and the summary."""
    records = []
    for row, response in zip(rows, responses, strict=True):
        reward, metrics = rewards.score_dipg(
            response, row["context"], row["expected_final"], rewards.EVAL_CONFIG, mode="eval")
        records.append({
            "id": row.get("id"), "prompt": row.get("prompt"), "response": response,
            "reward": reward, "metrics": metrics,
            # Kept so responses.jsonl can be scored again on its own (eval.py --responses).
            "question": row.get("question"), "context": row["context"],
            "expected_final": row["expected_final"],
        })
    summary = rewards.summarize([(r["reward"], r["metrics"]) for r in records])
    return records, summary


def score_gsm8k_rows(rows, responses):
    """GSM8K: the seed-002 KPIs over the whole set; per row, the extracted answer."""
    records = [{
        "id": row.get("id"), "prompt": row.get("prompt"), "question": row.get("question"),
        "response": response, "answer": row["answer"], "extracted": rewards.extract_answer(response),
    } for row, response in zip(rows, responses, strict=True)]
    summary = rewards.phase_metrics([r["response"] for r in records], [r["answer"] for r in records])
    return records, summary


SCORERS = {"dipg": score_dipg_rows, "gsm8k": score_gsm8k_rows}

# ---------------------------------------------------------------------------------------------------
# 4. Evaluation rows and generation.
# ---------------------------------------------------------------------------------------------------


def load_eval_rows(task="dipg", dataset=None, n=EVAL_N):
    """The held-out rows to answer, each with the exact chat `prompt` the model sees."""
    import data  # imported here so that --responses needs neither datasets nor JAX

    if task == "dipg":
        source = dataset or EVAL_DATASET
        source = data.HUB_IDS["eval"] if source == "hub" else source  # name what actually runs
        rows = data.load_dipg(source, "eval", n=n)
        for row in rows:
            row["prompt"] = data.format_prompt(row["messages"][0]["content"])
        dataset_id = f"{source}:dipg/eval" if source == "builtin" else source
    else:
        source = dataset or "builtin"
        source = data.GSM8K_HUB_ID if source == "hub" else source
        rows = data.load_gsm8k(source, "test", n=n)
        for row in rows:
            row["prompt"] = data.gsm8k_prompt(row["question"])
        dataset_id = f"{source}:gsm8k/test" if source == "builtin" else source
    if n is not None and len(rows) < n:
        tqdm.write(f"[eval] note: {dataset_id} has only {len(rows)} rows (asked for {n})")
    return rows, dataset_id


def generate_responses(model, tokenizer, prompts, max_new_tokens=EVAL_MAX_NEW_TOKENS, batch_size=8,
                       desc="generating"):
    """Greedy decoding, batch by batch, under a progress bar with ETA. Returns model.generate's dicts."""
    import model as model_lib

    # One prompt length for every batch (the longest prompt, rounded up to a power of two as
    # model.generate does), so the sampler compiles once instead of once per batch shape.
    longest = max(len(tokenizer.encode(p)) for p in prompts) + 1  # + <bos>
    max_prompt_length = 1 << (longest - 1).bit_length()
    if max_prompt_length + max_new_tokens > EVAL_KV_CACHE:
        tqdm.write(f"[eval] note: prompts up to {longest} tokens + {max_new_tokens} new tokens exceed the "
                   f"published {EVAL_KV_CACHE}-token KV cache; the published setup could not have run them")
    outputs = []
    with tqdm(total=len(prompts), desc=desc, unit="vignette", dynamic_ncols=True) as bar:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start:start + batch_size]
            outputs += model_lib.generate(model, tokenizer, batch, max_new_tokens=max_new_tokens,
                                          temperature=0.0, batch_size=batch_size,
                                          max_prompt_length=max_prompt_length, progress=False)
            bar.update(len(batch))
    return outputs


def evaluate_model(model, tokenizer, rows, task="dipg", max_new_tokens=EVAL_MAX_NEW_TOKENS, batch_size=8,
                   desc="generating"):
    """Generate for every row and score. A model already in memory (e.g. inside train.py) starts here."""
    t0 = time.time()
    outputs = generate_responses(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens, batch_size, desc)
    seconds = time.time() - t0
    records, summary = SCORERS[task](rows, [o["text"] for o in outputs])
    for record, out in zip(records, outputs):
        record["n_tokens"] = out["n_tokens"]
    summary["generation_seconds"] = round(seconds, 2)
    summary["seconds_per_vignette"] = round(seconds / max(len(rows), 1), 3)
    summary["batch_size"] = batch_size
    return records, summary


# ---------------------------------------------------------------------------------------------------
# 5. Runs: what they are called, where results go, and when existing results may be reused.
# ---------------------------------------------------------------------------------------------------

PHASE_NAMES = {"sft": "SFT", "grpo": "GRPO", "format": "Format", "correctness": "Correctness",
               "generalize": "Generalize"}


def sft_steps(metadata):
    """How many of a run's global steps were SFT (train.py counts SFT steps in the global step)."""
    return sum(b["end_step"] - b["start_step"] + 1 for b in metadata.get("lineage") or []
               if b.get("phase") == "sft" and b.get("end_step") is not None)


def rl_step(metadata):
    """The step a GRPO/GSM8K column is known by: RL steps since SFT, as in the published "GRPO (300)"
    (a paper run's first GRPO block covers global steps 301-600 after 300 SFT steps)."""
    return (metadata.get("global_step") or 0) - sft_steps(metadata)


def run_label(metadata):
    """Column label from run metadata: "Base", "SFT", "GRPO (300)", "Format (200)", ..."""
    phase = metadata.get("phase") or "base"
    if phase == "base":
        return "Base"
    if phase == "sft":
        return "SFT"
    return f"{PHASE_NAMES.get(phase, phase.title())} ({rl_step(metadata)})"


def read_run_metadata(run):
    """RUN_DIR/metadata.json, or the stand-in for `base` (the base model, no LoRA, step 0)."""
    if run == "base":
        return {"phase": "base", "penalty": None, "global_step": 0, "lineage": []}
    path = Path(run) / "metadata.json"
    if not path.is_file():
        raise ValueError(f"{run}: no metadata.json (is this a run directory written by train.py? "
                         f"use 'base' for the model without LoRA)")
    return json.loads(path.read_text())


def result_dir_name(run):
    return "base" if run == "base" else Path(run).resolve().name


def check_existing(out_dir, settings, overwrite):
    """Return an existing summary with identical settings (to reuse), None (go ahead), or stop."""
    path = Path(out_dir) / "summary.json"
    if not path.is_file() or overwrite:
        return None
    old = json.loads(path.read_text())
    if old.get("settings") == settings:
        return old
    changed = sorted(k for k in set(settings) | set(old.get("settings", {}))
                     if settings.get(k) != old.get("settings", {}).get(k))
    raise ValueError(f"{path} holds results with different settings ({', '.join(changed)}); "
                     f"pass --overwrite to replace them or choose another --out")


def write_results(out_dir, records, summary):
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "responses.jsonl", "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")


def describe_run(run, metadata):
    """What a summary carries about its run, so table and plot can be rebuilt from summary.json alone."""
    return {"label": run_label(metadata), "run_dir": None if run == "base" else str(run),
            "phase": metadata.get("phase") or "base", "penalty": metadata.get("penalty"),
            "start_step": metadata.get("start_step"), "global_step": metadata.get("global_step"),
            "sft_steps": sft_steps(metadata), "lineage": metadata.get("lineage", [])}


def resolve_model_name(run, metadata, model_name=None):
    """The base model: the run's own (a LoRA checkpoint fits only that), else --model, else the 270M."""
    if run != "base" and model_name and metadata.get("model") not in (None, model_name):
        raise ValueError(f"{run} was trained on {metadata.get('model')}, not --model {model_name}: "
                         f"a LoRA checkpoint only fits the base model it was trained on")
    return model_name or metadata.get("model") or "gemma-3-270m"


def eval_settings(run, metadata, rows, *, task, dataset_id, model_name, model_path, max_new_tokens):
    """What makes two evaluations the same evaluation (stored in summary.json, compared before reuse)."""
    return {"task": task, "dataset": dataset_id, "n": len(rows), "max_new_tokens": max_new_tokens,
            "decoding": "greedy", "model": model_name, "model_path": model_path or metadata.get("model_path"),
            "lora": run != "base", "checkpoint_step": metadata.get("global_step")}


def evaluate_loaded(run, metadata, model, tokenizer, rows, *, task="dipg", dataset_id=EVAL_DATASET,
                    model_name=None, model_path=None, max_new_tokens=EVAL_MAX_NEW_TOKENS, batch_size=8,
                    out_dir=None, load_seconds=None):
    """Evaluate a model already in memory as run `run` (train.py does this after each block)."""
    records, summary = evaluate_model(model, tokenizer, rows, task, max_new_tokens, batch_size,
                                      desc=run_label(metadata))
    summary.update(describe_run(run, metadata), checkpoint_step=metadata.get("checkpoint_step"))
    summary["settings"] = eval_settings(run, metadata, rows, task=task, dataset_id=dataset_id,
                                        model_name=model_name or metadata.get("model"), model_path=model_path,
                                        max_new_tokens=max_new_tokens)
    if load_seconds is not None:
        summary["load_seconds"] = round(load_seconds, 2)
    if out_dir is not None:
        write_results(out_dir, records, summary)
    return summary


def evaluate_run(run, rows, *, task="dipg", dataset_id=EVAL_DATASET, model_name=None, model_path=None,
                 max_new_tokens=EVAL_MAX_NEW_TOKENS, batch_size=8, out_dir=None, overwrite=False):
    """Load a run directory (or "base") and evaluate it on `rows`; write OUT files when out_dir is given.

    Returns the summary: rewards.summarize(...) (or phase_metrics for GSM8K) plus label, phase,
    penalty, global_step, lineage, settings, timings.
    """
    import model as model_lib

    metadata = read_run_metadata(run)
    name = resolve_model_name(run, metadata, model_name)
    settings = eval_settings(run, metadata, rows, task=task, dataset_id=dataset_id, model_name=name,
                             model_path=model_path, max_new_tokens=max_new_tokens)
    if out_dir is not None:
        existing = check_existing(out_dir, settings, overwrite)
        if existing is not None:
            tqdm.write(f"[eval] {existing['label']}: reusing {Path(out_dir) / 'summary.json'} "
                       f"(same settings, already evaluated; --overwrite to recompute)")
            return existing

    tqdm.write(f"[eval] {run_label(metadata)}: model {name}"
               + (f" + LoRA from {run}" if run != "base" else " (no LoRA)")
               + f" | dataset {dataset_id} ({len(rows)} rows) | greedy, {max_new_tokens} new tokens, "
               f"batch {batch_size}")
    t0 = time.time()
    if run == "base":
        model, tokenizer, _ = model_lib.load(name, model_path=model_path)
    else:
        model, tokenizer, metadata = model_lib.load_run(run, model_path=model_path)
    return evaluate_loaded(run, metadata, model, tokenizer, rows, task=task, dataset_id=dataset_id,
                           model_name=name, model_path=model_path, max_new_tokens=max_new_tokens,
                           batch_size=batch_size, out_dir=out_dir, load_seconds=time.time() - t0)


def evaluate_responses_file(path, *, task="dipg", out_dir=None, overwrite=False):
    """Score a saved JSONL of responses, no model needed. Same summary.json as a run."""
    rows = read_responses(path, task)
    settings = {"task": task, "responses": str(Path(path).resolve()), "n": len(rows)}
    if out_dir is not None and (Path(out_dir) / "summary.json").is_file() and not overwrite:
        # Scoring is cheap, so unlike a run we never reuse: same settings or not, ask before replacing.
        raise ValueError(f"{Path(out_dir) / 'summary.json'} exists; pass --overwrite to replace it")
    records, summary = SCORERS[task](rows, [row["response"] for row in rows])
    summary.update(label=Path(path).stem, run_dir=None, phase=None, penalty=None, start_step=None,
                   global_step=None, lineage=[], settings=settings)
    if out_dir is not None:
        write_results(out_dir, records, summary)
    return summary


# ---------------------------------------------------------------------------------------------------
# 6. The table, in the published layout: the five published rows first, then the rest we know.
# ---------------------------------------------------------------------------------------------------


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
    ],
    "gsm8k": [
        ("Answer Extraction", "answer_extraction_rate", _pct),
        ("Refusal Rate", "refusal_rate", _pct),
        ("Accuracy", "accuracy", _pct),
        ("Mean Length (chars)", "mean_length", _num(1)),
        ("Mean Wrong-Answer Length (chars)", "mean_wrong_length", _num(1)),
        ("Strict Format Rate", "format_rate", _pct),
    ],
}


def format_table(summaries, task="dipg"):
    """Markdown table: one row per metric, one column per summary (labelled by summary["label"])."""
    rows = TABLE_ROWS[task]
    lines = ["| Metric | " + " | ".join(s["label"] for s in summaries) + " |",
             "|---|" + "---|" * len(summaries)]
    lines += [f"| {name} | " + " | ".join(fmt(s.get(key)) for s in summaries) + " |"
              for name, key, fmt in rows]
    ns = sorted({s.get("total") for s in summaries if s.get("total") is not None})
    settings = summaries[0].get("settings", {}) if summaries else {}
    how = "scored with rewards.EVAL_CONFIG (the environment's evaluation path)" if task == "dipg" \
        else "GSM8K KPIs of rewards.phase_metrics"
    if settings.get("max_new_tokens"):
        how = f"{settings.get('model')}, greedy, {settings['max_new_tokens']} new tokens, " \
              f"{settings.get('dataset')}; " + how
    lines += ["", f"n = {', '.join(map(str, ns))} per column; {how}."]
    return "\n".join(lines) + "\n"


def write_table(summaries, path, task="dipg"):
    text = format_table(summaries, task)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)
    return text


# ---------------------------------------------------------------------------------------------------
# 7. The curriculum as a picture: each rate (with its 95% interval) and the mean reward against the
#    global step, every training block shaded by its penalty level. SFT (and Base) sit at step 0,
#    where GRPO starts.
# ---------------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------------
# 8. The command line.
# ---------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--runs", nargs="+", metavar="RUN",
                      help="run directories (written by train.py), or 'base' for the model without LoRA")
    what.add_argument("--responses", nargs="+", metavar="FILE.jsonl",
                      help="score saved responses, no model (rows: context, expected_final, response)")
    p.add_argument("--task", choices=["dipg", "gsm8k"], default="dipg")
    p.add_argument("--model", default=None,
                   help="base model name for 'base' (default: the runs' model, else gemma-3-270m)")
    p.add_argument("--model-path", default=None, help="local weights for the base model")
    p.add_argument("--dataset", default=None,
                   help="eval set: 'builtin' (generated offline, the default), 'hub' (the published "
                        "surfiniaburger/med-safety-gym-eval, or openai/gsm8k), another hub id, or a JSONL path")
    p.add_argument("--n", type=int, default=EVAL_N, help="number of eval prompts")
    p.add_argument("--max-new-tokens", type=int, default=EVAL_MAX_NEW_TOKENS)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", default="results", help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace existing results under --out")
    p.add_argument("--no-published", action="store_true", help="don't draw the published curve")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    expected_errors = (ValueError, FileNotFoundError)  # bad input: one line, no traceback
    if args.runs:
        import model as model_lib
        expected_errors += (model_lib.WeightsUnavailable,)
    try:
        names = [Path(f).stem for f in args.responses] if args.responses else \
            [result_dir_name(r) for r in args.runs]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"two inputs would write to the same {out / duplicates[0]}: "
                             f"rename one, or evaluate them with different --out directories")
        if args.responses:
            summaries = [evaluate_responses_file(f, task=args.task, out_dir=out / name,
                                                 overwrite=args.overwrite)
                         for f, name in zip(args.responses, names)]
        else:
            metadata = [read_run_metadata(run) for run in args.runs]
            model_name = args.model or next((m.get("model") for r, m in zip(args.runs, metadata)
                                             if r != "base"), None)
            rows, dataset_id = load_eval_rows(args.task, args.dataset, args.n)
            for run, meta, name in zip(args.runs, metadata, names):  # any refusal before any generation
                check_existing(out / name, eval_settings(
                    run, meta, rows, task=args.task, dataset_id=dataset_id,
                    model_name=resolve_model_name(run, meta, model_name), model_path=args.model_path,
                    max_new_tokens=args.max_new_tokens), args.overwrite)
            summaries = [evaluate_run(run, rows, task=args.task, dataset_id=dataset_id,
                                      model_name=model_name, model_path=args.model_path,
                                      max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                      out_dir=out / name,
                                      overwrite=args.overwrite)
                         for run, name in zip(args.runs, names)]
    except expected_errors as e:
        sys.exit(f"eval.py: error: {e}")

    # table.md and curriculum.png are views of the summaries above, so they are always redrawn.
    table = write_table(summaries, out / "table.md", args.task)
    views = [out / "table.md"]
    if args.runs:  # saved responses have no training step to plot against
        published = None if args.no_published or args.task != "dipg" else PUBLISHED
        views.append(plot_curriculum(summaries, out / "curriculum.png", args.task, published=published))
    for name, s in zip(names, summaries):
        print(f"[eval] {s['label']}: {out / name}/responses.jsonl, summary.json")
    print(f"[eval] {', '.join(map(str, views))}\n")
    print(table)
    return summaries


if __name__ == "__main__":
    main()
