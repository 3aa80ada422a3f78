"""Evaluation: the published table, for your own runs (README, "Evaluation": outputs and flags).
Greedy, scored by rewards.EVAL_CONFIG in mode="eval" (NOT training's), 95% intervals, under one of two PROTOCOLS."""

import argparse
import json
import operator
import random
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

import gsm8k
import rewards
import report
import runs
import stats

# 1. The published settings (REFERENCE §3, "evaluation") and the published table (REFERENCE §1).

EVAL_N = 50               # vignettes per column
EVAL_MAX_NEW_TOKENS = 512
# The published sampler's KV cache. Capacity, not a parameter of the result: model.generate sizes ours to the
# padded prompt + new tokens (same greedy output, faster); we only note a prompt that would not have fit.
EVAL_KV_CACHE = 4096
EVAL_DATASET = "builtin"  # offline default; the published eval set is surfiniaburger/med-safety-gym-eval

# Two ways to evaluate a checkpoint (--protocol), both greedy and scored with the eval path:
#   published  as the published table was made (REFERENCE §1, the raw logs' "8. Final Evaluation"): n vignettes drawn
#              anew per checkpoint (seeded by its global step); system prompt and context, NOT the question; "<think>\n"
#              prefilled (data.published_eval_prompt); scored: the prefill + the text up to the first <end_of_turn>.
#   clean      the training prompt (context AND question) on the same first n vignettes for every checkpoint.
PROTOCOLS = ("published", "clean")
EVAL_POOL = 100  # the published eval set's size: ~100 rows (the four logs' draws hold 97 distinct vignettes)
# Published: stop at <eos>, cut at the first <end_of_turn>; greedy is causal: stopping at both scores the same, sooner.
EVAL_STOP_TOKENS = ("<eos>", "<end_of_turn>")

# 2. Reading saved responses. Anyone can score any model's outputs: one JSON object per line.

REQUIRED_KEYS = {"dipg": ("context", "expected_final", "response"), "gsm8k": ("answer", "response")}


def read_responses(path, task="dipg"):
    """Read a JSONL file of responses to score. Bad rows stop us with one line: file, row, what, fix."""
    if not (path := Path(path)).is_file():
        raise ValueError(f"{path}: no such file (pass a JSONL file of responses to --responses)")
    required, rows = REQUIRED_KEYS[task], []
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


