"""Evaluation: the published table, for your own runs (README, "Evaluation").

For each checkpoint of a curriculum (or `base`, the model before any training): generate greedily
(`model.load_run`: base weights + the run's LoRA checkpoint), score every response with the
environment's evaluation path and reward configuration (`rewards.score_dipg(..., EVAL_CONFIG,
mode="eval")`, which is NOT the training one), and aggregate as its EvaluationManager does, with a 95%
interval per rate (`stats.summarize`): 50 vignettes know a rate to about +-13 points. Two protocols
(PROTOCOLS below): "published", as the published table was made, and "clean".

Outputs under --out: OUT/<run>/responses.jsonl and summary.json per evaluation (settings, ids and
decoding included; an existing result with the same settings is reused, other settings are refused
before anything is generated unless --overwrite); OUT/table.md and OUT/curriculum.png (report.py),
redrawn every call; OUT/comparison*.json, each evaluation against the next (stats.compare).
No model needed: `--responses FILE.jsonl` scores saved responses (rows with context, expected_final,
response), `--published-log LOG` the author's raw Kaggle logs beside their own numbers, `--compare DIR
...` evaluations already written. `--reference-policies` adds scripted policies (what a trick earns);
`--task gsm8k` reports the GSM8K curriculum's KPIs (seed 002).
"""

import argparse
import json
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

# Two ways to evaluate a checkpoint (--protocol). Both decode greedily and score with the eval path.
#   published  how the published table was made (REFERENCE section 1: the author's raw logs and
#              scripts/train_grpo_tpu.py, "8. Final Evaluation"): n vignettes drawn at random from the
#              eval set anew for every evaluation; a prompt with the system prompt and the context but NOT
#              the question, a blank line between the turns and "<think>\n" already written for the model
#              (data.published_eval_prompt); the response scored is that prefill + the text up to the first
#              <end_of_turn>. The draw is seeded by the checkpoint's global step (repeatable; another one
#              per block, as published) and recorded, ids in order, in summary.json.
#   clean      what the method is meant to teach: the training prompt (context AND question), the response
#              as written up to the end of the turn, on the same first n vignettes of the eval set for
#              every checkpoint, so any two evaluations can be compared vignette by vignette.
PROTOCOLS = ("published", "clean")
EVAL_POOL = 100  # the published eval set's size: ~100 rows (the four logs' draws hold 97 distinct vignettes)
# The published sampler stopped at <eos> only and the text was cut at the first <end_of_turn> before
# scoring. Greedy decoding is causal, so stopping at <end_of_turn> as well yields the same scored text token
# for token, without generating the rest of the 512 tokens after the turn has ended.
EVAL_STOP_TOKENS = ("<eos>", "<end_of_turn>")

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


def read_published_log(path):
    """The author's raw Kaggle log of one block (REFERENCE §1, e.g. eval_new.json): NOT a JSON file but
    log lines (timestamps broken across lines), one of which carries the evaluation server's JSON result
    {"metrics": {aggregates..., "detailed_results": [{response, reward, metrics, context, question,
    expected_answer: {final}}, ...]}}. We find it by decoding at every "{" (the last result wins: the
    final evaluation). Returns (rows to score, with the logged reward/metrics; the logged aggregates)."""
    path = Path(path)
    if not path.is_file():
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


# ---------------------------------------------------------------------------------------------------
# 3. Scoring. The reward code is the environment's, ported to pure Python in rewards.py; evaluation
#    uses its eval configuration and eval path (a parse ValueError falls back to the legacy scorer).
# ---------------------------------------------------------------------------------------------------

# The rungs of the reward ladder (rewards.OUTCOME_LABELS), best first: 36, 31, 1, -15, -5, -10 under EVAL_CONFIG.


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
    summary = stats.summarize([(r["reward"], r["metrics"]) for r in records])
    summary["outcomes"] = {label: sum(r["outcome"] == label for r in records) for label in rewards.OUTCOME_LABELS}
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


def load_eval_rows(task="dipg", dataset=None, n=EVAL_N, protocol="clean", draw=None, system_prompt=None,
                   pool=EVAL_POOL):
    """The held-out rows to answer, each with the exact chat `prompt` the model sees -> (rows, dataset_id).

    DIPG, protocol "published": `n` of the first `pool` rows of the eval set (the whole set if smaller),
    drawn with random.Random(f"{draw}"): `draw` is the evaluated checkpoint's global step (None: the whole
    pool, e.g. for the reference policies); prompts as published. "clean": the first n rows, training
    prompts. GSM8K: the first n rows of the test split."""
    import data  # imported here so that --responses needs neither datasets nor JAX

    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown evaluation protocol {protocol!r}: choose one of {', '.join(PROTOCOLS)}")
    if task == "gsm8k":
        source = dataset or "builtin"
        source = gsm8k.GSM8K_HUB_ID if source == "hub" else source
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
    # One padded prompt length for every batch, so the sampler compiles once for the whole set.
    longest, prompt_length = model_lib.padded_prompt_length(tokenizer, prompts)
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
    summary["generation_seconds"] = round(seconds, 2)
    summary["seconds_per_vignette"] = round(seconds / max(len(rows), 1), 3)
    summary["batch_size"] = batch_size
    return records, summary


