"""The GSM8K curriculum (seed 002, README "The GSM8K curriculum"): Gemma 3 + LoRA + GRPO in three phases, each with
its PHASE_REWARDS: format (a 20-30% slice of GSM8K), correctness (all of it), generalize (GSM8K 50%, code, QA 25% each).
Never change the dataset and the rewards at once (check_phase_rule); a phase ends when its behaviour is stable."""

import argparse
import contextlib
import functools
import io
import logging
import random
import re
import sys
from fractions import Fraction
from itertools import islice
from pathlib import Path

import runs
from data import DEFAULT_SEED, DataError, is_local, load_table, save_rows
from rewards import as_text, repeat_to  # the DIPG reward's rules for reading Tunix's batches
from vignettes import split_counts

logger = logging.getLogger(__name__)


# 1. Prompt. Gemma's chat format has no system role: the instructions go at the top of the user turn.

GSM8K_INSTRUCTIONS = """Solve the problem below. Show your working inside <reasoning>...</reasoning>, then give only the final answer ({form}) inside <answer>...</answer>.
Format:
<reasoning>...</reasoning>
<answer>...</answer>"""
# A worked example: without it the base 270M never writes an answer (README "The GSM8K curriculum": measured).
WORKED_EXAMPLE = """Example:
Question: Tom has 3 apples and buys 4 more. How many apples does he have?
<reasoning>He starts with 3 and buys 4: 3 + 4 = 7.</reasoning>
<answer>7</answer>"""


def gsm8k_prompt(question: str, gold=None) -> str:
    """Seed 002's contract: reasoning in <reasoning>, the bare final answer (answer_form) in <answer>."""
    instructions = GSM8K_INSTRUCTIONS.format(form=answer_form(gold))
    return (f"<start_of_turn>user\n{instructions}\n\n{WORKED_EXAMPLE}\n\nQuestion: {question}<end_of_turn>\n"
            "<start_of_turn>model\n")


def answer_form(gold=None) -> str:
    """How the prompt asks for the answer: the form is_attempt accepts for this gold (never what is a dodge)."""
    gold = "0" if gold is None else parse_gsm8k_gold(gold)
    words = _norm_text(gold).split()
    if _to_number(gold) is not None:
        return "a number, no units"
    if words in (["yes"], ["no"]):
        return "Yes or No"
    if words and all(_WORD.fullmatch(w) for w in words):
        return "one word" if len(words) == 1 else f"at most {len(words)} words"
    return "the answer alone"


# 2. Data. Real: `openai/gsm8k` (config "main", gold after "#### "). Offline: reasoning-gym's `gsm_symbolic`,
#    which re-generates GSM8K problems from templates with new names and numbers.

GSM8K_HUB_ID = "openai/gsm8k"
GSM_SPLIT_SIZES = {"train": 7473, "test": 1319}  # the sizes of openai/gsm8k, kept for the builtin splits


def parse_gsm8k_gold(answer_text) -> str:
    """GSM8K gold: the text after the last '####' ("... #### 1,000" -> "1000"), else the text, stripped."""
    return as_text(answer_text).rsplit("####", 1)[-1].strip().replace(",", "")


def _rg_items(task: str, seed: int, count: int, start: int = 0) -> list[dict]:
    """Entries start..start+count-1 of a reasoning-gym task (its generators print progress dots: silenced)."""
    import reasoning_gym  # imported late: ~3 s
    with contextlib.redirect_stdout(io.StringIO()):
        ds = reasoning_gym.create_dataset(task, seed=seed, size=start + count)
        return [ds[i] for i in range(start, start + count)]