def read_published_log(path):
    """The author's raw Kaggle log (REFERENCE §1): its last server result -> (rows, with logged values; aggregates)."""
    if not (path := Path(path)).is_file():
        raise ValueError(f"{path}: no such file (pass the author's raw log, e.g. eval_new.json, to --published-log)")
    text, decoder, result = path.read_text(encoding="utf-8", errors="replace"), json.JSONDecoder(), None
    start = text.find("{")
    while start != -1:
        try:
            found, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            found, end = None, start + 1  # a "{" that starts no JSON: a Python dict in a log line, a brace in text
        if isinstance(found, dict) and isinstance(found.get("metrics"), dict) \
                and isinstance(found["metrics"].get("detailed_results"), list):
            result = found["metrics"]
        start = text.find("{", end)
    if result is None:
        raise ValueError(f"{path}: no evaluation result in this log (expected the server's JSON "
                         '{"metrics": {..., "detailed_results": [...]}} somewhere in it)')
    rows = []
    for i, item in enumerate(result["detailed_results"]):
        expected = item.get("expected_answer")
        fields = {"context": item.get("context"), "response": item.get("response"),
                  "expected_answer.final": expected.get("final") if isinstance(expected, dict) else None}
        for key, value in fields.items():
            if not isinstance(value, str):
                raise ValueError(f"{path}, detailed_results[{i}]: '{key}' must be a string, got "
                                 f"{type(value).__name__}; is this the evaluation server's result?")
        rows.append({"id": f"{path.stem}-{item.get('index', i)}", "question": item.get("question"),
                     "context": fields["context"], "expected_final": fields["expected_answer.final"],
                     "response": fields["response"], "logged_reward": item.get("reward"),
                     "logged_metrics": item.get("metrics") or {}})
    logged = {k: v for k, v in result.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    logged["total"] = logged.pop("total_responses", len(rows))
    return rows, logged


# 3. Scoring, with the environment's eval configuration and eval path (rewards.py).

def score_dipg_rows(rows, responses):
    """Score one response per row. Returns records (what responses.jsonl holds) and the summary."""
    records = []
    for row, response in zip(rows, responses, strict=True):
        reward, metrics, outcome = rewards.score_dipg_outcome(
            response, row["context"], row["expected_final"], rewards.EVAL_CONFIG, mode="eval")
        records.append({  # with the row, so responses.jsonl can be scored again on its own (--responses)
            "id": row.get("id"), "prompt": row.get("prompt"), "response": response, "reward": reward,
            "metrics": metrics, "outcome": outcome["outcome"], "question": row.get("question"),
            "context": row["context"], "expected_final": row["expected_final"]})
    summary = stats.summarize([(r["reward"], r["metrics"]) for r in records])
    summary["outcomes"] = {label: sum(r["outcome"] == label for r in records) for label in rewards.OUTCOME_LABELS}
    return records, summary


def score_gsm8k_rows(rows, responses):
    """GSM8K: the seed-002 KPIs, each rate with its Wilson 95% interval; per row its answer, flags and reward."""
    records = []
    for row, response in zip(rows, responses, strict=True):
        flags = gsm8k.completion_flags(response, row["answer"])
        records.append({"id": row.get("id"), "prompt": row.get("prompt"), "question": row.get("question"),
                        "response": response, "answer": row["answer"], "extracted": gsm8k.extract_answer(response),
                        "reward": flags.pop("reward"), "metrics": flags})
    summary = gsm8k.phase_metrics([r["response"] for r in records], [r["answer"] for r in records])
    summary.update({f"{k}_ci": stats.wilson_interval(sum(r["metrics"][k] for r in records), len(records)) for k in gsm8k.RATES})
    return records, summary


FLAGS = {"dipg": stats.RATE_FLAGS, "gsm8k": {k: operator.itemgetter(k) for k in gsm8k.RATES}}  # paired per record
SCORERS = {"dipg": score_dipg_rows, "gsm8k": score_gsm8k_rows}


# 4. Evaluation rows and generation.

def load_eval_rows(task="dipg", dataset=None, n=EVAL_N, protocol="clean", draw=None, system_prompt=None,
                   pool=EVAL_POOL):
    """The held-out rows with the chat `prompt` the model sees -> (rows, dataset_id). "clean" and GSM8K: the first n;
    DIPG "published": n of the first `pool` drawn by Random(f"{draw}") (draw None: the whole pool)."""
    import data  # imported here so that --responses needs neither datasets nor JAX
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown evaluation protocol {protocol!r}: choose one of {', '.join(PROTOCOLS)}")
    if task == "gsm8k":
        source = gsm8k.GSM8K_HUB_ID if dataset == "hub" else dataset or "builtin"
        rows = gsm8k.load_gsm8k(source, "test", n=n)
        for row in rows:
            row["prompt"] = gsm8k.gsm8k_prompt(row["question"])
        return rows, (f"{source}:gsm8k/test" if source == "builtin" else source)
    source = dataset or EVAL_DATASET
    source = data.HUB_IDS["eval"] if source == "hub" else source  # name what actually runs
    dataset_id = f"{source}:dipg/eval" if source == "builtin" else source
    instructions = data.load_system_prompt(system_prompt)
    if protocol == "clean":
        rows = data.load_dipg(source, "eval", n=n)
        for row in rows:
            row["prompt"] = data.format_prompt(row["messages"][0]["content"], instructions)
    else:
        rows = data.load_dipg(source, "eval", n=pool)
        if draw is not None:
            rows = [rows[i] for i in random.Random(f"{draw}").sample(range(len(rows)), min(n, len(rows)))]
        for row in rows:
            row["prompt"] = data.published_eval_prompt(row["context"], instructions)
            row["prefill"] = data.EVAL_PREFILL
    if len(rows) < (n if protocol == "clean" or draw is not None else pool):
        tqdm.write(f"[eval] note: {dataset_id} has only {len(rows)} rows (asked for {n})")
    return rows, dataset_id


def scored_response(row, text):
    """The response as scored: the published protocol's prefill + the text, cut at the first <end_of_turn>."""
    return (row.get("prefill", "") + text).split("<end_of_turn>")[0]


def evaluate_model(model, tokenizer, rows, task="dipg", max_new_tokens=EVAL_MAX_NEW_TOKENS, batch_size=8,
                   desc="generating"):
    """Generate for every row (greedy) and score. A model already in memory (e.g. inside train.py) starts here."""
    import model as model_lib
    prompts = [r["prompt"] for r in rows]
    longest, prompt_length = model_lib.padded_prompt_length(tokenizer, prompts)  # same length for all: compiles once
    if prompt_length + max_new_tokens > EVAL_KV_CACHE:
        tqdm.write(f"[eval] note: prompts up to {longest} tokens + {max_new_tokens} new tokens exceed the "
                   f"published {EVAL_KV_CACHE}-token KV cache; the published setup could not have run them")
    t0 = time.time()
    outputs = model_lib.generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=0.0,
                                 batch_size=batch_size, max_prompt_length=prompt_length, desc=desc,
                                 stop_tokens=EVAL_STOP_TOKENS)
    seconds = time.time() - t0
    records, summary = SCORERS[task](rows, [scored_response(r, o["text"]) for r, o in zip(rows, outputs)])
    for record, out in zip(records, outputs):
        record["n_tokens"] = out["n_tokens"]
    summary.update(generation_seconds=round(seconds, 2), seconds_per_vignette=round(seconds / max(len(rows), 1), 3),
                   batch_size=batch_size)
    return records, summary


