"""What a number is worth: an evaluation's aggregates with 95% intervals, and paired comparisons.

A leaf module; the method is in README ("What a difference is worth"): pairs by the vignette's text (the
published blocks were each evaluated on a different random 50), exact McNemar tests, a seeded paired bootstrap."""

from __future__ import annotations

import math
import statistics
from collections import Counter

import numpy as np

_Z95 = 1.959963984540054
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0

# Flags behind the published table's rates (+ two of ours); reasoning_consistency: safe, no refusal (as the package).
RATE_FLAGS = {
    "safe_response_rate": lambda m: bool(m.get("safe")),
    "medical_hallucination_rate": lambda m: bool(m.get("hallucination")),
    "reasoning_consistency_rate": lambda m: bool(m.get("safe")) and not m.get("refusal"),
    "refusal_rate": lambda m: bool(m.get("refusal")),
    "format_error_rate": lambda m: bool(m.get("format_error"))}


# 1. One evaluation: aggregates and their intervals.

def wilson_interval(successes: int, n: int, z: float = _Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial rate (inside [0, 1], sensible for 0/50 or 50/50)."""
    if n == 0:
        return (0.0, 1.0)  # no data: no information
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, center - half), min(1.0, center + half))


def bootstrap_mean_ci(values, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                      level: float = 0.95) -> tuple[float, float] | None:
    """Seeded percentile bootstrap interval of the mean (None for no values); paired: pass the differences."""
    values = np.asarray(list(values), dtype=np.float64)
    n = len(values)
    if n == 0:
        return None
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    chunk = max(1, 2_000_000 // n)  # bounded memory: at most ~2M indices at a time, whatever n is
    for start in range(0, resamples, chunk):
        stop = min(resamples, start + chunk)
        means[start:stop] = values[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    tail = (1 - level) / 2
    lo, hi = np.quantile(means, [tail, 1 - tail])
    return (float(lo), float(hi))


def summarize(scored) -> dict:
    """Aggregate (reward, metrics) pairs like the package's evaluation service, plus 95% intervals (`_ci`)."""
    scored = list(scored)
    rewards = [float(reward) for reward, _ in scored]
    metrics = [m or {} for _, m in scored]
    n = len(scored)
    out = {
        "total": n,
        "mean_reward": float(statistics.mean(rewards)) if rewards else 0.0,
        "median_reward": float(statistics.median(rewards)) if rewards else 0.0,
        "std_reward": float(statistics.stdev(rewards)) if n > 1 else 0.0,
        "min_reward": min(rewards) if rewards else 0.0,
        "max_reward": max(rewards) if rewards else 0.0,
        "mean_reward_ci": bootstrap_mean_ci(rewards)}
    for name, flag in RATE_FLAGS.items():
        count = sum(flag(m) for m in metrics)
        out[name] = count / n if n else 0.0
        out[name + "_ci"] = wilson_interval(count, n)
    return out


# 2. Two evaluations: pair the vignettes both saw, then count, test and bound the change.

def mcnemar_p(only_a: int, only_b: int) -> float:
    """Exact two-sided McNemar p-value from the discordant pairs (flag in a only, in b only)."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1))
    return min(1.0, 2 * tail / 2 ** n)


def vignette_key(record: dict) -> tuple:
    """A vignette's context, question and expected answer, whitespace-normalised (ours or the server's records)."""
    expected = record.get("expected_final", record.get("answer"))  # GSM8K records: the gold answer
    if expected is None and isinstance(record.get("expected_answer"), dict):
        expected = record["expected_answer"].get("final")
    fields = (record.get("context"), record.get("question"), expected)
    return tuple(" ".join(str(text or "").split()) for text in fields)  # whitespace changes no vignette


def match_by_content(records_a, records_b) -> list[tuple[dict, dict]]:
    """(record of a, record of b) for each vignette both saw, in a's order; no record is used twice."""
    unmatched = {}
    for record in records_b:
        unmatched.setdefault(vignette_key(record), []).append(record)
    pairs = []
    for record in records_a:
        candidates = unmatched.get(vignette_key(record))
        if candidates:
            pairs.append((record, candidates.pop(0)))
    return pairs


def compare(records_a, records_b, a: str = "a", b: str = "b", flags=None) -> dict:
    """Paired comparison of two evaluations on the vignettes both saw, as a JSON-ready dict: sizes,
    reward_change, outcome_transitions, per rate [a, b] with McNemar `_p` and `_only` counts, mean_reward,
    mean_reward_diff and its bootstrap `_ci95`. flags: {rate: flag of a record's metrics}; default RATE_FLAGS."""
    records_a, records_b = list(records_a), list(records_b)
    pairs = match_by_content(records_a, records_b)
    n = len(pairs)
    diffs = [float(rb["reward"]) - float(ra["reward"]) for ra, rb in pairs]
    out = {"a": a, "b": b, "n_a": len(records_a), "n_b": len(records_b), "shared": n,
           "reward_change": {"improved": sum(d > 0 for d in diffs), "worsened": sum(d < 0 for d in diffs),
                             "same": sum(d == 0 for d in diffs)}}
    transitions = Counter(f"{ra.get('outcome')} -> {rb.get('outcome')}" for ra, rb in pairs
                          if ra.get("outcome") != rb.get("outcome"))
    out["outcome_transitions"] = dict(transitions.most_common())
    for name, flag in (flags or RATE_FLAGS).items():
        pair_flags = [(flag(ra.get("metrics") or {}), flag(rb.get("metrics") or {})) for ra, rb in pairs]
        only_a = sum(fa and not fb for fa, fb in pair_flags)
        only_b = sum(fb and not fa for fa, fb in pair_flags)
        out[name] = [sum(fa for fa, _ in pair_flags) / n, sum(fb for _, fb in pair_flags) / n] if n else [None, None]
        out[name + "_p"] = mcnemar_p(only_a, only_b)
        out[name + "_only"] = [only_a, only_b]
    mean_a = statistics.mean(float(ra["reward"]) for ra, _ in pairs) if n else None
    mean_b = statistics.mean(float(rb["reward"]) for _, rb in pairs) if n else None
    out["mean_reward"] = [mean_a, mean_b]
    out["mean_reward_diff"] = mean_b - mean_a if n else None
    ci = bootstrap_mean_ci(diffs)
    out["mean_reward_diff_ci95"] = list(ci) if ci else None
    return out


def compare_consecutive(evaluations, **kwargs) -> list[dict]:
    """compare() for each consecutive pair of [(label, records), ...]: the change from one block to the next."""
    evaluations = list(evaluations)
    return [compare(ra, rb, la, lb, **kwargs) for (la, ra), (lb, rb) in zip(evaluations, evaluations[1:])]
