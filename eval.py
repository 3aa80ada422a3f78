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
`--reference-policies` adds a column per scripted policy (vignettes.REFERENCE_POLICIES, e.g. "always
abstain"), scored the same way: what a trick earns, without any model.
`--task gsm8k` reports the GSM8K curriculum's KPIs (seed 002) instead.
"""

import argparse
import json
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

import gsm8k
import rewards
import runs

# ---------------------------------------------------------------------------------------------------
# 1. The published settings (REFERENCE §3, "evaluation") and the published table (REFERENCE §1).
# ---------------------------------------------------------------------------------------------------

EVAL_N = 50               # vignettes per column
EVAL_MAX_NEW_TOKENS = 512
# The published sampler had a 4096-token KV cache (training rollouts: 2048). A cache is capacity, not a
# parameter of the result: model.generate sizes ours to (padded prompt + new tokens), which holds the
# same tokens and gives the same greedy output, faster. We only note it if a prompt would not have fit.
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
        reward, metrics, outcome = rewards.score_dipg_outcome(
            response, row["context"], row["expected_final"], rewards.EVAL_CONFIG, mode="eval")
        records.append({
            "id": row.get("id"), "prompt": row.get("prompt"), "response": response,
            "reward": reward, "metrics": metrics, "outcome": outcome["outcome"],  # the rung of the ladder
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
        "response": response, "answer": row["answer"], "extracted": gsm8k.extract_answer(response),
    } for row, response in zip(rows, responses, strict=True)]
    summary = gsm8k.phase_metrics([r["response"] for r in records], [r["answer"] for r in records])
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
        source = gsm8k.GSM8K_HUB_ID if source == "hub" else source
        rows = gsm8k.load_gsm8k(source, "test", n=n)
        for row in rows:
            row["prompt"] = gsm8k.gsm8k_prompt(row["question"])
        dataset_id = f"{source}:gsm8k/test" if source == "builtin" else source
    if n is not None and len(rows) < n:
        tqdm.write(f"[eval] note: {dataset_id} has only {len(rows)} rows (asked for {n})")
    return rows, dataset_id


def evaluate_model(model, tokenizer, rows, task="dipg", max_new_tokens=EVAL_MAX_NEW_TOKENS, batch_size=8,
                   desc="generating"):
    """Generate for every row (greedy) and score. A model already in memory (e.g. inside train.py) starts here."""
    import model as model_lib

    prompts = [r["prompt"] for r in rows]
    # One padded prompt length for every batch, so the sampler compiles once for the whole set.
    longest, prompt_length = model_lib.padded_prompt_length(tokenizer, prompts)
    if prompt_length + max_new_tokens > EVAL_KV_CACHE:
        tqdm.write(f"[eval] note: prompts up to {longest} tokens + {max_new_tokens} new tokens exceed the "
                   f"published {EVAL_KV_CACHE}-token KV cache; the published setup could not have run them")
    t0 = time.time()
    outputs = model_lib.generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=0.0,
                                 batch_size=batch_size, max_prompt_length=prompt_length, desc=desc)
    seconds = time.time() - t0
    records, summary = SCORERS[task](rows, [o["text"] for o in outputs])
    for record, out in zip(records, outputs):
        record["n_tokens"] = out["n_tokens"]
    summary["generation_seconds"] = round(seconds, 2)
    summary["seconds_per_vignette"] = round(seconds / max(len(rows), 1), 3)
    summary["batch_size"] = batch_size
    return records, summary


def reference_summaries(rows):
    """One summary per scripted policy of vignettes.REFERENCE_POLICIES (name -> fn(row) -> response),
    scored on `rows` exactly like a model's responses, labelled as a table column ("Always abstain")."""
    try:
        import vignettes
        policies = vignettes.REFERENCE_POLICIES
    except (ImportError, AttributeError):
        tqdm.write("[eval] note: vignettes.REFERENCE_POLICIES does not exist yet; no reference columns")
        return []
    summaries = []
    for name, policy in policies.items():
        _, summary = score_dipg_rows(rows, [policy(row) for row in rows])
        summary.update(not_a_run(name[:1].upper() + name[1:].replace("_", " "), phase="reference"))
        summaries.append(summary)
    return summaries


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
    metadata = runs.read_metadata(run)
    if metadata is None:
        raise ValueError(f"{run}: no metadata.json (is this a run directory written by train.py? "
                         f"use 'base' for the model without LoRA)")
    return metadata


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
    runs.write_json(out_dir / "summary.json", summary)


def describe_run(run, metadata):
    """What a summary carries about its run, so table and plot can be rebuilt from summary.json alone."""
    return {"label": run_label(metadata), "run_dir": None if run == "base" else str(run),
            "phase": metadata.get("phase") or "base", "penalty": metadata.get("penalty"),
            "start_step": metadata.get("start_step"), "global_step": metadata.get("global_step"),
            "sft_steps": sft_steps(metadata), "lineage": metadata.get("lineage", [])}


def not_a_run(label, phase=None):
    """describe_run's fields for a column that no training run made (saved responses, a scripted policy)."""
    return {"label": label, "run_dir": None, "phase": phase, "penalty": None, "start_step": None,
            "global_step": None, "lineage": []}


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
    summary.update(not_a_run(Path(path).stem), settings=settings)
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


def format_table(summaries, task="dipg", references=()):
    """Markdown table: one row per metric, one column per summary (labelled by summary["label"]), then
    one per reference policy (reference_summaries)."""
    rows = TABLE_ROWS[task]
    references = list(references)
    summaries = list(summaries) + references
    lines = ["| Metric | " + " | ".join(s["label"] for s in summaries) + " |",
             "|---|" + "---|" * len(summaries)]
    lines += [f"| {name} | " + " | ".join(fmt(s.get(key)) for s in summaries) + " |"
              for name, key, fmt in rows]
    ns = sorted({s.get("total") for s in summaries if s.get("total") is not None})
    settings = summaries[0].get("settings", {}) if summaries else {}
    how = "scored with rewards.EVAL_CONFIG (the environment's evaluation path)" if task == "dipg" \
        else "GSM8K KPIs of gsm8k.phase_metrics"
    if settings.get("max_new_tokens"):
        how = f"{settings.get('model')}, greedy, {settings['max_new_tokens']} new tokens, " \
              f"{settings.get('dataset')}; " + how
    lines += ["", f"n = {', '.join(map(str, ns))} per column; {how}."]
    if references:
        lines.append(f"{', '.join(s['label'] for s in references)}: scripted policies "
                     "(vignettes.REFERENCE_POLICIES), no model, scored the same way.")
    return "\n".join(lines) + "\n"


def write_table(summaries, path, task="dipg", references=()):
    text = format_table(summaries, task, references)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)
    return text