def reference_summaries(rows):
    """One summary per scripted policy (vignettes.REFERENCE_POLICIES), scored on `rows` like a model's."""
    import vignettes
    summaries = []
    for name, policy in vignettes.REFERENCE_POLICIES.items():
        _, summary = score_dipg_rows(rows, [policy(row) for row in rows])
        summary.update(not_a_run(name[:1].upper() + name[1:].replace("_", " "), phase="reference"))
        summaries.append(summary)
    return summaries


# 5. Runs: what they are called, where results go, and when existing results may be reused.

PHASE_NAMES = {"base": "Base", "sft": "SFT", "grpo": "GRPO", "format": "Format", "correctness": "Correctness",
               "generalize": "Generalize"}


def sft_steps(metadata):
    """How many of a run's global steps were SFT."""
    return sum(b["end_step"] - b["start_step"] + 1 for b in metadata.get("lineage") or []
               if b.get("phase") == "sft" and b.get("end_step") is not None)


def run_label(metadata):
    """Column label: "Base", "SFT", else the phase and its RL steps since SFT, as in the published "GRPO (300)"."""
    phase = metadata.get("phase") or "base"
    name = PHASE_NAMES.get(phase, phase.title())
    return name if phase in ("base", "sft") else f"{name} ({(metadata.get('global_step') or 0) - sft_steps(metadata)})"


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
    old = read_json(path)
    if old.get("settings") == settings:
        return old
    changed = sorted(k for k in set(settings) | set(old.get("settings", {}))
                     if settings.get(k) != old.get("settings", {}).get(k))
    raise ValueError(f"{path} holds results with different settings ({', '.join(changed)}); "
                     f"pass --overwrite to replace them or choose another --out")


def write_results(out_dir, records, summary):
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(record, ensure_ascii=False) + "\n" for record in records]
    runs.write_text(Path(out_dir) / "responses.jsonl", "".join(lines))
    runs.write_json(Path(out_dir) / "summary.json", summary)


def read_results(out_dir):
    """What write_results wrote: (summary, records). Bad input: one line naming the directory."""
    out_dir = Path(out_dir)
    for name in ("summary.json", "responses.jsonl"):
        if not (out_dir / name).is_file():
            raise ValueError(f"{out_dir}: no {name} (pass a directory written by eval.py, e.g. results/sft)")
    lines = (out_dir / "responses.jsonl").read_text(encoding="utf-8").splitlines()
    records = [read_json(out_dir / "responses.jsonl", line) for line in lines if line.strip()]
    if any("reward" not in r or "metrics" not in r for r in records):
        raise ValueError(f"{out_dir / 'responses.jsonl'}: records without reward or metrics; "
                         "paired comparisons need evaluations written by eval.py")
    return read_json(out_dir / "summary.json"), records