@functools.lru_cache(maxsize=4)
def _gsm_symbolic(split: str, seed: int) -> tuple[dict, ...]:
    """A builtin GSM split: train shares no question with test; no repeats, no negative answer (a template bug)."""
    def clean(items, exclude=frozenset()):
        seen, kept = set(exclude), []
        for e in items:
            if e["question"] not in seen and not str(e["answer"]).startswith("-"):
                seen.add(e["question"])
                kept.append(e)
        return kept

    # reasoning-gym seeds item i with Random(seed + i): seeds 20,000 apart keep the two splits' streams apart.
    test = clean(_rg_items("gsm_symbolic", 10_000_000 + seed * 20_000, GSM_SPLIT_SIZES["test"] + 100))
    test = test[:GSM_SPLIT_SIZES["test"]]
    items = test if split == "test" else clean(_rg_items("gsm_symbolic", seed * 20_000, GSM_SPLIT_SIZES["train"] + 400),
                                               exclude={e["question"] for e in test})[:GSM_SPLIT_SIZES["train"]]
    return tuple({"question": e["question"], "answer": str(e["answer"]), "id": f"gsm_symbolic-{split}-{seed}-{i}"}
                 for i, e in enumerate(items))


def load_gsm8k(source: str = "builtin", split: str = "train", n: int | None = None, seed: int = DEFAULT_SEED) -> list[dict]:
    """[{"question", "answer" (the gold as a string), "id"}] from "builtin", "openai/gsm8k" or a local .jsonl."""
    if split not in GSM_SPLIT_SIZES:
        raise ValueError(f"unknown GSM8K split {split!r}: use 'train' or 'test'")
    if source == "builtin":
        logger.info("GSM8K %s: reasoning-gym gsm_symbolic (generated, not openai/gsm8k), seed %s", split, seed)
        return [dict(row) for row in _gsm_symbolic(split, seed)[:n]]  # copies: callers may add fields
    source = GSM8K_HUB_ID if source == "hub" else source
    table = load_table(source, split, **({} if is_local(source) else {"name": "main"}))
    logger.info("GSM8K %s: %s (%d rows)", split, source, len(table))
    rows = []
    for i, row in enumerate(table):
        if not row.get("question") or row.get("answer") in (None, ""):
            raise DataError(f"{source}: row {i}: needs non-empty 'question' and 'answer'")
        rows.append({"question": row["question"], "id": str(row.get("id") or f"gsm8k-{split}-{i}"),
                     "answer": parse_gsm8k_gold(row["answer"])})
    return rows[:n]


def iterable_slice(dataset, start_frac: float, end_frac: float):
    """Items int(start_frac*N) up to (not including) int(end_frac*N), lazily: phase 1's 20-30% slice (seed 002)."""
    if not 0.0 <= start_frac <= end_frac <= 1.0:
        raise ValueError(f"need 0 <= start_frac <= end_frac <= 1, got {start_frac}, {end_frac}")
    return islice(iter(dataset), int(start_frac * len(dataset)), int(end_frac * len(dataset)))


# Phase 3 mixes domains. Code and QA come from reasoning-gym tasks with short exact answers, so the phase-2
# exact-match reward applies unchanged: "bf" asks for a Brainf*ck program's output (codeio runs arbitrary code
# and has JSON answers: left out). Each item keeps its reasoning-gym entry, for that task's own scorer.
MIXED_DOMAINS = {"gsm8k": 0.5, "code": 0.25, "qa": 0.25}
MIXED_TASKS = {"code": ["bf"], "qa": ["syllogism", "family_relationships", "letter_counting", "number_sequence"]}


def _mixed_block(n: int, seed: int, block: int, gsm: list[dict], gsm_task: str, mix: dict) -> list[dict]:
    """Block `block` of the stream: n items in exact proportions, none of an earlier block's (until GSM wraps)."""
    counts = split_counts(n, mix, MIXED_DOMAINS)
    k = counts.get("gsm8k", 0)
    items = [dict(gsm[(block * k + j) % len(gsm)], domain="gsm8k", task=gsm_task, entry=None) for j in range(k)]
    for domain in ("code", "qa"):
        for task, count in split_counts(counts.get(domain, 0), dict.fromkeys(MIXED_TASKS[domain], 1)).items():
            start = block * count
            for j, entry in enumerate(_rg_items(task, seed, count, start) if count else []):
                items.append({"question": entry["question"], "answer": str(entry["answer"]),
                              "id": f"{task}-{seed}-{start + j}", "domain": domain, "task": task, "entry": entry})
    random.Random(f"mixed/{seed}/{block}").shuffle(items)
    return items