# ---------------------------------------------------------------------------------------------------
# 7. The curriculum as a picture: each rate (with its 95% interval) and the mean reward against the
#    GRPO step, every training block shaded by its penalty level (drawn by curriculum_plot.py).
# ---------------------------------------------------------------------------------------------------

def plot_curriculum(summaries, path, task="dipg", title=None, published=None):
    """Save the curriculum figure to `path` (PNG). summaries: dicts as in summary.json; `published`
    (e.g. PUBLISHED) is drawn faintly behind."""
    from curriculum_plot import plot_curriculum as draw  # matplotlib, only when drawing

    return draw(summaries, path, task, title=title, published=published)


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
    p.add_argument("--reference-policies", action="store_true",
                   help="add a table column per scripted policy of vignettes.REFERENCE_POLICIES (dipg only)")
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
        if args.reference_policies and args.task != "dipg":
            raise ValueError("--reference-policies scores DIPG responses; it does not apply to --task gsm8k")
        if args.responses:
            summaries = [evaluate_responses_file(f, task=args.task, out_dir=out / name,
                                                 overwrite=args.overwrite)
                         for f, name in zip(args.responses, names)]
            rows = read_responses(args.responses[0], args.task)  # the policies answer the first file's rows
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
        references = reference_summaries(rows) if args.reference_policies else []
    except expected_errors as e:
        sys.exit(f"eval.py: error: {e}")

    # table.md and curriculum.png are views of the summaries above, so they are always redrawn.
    table = write_table(summaries, out / "table.md", args.task, references)
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