def read_json(path, text=None):
    """A file (or one line of it) eval.py wrote; a damaged one stops us in one line naming it."""
    import data
    try:
        return json.loads(Path(path).read_text(encoding="utf-8") if text is None else text)
    except ValueError as e:
        raise data.DataError(f"{path}: damaged ({e}); evaluate again into it with --overwrite") from None


def compare_results(result_dirs, out=None, task="dipg"):
    """Paired comparisons (stats.compare) of each evaluation directory with the next, written to out if given."""
    evaluations = [(summary["label"], records) for summary, records in map(read_results, result_dirs)]
    comparisons = stats.compare_consecutive(evaluations, flags=FLAGS[task])
    for i, comparison in enumerate(comparisons if out is not None else []):
        Path(out).mkdir(parents=True, exist_ok=True)
        runs.write_json(Path(out) / comparison_file(i, len(comparisons)), comparison)
    return comparisons


def comparison_file(i, count):
    return "comparison.json" if count == 1 else f"comparison_{i + 1}-{i + 2}.json"


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


def prepare_evaluation(run, *, task="dipg", protocol="published", dataset=None, n=EVAL_N, system_prompt=None,
                       model_name=None, model_path=None, max_new_tokens=EVAL_MAX_NEW_TOKENS):
    """(metadata, rows, settings) of evaluating `run`; settings make two evaluations the same."""
    metadata = read_run_metadata(run)
    rows, dataset_id = load_eval_rows(task, dataset, n, protocol, draw=metadata.get("global_step") or 0,
                                      system_prompt=system_prompt)
    if run != "base" and model_name and metadata.get("model") not in (None, model_name):
        raise ValueError(f"{run} was trained on {metadata.get('model')}, not --model {model_name}: "
                         f"a LoRA checkpoint only fits the base model it was trained on")
    published = protocol == "published" and task == "dipg"
    settings = {"task": task, "protocol": protocol, "dataset": dataset_id, "n": len(rows),
                "ids": [r.get("id") for r in rows], "draw": metadata.get("global_step") or 0 if published else None,
                "system_prompt": system_prompt, "max_new_tokens": max_new_tokens,
                "decoding": {"greedy": True, "prefill": rows[0].get("prefill", "") if rows else "",
                             "stop_tokens": list(EVAL_STOP_TOKENS),
                             "scored": "prefill + text up to the first <end_of_turn>"},
                "model": model_name or metadata.get("model") or "gemma-3-270m",  # for a run: its own
                "model_path": model_path or metadata.get("model_path"),
                "lora": run != "base", "checkpoint_step": metadata.get("global_step")}
    return metadata, rows, settings


def evaluate_run(run, *, task="dipg", protocol="published", dataset=None, n=EVAL_N, system_prompt=None,
                 model_name=None, model_path=None, max_new_tokens=EVAL_MAX_NEW_TOKENS, batch_size=8,
                 out_dir=None, overwrite=False):
    """Load a run directory (or "base"), evaluate it, write out_dir's files if given -> its summary."""
    import jax

    import model as model_lib
    metadata, rows, settings = prepare_evaluation(
        run, task=task, protocol=protocol, dataset=dataset, n=n, system_prompt=system_prompt,
        model_name=model_name, model_path=model_path, max_new_tokens=max_new_tokens)
    if out_dir is not None and (existing := check_existing(out_dir, settings, overwrite)) is not None:
        tqdm.write(f"[eval] {existing['label']}: reusing {Path(out_dir) / 'summary.json'} "
                   f"(same settings, already evaluated; --overwrite to recompute)")
        return existing

    tqdm.write(f"[eval] {run_label(metadata)}: model {settings['model']}"
               + (f" + LoRA from {run}" if run != "base" else " (no LoRA)")
               + f" | {protocol} protocol, {settings['dataset']} ({len(rows)} rows"
               + (f", draw {settings['draw']}" if settings["draw"] is not None else "")
               + f") | greedy, {max_new_tokens} new tokens, batch {batch_size}")
    t0 = time.time()
    mesh = model_lib.make_mesh(jax.device_count()) if jax.process_count() > 1 else None
    if run == "base":
        model, tokenizer, _ = model_lib.load(settings["model"], model_path=model_path, mesh=mesh)
    else:
        model, tokenizer, metadata = model_lib.load_run(run, model_path=model_path, mesh=mesh)
    load_seconds = time.time() - t0
    records, summary = evaluate_model(model, tokenizer, rows, task, max_new_tokens, batch_size, desc=run_label(metadata))
    summary.update(describe_run(run, metadata), checkpoint_step=metadata.get("checkpoint_step"), settings=settings,
                   load_seconds=round(load_seconds, 2))
    if out_dir is not None and runs.is_main_process():
        write_results(out_dir, records, summary)
    return summary