def load_mixed(n: int, seed: int = DEFAULT_SEED, gsm_source: str = "builtin", mix: dict | None = None) -> list[dict]:
    """The stream's first n phase-3 items ("entry": the reasoning-gym entry, None for GSM8K items)."""
    return list(islice(mixed_domain_stream(seed, n, gsm_source, mix), n))


def mixed_domain_stream(seed: int = DEFAULT_SEED, block: int = 400, gsm_source: str = "builtin", mix: dict | None = None):
    """The endless phase-3 stream, in blocks of `block` items; GSM rows in order, task entries never repeat."""
    gsm = load_gsm8k(gsm_source, "train", seed=seed)
    task = "gsm_symbolic" if gsm_source == "builtin" else "gsm8k"
    for b in range(sys.maxsize):
        yield from _mixed_block(block, seed, b, gsm, task, mix or MIXED_DOMAINS)


# 3. Rewards: Tunix's fn(prompts, completions, answer, **kwargs) -> list[float], summed per completion, each logged
#    as rewards/<name>. One ordering of outcomes in every phase (length penalties are too small to change it):
#      correct & formatted (+3)  >  formatted attempt (0)  >  unformatted (-2)  >  refusal or dodge (<= -3)
#    A dodge (an <answer> attempting nothing: is_attempt) fails the gate and costs as a refusal. Length is in characters
#    (~4 per Gemma token). Nothing a model writes makes a reward raise; golds that cannot be paired: ValueError.

REFUSAL_PENALTY = -3.0       # "never refuse": worse than any attempt, even an unformatted one
FORMAT_FAIL_PENALTY = -2.0   # the gate: failing costs; passing earns nothing ("a gate, not a prize")
CORRECT_REWARD = 3.0         # binary; outweighs the gate so correctness dominates phase 2
LIGHT_FREE_CHARS = 1000      # GSM8K solutions need ~200-600 characters; no penalty below this
LIGHT_MAX_PENALTY = -0.5     # reached at 2 x LIGHT_FREE_CHARS, then flat
WRONG_BASE_PENALTY = -0.5    # a wrong (or ungated) answer always costs something...
WRONG_LENGTH_PENALTY = -0.5  # ...and up to this much more, linearly up to WRONG_FULL_CHARS
WRONG_FULL_CHARS = 1000

_GSM8K_REFUSALS = [
    "i cannot", "i can't", "i can not", "i'm sorry", "i am sorry", "i apologize", "as an ai", "i am unable",
    "i'm unable", "i'm not able", "i am not able", "i won't", "i will not", "i don't know", "i do not know",
    "unable to answer", "unable to determine", "cannot answer", "can't answer", "cannot be determined",
    "not enough information"]
_NO_TAGS = r"(?:(?!</?(?:reasoning|answer)\b).)"
_STRICT_FORMAT = re.compile(  # a sampler's leftover end-of-turn markers are not "extra text"
    rf"\s*<reasoning>(?P<reasoning>{_NO_TAGS}*?)</reasoning>\s*"
    rf"<answer>(?P<answer>{_NO_TAGS}*?)</answer>(?:\s*(?:<end_of_turn>|<eos>))*\s*", re.DOTALL)
_ANSWER_BLOCK = re.compile(r"<answer>((?:(?!<answer>).)*?)</answer>", re.DOTALL)
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:/\d+)?")
_WORD = re.compile(r"[^\W_]+(?:[-'][^\W_]+)*")  # letters or digits, with inner hyphens: "mother-in-law"


def extract_answer(text) -> str | None:
    """Stripped content of the last <answer>...</answer> block (innermost when nested), or None (none, or blank)."""
    blocks = _ANSWER_BLOCK.findall(as_text(text))
    return (blocks[-1].strip() or None) if blocks else None


def _passes_gate(text: str, gold) -> bool:
    """The contract with real content: some working (a letter or digit) and an answer that `is_attempt`."""
    match = _STRICT_FORMAT.fullmatch(text)
    return bool(match and any(c.isalnum() for c in match["reasoning"]) and is_attempt(match["answer"].strip(), gold))