def reference_summaries(rows):
    """One summary per scripted policy of vignettes.REFERENCE_POLICIES (name -> fn(row) -> response),
    scored on `rows` exactly like a model's responses, labelled as a table column ("Always abstain")."""
    import vignettes

    summaries = []
    for name, policy in vignettes.REFERENCE_POLICIES.items():
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


def read_results(out_dir):
    """What write_results wrote: (summary, records). Bad input: one line naming the directory."""
    out_dir = Path(out_dir)
    for name in ("summary.json", "responses.jsonl"):
        if not (out_dir / name).is_file():
            raise ValueError(f"{out_dir}: no {name} (pass a directory written by eval.py, e.g. results/sft)")
    lines = (out_dir / "responses.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    if any("reward" not in r or "context" not in r for r in records):
        raise ValueError(f"{out_dir / 'responses.jsonl'}: records without reward or context; "
                         "paired comparisons are for DIPG evaluations")
    return json.loads((out_dir / "summary.json").read_text()), records


def compare_results(result_dirs, out=None):
    """Paired comparisons (stats.compare) of each evaluation with the next, read from directories
    written by eval.py; written to OUT/comparison.json (two directories) or OUT/comparison_1-2.json,
    comparison_2-3.json, ... (more). Returns them, for format_table and plot_curriculum."""
    evaluations = [(summary["label"], records) for summary, records in map(read_results, result_dirs)]
    comparisons = stats.compare_consecutive(evaluations)
    for i, comparison in enumerate(comparisons if out is not None else []):
        Path(out).mkdir(parents=True, exist_ok=True)
        runs.write_json(Path(out) / comparison_file(i, len(comparisons)), comparison)
    return comparisons


def comparison_file(i, count):
    """Where compare_results writes comparison i of count."""
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


def resolve_model_name(run, metadata, model_name=None):
    """The base model: the run's own (a LoRA checkpoint fits only that), else --model, else the 270M."""
    if run != "base" and model_name and metadata.get("model") not in (None, model_name):
        raise ValueError(f"{run} was trained on {metadata.get('model')}, not --model {model_name}: "
                         f"a LoRA checkpoint only fits the base model it was trained on")
    return model_name or metadata.get("model") or "gemma-3-270m"


def eval_settings(run, metadata, rows, *, task, dataset_id, model_name, model_path, max_new_tokens, protocol,
                  system_prompt=None):
    """What makes two evaluations the same evaluation (stored in summary.json, compared before reuse):
    the protocol, which rows in which order, how they were decoded, and the model."""
    published = protocol == "published" and task == "dipg"
    return {"task": task, "protocol": protocol, "dataset": dataset_id, "n": len(rows),
            "ids": [r.get("id") for r in rows], "draw": metadata.get("global_step") or 0 if published else None,
            "system_prompt": system_prompt, "max_new_tokens": max_new_tokens,
            "decoding": {"greedy": True, "prefill": rows[0].get("prefill", "") if rows else "",
                         "stop_tokens": list(EVAL_STOP_TOKENS),
                         "scored": "prefill + text up to the first <end_of_turn>"},
            "model": model_name, "model_path": model_path or metadata.get("model_path"),
            "lora": run != "base", "checkpoint_step": metadata.get("global_step")}


def prepare_evaluation(run, *, task="dipg", protocol="published", dataset=None, n=EVAL_N, system_prompt=None,
                       model_name=None, model_path=None, max_new_tokens=EVAL_MAX_NEW_TOKENS):
    """(metadata, rows, settings) of evaluating `run`: the rows its protocol draws for it, and the settings
    summary.json records (so an existing result can be checked before anything is generated)."""
    metadata = read_run_metadata(run)
    rows, dataset_id = load_eval_rows(task, dataset, n, protocol, draw=metadata.get("global_step") or 0,
                                      system_prompt=system_prompt)
    settings = eval_settings(run, metadata, rows, task=task, dataset_id=dataset_id,
                             model_name=resolve_model_name(run, metadata, model_name), model_path=model_path,
                             max_new_tokens=max_new_tokens, protocol=protocol, system_prompt=system_prompt)
    return metadata, rows, settings


def evaluate_run(run, *, task="dipg", protocol="published", dataset=None, n=EVAL_N, system_prompt=None,
                 model_name=None, model_path=None, max_new_tokens=EVAL_MAX_NEW_TOKENS, batch_size=8,
                 out_dir=None, overwrite=False):
    """Load a run directory (or "base") and evaluate it under `protocol`; write OUT files when out_dir is
    given. Returns the summary: stats.summarize(...) (or phase_metrics for GSM8K) plus label, phase,
    penalty, global_step, lineage, settings (protocol, row ids, decoding), timings."""
    import model as model_lib

    metadata, rows, settings = prepare_evaluation(
        run, task=task, protocol=protocol, dataset=dataset, n=n, system_prompt=system_prompt,
        model_name=model_name, model_path=model_path, max_new_tokens=max_new_tokens)
    if out_dir is not None:
        existing = check_existing(out_dir, settings, overwrite)
        if existing is not None:
            tqdm.write(f"[eval] {existing['label']}: reusing {Path(out_dir) / 'summary.json'} "
                       f"(same settings, already evaluated; --overwrite to recompute)")
            return existing

    name = settings["model"]
    tqdm.write(f"[eval] {run_label(metadata)}: model {name}"
               + (f" + LoRA from {run}" if run != "base" else " (no LoRA)")
               + f" | {protocol} protocol, {settings['dataset']} ({len(rows)} rows"
               + (f", draw {settings['draw']}" if settings["draw"] is not None else "")
               + f") | greedy, {max_new_tokens} new tokens, batch {batch_size}")
    t0 = time.time()
    if run == "base":
        model, tokenizer, _ = model_lib.load(name, model_path=model_path)
    else:
        model, tokenizer, metadata = model_lib.load_run(run, model_path=model_path)
    load_seconds = time.time() - t0
    records, summary = evaluate_model(model, tokenizer, rows, task, max_new_tokens, batch_size, desc=run_label(metadata))
    summary.update(describe_run(run, metadata), checkpoint_step=metadata.get("checkpoint_step"), settings=settings,
                   load_seconds=round(load_seconds, 2))
    if out_dir is not None:
        write_results(out_dir, records, summary)
    return summary


def evaluate_responses_file(path, *, task="dipg", out_dir=None, overwrite=False, published_log=False):
    """Score a saved JSONL of responses, no model needed. Same summary.json as a run.

    published_log=True reads the author's raw log instead (read_published_log); its summary also holds
    the aggregates the log reports (`logged`) and every response whose logged reward or metrics differ
    from ours (`disagreements`), and each record its logged_reward and logged_metrics."""
    rows, logged = read_published_log(path) if published_log else (read_responses(path, task), None)
    settings = {"task": task, "published_log" if published_log else "responses": str(Path(path).resolve()),
                "n": len(rows)}
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


# ---------------------------------------------------------------------------------------------------
# 6. The views: OUT/table.md and OUT/curriculum.png (drawn by report.py), with the paired changes.
# ---------------------------------------------------------------------------------------------------

def write_report(result_dirs, out, tag="", references=(), published=None):
    """The journey's views of its DIPG evaluations so far (directories written by evaluate_run, in order):
    OUT/table{tag}.md and OUT/curriculum{tag}.png, each column with its paired change against the
    previous one (OUT/comparison{tag}_*.json)."""
    summaries = [read_results(d)[0] for d in result_dirs]
    comparisons = compare_results(result_dirs, Path(out) / f"comparisons{tag}") if len(result_dirs) > 1 else []
    report.write_table(summaries, Path(out) / f"table{tag}.md", references=references, comparisons=comparisons)
    report.plot_curriculum(summaries, Path(out) / f"curriculum{tag}.png", published=published, comparisons=comparisons)


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
    what.add_argument("--published-log", nargs="+", metavar="LOG",
                      help="score the responses inside the author's raw Kaggle logs (eval_new.json, ...) and "
                           "show what each log reports beside our scoring")
    what.add_argument("--compare", nargs="+", metavar="DIR",
                      help="paired comparison of evaluations already written by eval.py (DIR/responses.jsonl), "
                           "each with the next: OUT/comparison*.json and table.md")
    p.add_argument("--task", choices=["dipg", "gsm8k"], default="dipg")
    p.add_argument("--model", default=None,
                   help="base model name for 'base' (default: the runs' model, else gemma-3-270m)")
    p.add_argument("--model-path", default=None, help="local weights for the base model")
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
            metadata = [read_run_metadata(run) for run in args.runs]
            model_name = args.model or next((m.get("model") for r, m in zip(args.runs, metadata)
                                             if r != "base"), None)
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
        # Each evaluation against the next, on the vignettes both saw (OUT/comparison*.json).
        result_dirs = args.compare or [out / name for name in names]
        comparisons = compare_results(result_dirs, out) if args.task == "dipg" and len(result_dirs) > 1 else []
    except expected_errors as e:
        sys.exit(f"eval.py: error: {e}")

    # table.md and curriculum.png are views of the summaries above, so they are always redrawn.
    # A published log's column is followed by what the log itself reports.
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