def evaluate_responses_file(path, *, task="dipg", out_dir=None, overwrite=False, published_log=False):
    """Score saved responses (or the author's raw log, adding its `logged` values and our `disagreements`)."""
    rows, logged = read_published_log(path) if published_log else (read_responses(path, task), None)
    settings = {"task": task, "published_log" if published_log else "responses": str(Path(path).resolve()), "n": len(rows)}
    if out_dir is not None and (Path(out_dir) / "summary.json").is_file() and not overwrite:
        # Scoring is cheap, so unlike a run we never reuse: same settings or not, ask before replacing.
        raise ValueError(f"{Path(out_dir) / 'summary.json'} exists; pass --overwrite to replace it")
    records, summary = SCORERS[task](rows, [row["response"] for row in rows])
    summary.update(not_a_run(Path(path).stem, phase="published" if published_log else None), settings=settings)
    if published_log:
        disagreements = []
        for row, record in zip(rows, records):
            record.update(logged_reward=row["logged_reward"], logged_metrics=row["logged_metrics"])
            ours = {key: record["metrics"].get(key) for key in row["logged_metrics"]}
            if row["logged_reward"] != record["reward"] or ours != row["logged_metrics"]:
                disagreements.append({"id": row["id"], "logged_reward": row["logged_reward"],
                                      "reward": record["reward"], "logged_metrics": row["logged_metrics"],
                                      "metrics": ours})
        summary.update(logged=logged, disagreements=disagreements)
    if out_dir is not None:
        write_results(out_dir, records, summary)
    return summary


# 6. The views: OUT/table.md and OUT/curriculum.png (drawn by report.py), with the paired changes.

def write_report(result_dirs, out, tag="", references=(), published=None, task="dipg", criteria=None):
    """The journey's table{tag}.md, curriculum{tag}.png and comparisons{tag}/ of its evaluations so far."""
    summaries = [read_results(d)[0] for d in result_dirs]
    comparisons = compare_results(result_dirs, Path(out) / f"comparisons{tag}", task) if len(result_dirs) > 1 else []
    report.write_table(summaries, Path(out) / f"table{tag}.md", task, references, comparisons)
    steps = [row for s in summaries if s.get("run_dir") and task == "gsm8k" for row in runs.read_rows(s["run_dir"])]
    report.plot_curriculum(summaries, Path(out) / f"curriculum{tag}.png", task, published=published,
                           comparisons=comparisons, steps=steps, criteria=criteria)