def _is_gsm8k_refusal(text: str, gold) -> bool:
    """Refusing or dodging: empty, an <answer> that is no attempt, or a refusal phrase in the answer (else the text)."""
    if not text.strip():
        return True
    if _ANSWER_BLOCK.search(text) and not is_attempt(extract_answer(text), gold):
        return True  # the tag without an attempt
    scope = (extract_answer(text) or text).lower().replace("\u2019", "'")
    return any(phrase in scope for phrase in _GSM8K_REFUSALS)


def _to_number(text: str) -> Fraction | None:
    """'1,000' '$5' '5.0' '5%' '-3' '3/4' -> an exact Fraction; words, units or hedges ("18 or 20") -> None."""
    t = re.sub(r"\s+", "", text).replace(",", "").replace("\u2212", "-")
    t = t.lstrip("$€£¥").rstrip(".").rstrip("%")
    if t[:1] in "+-" and t[1:2] in ("$", "€", "£", "¥"):
        t = t[0] + t[2:]
    if len(t) > 64 or not _NUMBER.fullmatch(t):
        return None
    try:
        return Fraction(t)
    except (ValueError, ZeroDivisionError):
        return None


def _norm_text(text: str) -> str:
    return " ".join(text.casefold().split()).rstrip(".")


def is_attempt(answer: str | None, gold) -> bool:
    """Whether an extracted answer attempts the task, right or wrong: it has the gold's form (README's table): a number,
    Yes/No, at most as many words, else some letter or digit. A placeholder or echoed instructions never count."""
    if answer is None:
        return False
    gold = parse_gsm8k_gold(gold)
    if _to_number(gold) is not None:
        return _to_number(answer) is not None
    gold_words, words = _norm_text(gold).split(), _norm_text(answer).split()
    if gold_words in (["yes"], ["no"]):
        return words in (["yes"], ["no"])
    if gold_words and all(_WORD.fullmatch(w) for w in gold_words):
        return 0 < len(words) <= len(gold_words) and all(_WORD.fullmatch(w) for w in words)
    return any(c.isalnum() for c in answer)


def _same_answer(predicted: str | None, gold: str) -> bool:
    """Exact match: numbers by value (5 == 5.0 == $5), anything else case- and space-insensitively."""
    if predicted is None:
        return False
    if (gold_number := _to_number(gold)) is not None:
        return _to_number(predicted) == gold_number
    return bool(_norm_text(gold)) and _norm_text(predicted) == _norm_text(gold)


def _is_correct(text: str, gold) -> bool:
    return _passes_gate(text, gold) and _same_answer(extract_answer(text), parse_gsm8k_gold(gold))


def _light_penalty(text: str) -> float:
    return LIGHT_MAX_PENALTY * min(1.0, max(0, len(text) - LIGHT_FREE_CHARS) / LIGHT_FREE_CHARS)


def _texts(completions) -> list[str]:
    return [as_text(c) for c in (completions if completions is not None else [])]


def _pairs(completions, answer, name: str) -> list[tuple]:
    """(text, gold) per completion of a Tunix batch: golds come one per completion, or one per group of G."""
    texts = _texts(completions)
    return list(zip(texts, repeat_to(answer, len(texts), name, "gold answers")))


def punish_refusal(prompts, completions, answer=None, **kwargs) -> list[float]:
    """REFUSAL_PENALTY for refusing or dodging (an <answer> that attempts nothing), else 0.0."""
    pairs = _pairs(completions, answer, "punish_refusal")  # the gold's kind says what an attempt is
    return [REFUSAL_PENALTY if _is_gsm8k_refusal(t, g) else 0.0 for t, g in pairs]


def strict_format_gate(prompts, completions, answer=None, **kwargs) -> list[float]:
    """0.0 for exactly <reasoning>working</reasoning><answer>an attempt</answer>, else FORMAT_FAIL_PENALTY."""
    pairs = _pairs(completions, answer, "strict_format_gate")
    return [0.0 if _passes_gate(t, g) else FORMAT_FAIL_PENALTY for t, g in pairs]


def light_length_penalty(prompts, completions, answer=None, **kwargs) -> list[float]:
    """0 up to 1,000 characters, then linear to -0.5 at 2,000 characters."""
    return [_light_penalty(t) for t in _texts(completions)]


def check_answer_strict(prompts, completions, answer=None, **kwargs) -> list[float]:
    """CORRECT_REWARD when the gate passes and the answer equals the gold (_same_answer); no partial credit."""
    return [CORRECT_REWARD if _is_correct(t, g) else 0.0 for t, g in _pairs(completions, answer, "check_answer_strict")]


def penalize_length(prompts, completions, answer=None, **kwargs) -> list[float]:
    """Correct: the light length penalty. Wrong or ungated: -0.5, linearly to -1.0 at 1,000 characters."""
    return [_light_penalty(t) if _is_correct(t, g)
            else WRONG_BASE_PENALTY + WRONG_LENGTH_PENALTY * min(1.0, len(t) / WRONG_FULL_CHARS)
            for t, g in _pairs(completions, answer, "penalize_length")]


# Each phase's list. Phase 3 keeps phase 2's: "do not change rewards when introducing new domains".
PHASE_REWARDS = {
    "format": [punish_refusal, strict_format_gate, light_length_penalty],
    "correctness": [punish_refusal, strict_format_gate, check_answer_strict, penalize_length]}
PHASE_REWARDS["generalize"] = PHASE_REWARDS["correctness"]  # same list, by the seed's rule
PHASES = tuple(PHASE_REWARDS)  # in their order


# 4. Per-phase metrics: what the seed says to track (train.py logs them per step, eval.py per checkpoint).

RATES = ("answer_extraction_rate", "format_rate", "refusal_rate", "dodge_rate", "accuracy")


def completion_flags(text: str, gold) -> dict:
    """One completion's KPIs: each of RATES as a flag, its length and the seed's phase-2 reward."""
    attempt = is_attempt(extract_answer(text), gold)
    return {"answer_extraction_rate": attempt, "format_rate": _passes_gate(text, gold),
            "refusal_rate": _is_gsm8k_refusal(text, gold), "dodge_rate": bool(_ANSWER_BLOCK.search(text)) and not attempt,
            "accuracy": _is_correct(text, gold), "length": len(text),
            "reward": sum(f([""], [text], [gold])[0] for f in PHASE_REWARDS["correctness"])}


def phase_metrics(completions, golds) -> dict:
    """The seed's KPIs: each of RATES (completion_flags), mean_length (chars), mean_wrong_length, mean_reward, total."""
    flags = [completion_flags(t, g) for t, g in _pairs(completions, golds, "phase_metrics")]
    mean = lambda values: sum(values) / len(values) if values else 0.0
    return {"total": len(flags), **{k: mean([f[k] for f in flags]) for k in RATES},
            "mean_reward": mean([f["reward"] for f in flags]),
            "mean_length": mean([f["length"] for f in flags]),
            "mean_wrong_length": mean([f["length"] for f in flags if not f["accuracy"]])}


# 5. Exit criteria: when a phase is done, and what to run next.

def exit_criteria(rows: list[dict], criteria: dict) -> dict:
    """Seed 002's phase exit over the last exit_window rows (thresholds: train.GSM8K); "met": all on a full window."""
    last = rows[-criteria["exit_window"]:] if criteria["exit_window"] else []
    completions = sum(r["n_completions"] for r in last) or 1
    extraction = sum(r["answer_extraction_rate"] * r["n_completions"] for r in last) / completions
    refusal = sum(r["refusal"] for r in last) / completions
    lengths = [r["mean_length_chars"] for r in last]
    half = len(lengths) // 2
    first, second = (sum(lengths[:half]) / half, sum(lengths[half:]) / (len(lengths) - half)) if half else (1.0, 1.0)
    drift = abs(second - first) / first if first else 0.0
    c = {"answer_extraction_rate": extraction, "extraction_ok": extraction >= criteria["exit_extraction"],
         "refusal_rate": refusal, "refusal_ok": refusal <= criteria["exit_refusal"], "length_drift": drift,
         "length_ok": drift <= criteria["exit_length_drift"], "window": len(last)}
    return {**c, "met": bool(last) and len(last) == criteria["exit_window"] and all(c[k] for k in c if k.endswith("_ok"))}