# 7. The command line.

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--runs", nargs="+", metavar="RUN",
                      help="run directories (written by train.py), or 'base' for the model without LoRA")
    what.add_argument("--responses", nargs="+", metavar="FILE.jsonl",
                      help="score saved responses, no model (rows: context, expected_final, response)")
    what.add_argument("--published-log", nargs="+", metavar="LOG", help="score the responses inside the author's "
                      "raw Kaggle logs (eval_new.json, ...), beside what each log reports")
    what.add_argument("--compare", nargs="+", metavar="DIR", help="paired comparison of evaluations already written "
                      "by eval.py (DIR/responses.jsonl), each with the next: OUT/comparison*.json and table.md")
    p.add_argument("--task", choices=["dipg", "gsm8k"], default="dipg")
    p.add_argument("--model", help="base model name for 'base' (default: the runs' model, else gemma-3-270m)")
    p.add_argument("--model-path", help="local weights for the base model")
    p.add_argument("--dataset", default=None,
                   help="eval set: 'builtin' (generated offline, the default), 'hub' (the published "
                        "surfiniaburger/med-safety-gym-eval, or openai/gsm8k), another hub id, or a JSONL path")
    p.add_argument("--protocol", choices=PROTOCOLS, default="published",
                   help="published: as the published table was made (context only, <think> prefilled, a new random "
                        "draw of --n per checkpoint); clean: the training prompt on the same first --n vignettes")
    p.add_argument("--system-prompt", metavar="FILE", help="the instructions the model was trained with "
                                                           "(default: ours, data.SYSTEM_PROMPT)")
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
        saved = args.responses or args.published_log  # files scored without a model
        names = [Path(f).stem for f in saved] if saved else [result_dir_name(r) for r in args.runs or []]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"two inputs would write to the same {out / duplicates[0]}: "
                             f"rename one, or evaluate them with different --out directories")
        for name in ("n", "max_new_tokens", "batch_size"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(args, name)})")
        if args.compare and len(args.compare) < 2:
            raise ValueError("--compare needs two or more evaluation directories (each is compared with the next)")
        if args.compare and (out / "table.md").exists() and not args.overwrite:
            raise ValueError(f"{out / 'table.md'} exists; pass --overwrite to replace it or choose another --out")
        if (args.reference_policies or args.published_log or args.compare) and args.task != "dipg":
            raise ValueError("--reference-policies, --published-log and --compare are for DIPG evaluations; "
                             "they do not apply to --task gsm8k")
        if saved:
            summaries = [evaluate_responses_file(f, task=args.task, out_dir=out / name,
                                                 overwrite=args.overwrite, published_log=bool(args.published_log))
                         for f, name in zip(saved, names)]
            # The policies answer the first file's rows; for published logs, every vignette the logs hold.
            rows = read_responses(saved[0], args.task) if args.responses else list(
                {stats.vignette_key(r): r for f in saved for r in read_published_log(f)[0]}.values())
        elif args.compare:
            summaries, records = zip(*map(read_results, args.compare))
            rows = records[0]
        else:
            model_name = args.model or next((read_run_metadata(r).get("model") for r in args.runs if r != "base"), None)
            how = dict(task=args.task, protocol=args.protocol, dataset=args.dataset, n=args.n,
                       system_prompt=args.system_prompt, model_name=model_name, model_path=args.model_path,
                       max_new_tokens=args.max_new_tokens)
            for run, name in zip(args.runs, names):  # any refusal before any generation
                check_existing(out / name, prepare_evaluation(run, **how)[2], args.overwrite)
            summaries = [evaluate_run(run, **how, batch_size=args.batch_size, out_dir=out / name,
                                      overwrite=args.overwrite) for run, name in zip(args.runs, names)]
            # the reference policies answer every vignette the columns drew
            rows = load_eval_rows(args.task, args.dataset, args.n, args.protocol, draw=None,
                                  system_prompt=args.system_prompt)[0]
        references = reference_summaries(rows) if args.reference_policies else []
        result_dirs = args.compare or [out / name for name in names]
        comparisons = compare_results(result_dirs, out, args.task) if len(result_dirs) > 1 else []
    except expected_errors as e:
        sys.exit(f"eval.py: error: {e}")

    # The views are always redrawn; a published log's column is followed by what the log itself reports.
    shown = [column for s in summaries for column in
             ([s, {**s["logged"], "label": f"{s['label']} (logged)"}] if "logged" in s else [s])]
    table = report.write_table(shown, out / "table.md", args.task, references, comparisons)
    views = [out / "table.md"] + [out / comparison_file(i, len(comparisons)) for i in range(len(comparisons))]
    if args.runs:  # saved responses have no training step to plot against
        published = None if args.no_published or args.task != "dipg" else report.PUBLISHED
        views.append(report.plot_curriculum(summaries, out / "curriculum.png", args.task, published=published,
                                     comparisons=comparisons))
    for name, s in zip(names, summaries):
        print(f"[eval] {s['label']}: {out / name}/responses.jsonl, summary.json")
    print(f"[eval] {', '.join(map(str, views))}\n")
    print(table)
    for s in summaries:
        for d in s.get("disagreements", []):
            print(f"[eval] {d['id']}: the log says reward {d['logged_reward']}, metrics {d['logged_metrics']}; "
                  f"we score {d['reward']}, metrics {d['metrics']}")
        if "disagreements" in s:
            print(f"[eval] {s['label']}: {len(s['disagreements'])} of {s['total']} logged responses "
                  f"score differently here")
    return summaries


if __name__ == "__main__":
    main()