def print_next_steps(config: dict, run_dir: Path) -> bool:
    """After a phase: how it ended, whether its exit criteria hold, then the next phase's command (or: train longer)."""
    rows = runs.read_rows(run_dir)
    c, last = exit_criteria(rows, config), rows[-1]["step"] if rows else config["start_step"] - 1
    print(f"{config['phase']} ended at global step {last}: "
          + ("its exit criteria held" if c["met"] and last < config["end_step"] else "its step limit"))
    print(f"exit criteria over the last {c['window']} steps: answer extraction {c['answer_extraction_rate']:.0%} "
          f"({'ok' if c['extraction_ok'] else 'too low'}), refusal {c['refusal_rate']:.1%} "
          f"({'ok' if c['refusal_ok'] else 'not near zero'}), length drift {c['length_drift']:.0%} "
          f"({'stable' if c['length_ok'] else 'not stable'}) -> {'met' if c['met'] else 'NOT met'}")
    nxt = {"format": "correctness", "correctness": "generalize"}.get(config["phase"]) if c["met"] else config["phase"]
    if nxt:
        print(f"next: {'' if c['met'] else 'train longer in this phase: '}python train.py --phase {nxt} --init-from {run_dir}")
    return c["met"]


# 6. What train.py needs: each phase's training rows, and the rule between phases.

def training_rows(phase: str, dataset: str, seed: int, n: int | None, slice_start=0.0, slice_end=1.0) -> list[dict]:
    """{"prompts", "answer"} rows of a phase: a slice of GSM8K (format), all of it (correctness), mixed domains."""
    if phase == "generalize":
        items = load_mixed(n or 2000, seed=seed, gsm_source=dataset)
    else:
        items = load_gsm8k(dataset, "train", seed=seed)
        if phase == "format":
            items = list(iterable_slice(items, slice_start, slice_end))
        items = items[:n]
    return [{"prompts": gsm8k_prompt(it["question"], it["answer"]), "answer": it["answer"]} for it in items]


def step_counts(completions, answers) -> dict:
    """What a GRPO step's completions did, in the seed's KPIs (train.py logs them per step)."""
    m = phase_metrics([str(c) for c in completions], [str(a) for a in answers])
    n = len(completions)
    return {"format_error": round((1 - m["format_rate"]) * n), "refusal": round(m["refusal_rate"] * n),
            "answer_extraction_rate": m["answer_extraction_rate"], "accuracy": m["accuracy"],
            "mean_length_chars": m["mean_length"], "n_completions": n}


def check_phase_rule(old: dict, new: dict, force: bool) -> None:
    """Seed 002: 'Do NOT change dataset and rewards at the same time'. old, new: {"dataset", "reward_set"}."""
    if old["dataset"] != new["dataset"] and old["reward_set"] != new["reward_set"]:
        message = (f"this block changes both the dataset ({old['dataset']} -> {new['dataset']}) and the rewards "
                   f"({old['reward_set']} -> {new['reward_set']}); seed 002's rule is to change one at a time")
        if not force:
            sys.exit(f"error: {message}. Run the phase in between first, or pass --force.")
        logger.warning("%s (--force given: going ahead)", message)


# 7. Command line: write GSM8K or mixed-domain rows to a file you can read.

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Write GSM8K or mixed-domain (phase 3) rows to a file to inspect.")
    parser.add_argument("dataset", choices=["gsm8k", "mixed"])
    parser.add_argument("--source", default="builtin", help="builtin, hub (openai/gsm8k), a hub id or a local .jsonl")
    parser.add_argument("--split", default="train", help="train|test")
    parser.add_argument("--n", type=int, default=None)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--out", help="output file: .jsonl, .json or .parquet")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(message)s")
    logger.setLevel(logging.INFO)
    return save_rows(lambda: (load_gsm8k(args.source, args.split, n=args.n, seed=args.seed) if args.dataset == "gsm8k"
                              else load_mixed(args.n or 100, seed=args.seed, gsm_source=args.source)),
                     args.out, args.overwrite, args.dataset)


if __name__ == "__main__":
    sys.exit(main())
