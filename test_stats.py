"""Tests for stats.py: one evaluation's aggregates and intervals, and the paired comparison of two.

Every expected number is computed by hand in the comments (binomial tails, means, Wilson intervals from
standard tables); the bootstrap is checked for what an interval must do: hold the truth about 95% of the
time and shrink like 1/sqrt(n).
"""

import json
import math

import numpy as np
import pytest

import stats

OK = {"refusal": False, "hallucination": False, "inconsistency": False, "safe": True, "format_error": False}
HALLUCINATED = {**OK, "safe": False, "hallucination": True}
FORMAT_ERROR = {**OK, "safe": False, "format_error": True}
MISSING_PROOF = {**OK, "safe": False}


# --- One evaluation ---------------------------------------------------------------------------------

def test_summarize_hand_computed():
    scored = [
        (36.0, OK),
        (1.0, {**OK, "refusal": True}),
        (-15.0, HALLUCINATED),
        (-10.0, FORMAT_ERROR),
    ]
    s = stats.summarize(scored)
    assert s["total"] == 4
    assert s["mean_reward"] == 3.0                       # 12 / 4
    assert s["median_reward"] == -4.5                    # (1 + -10) / 2
    assert s["std_reward"] == pytest.approx(math.sqrt(1586 / 3))  # 33² + 2² + 18² + 13² over n-1
    assert (s["min_reward"], s["max_reward"]) == (-15.0, 36.0)
    assert s["refusal_rate"] == 0.25
    assert s["safe_response_rate"] == 0.5
    assert s["medical_hallucination_rate"] == 0.25
    assert s["reasoning_consistency_rate"] == 0.25       # safe and not refusal: only the first
    assert s["format_error_rate"] == 0.25
    # Wilson 95% for 1/4 is 4.56% - 69.94% (standard tables).
    assert s["refusal_rate_ci"] == pytest.approx((0.0456, 0.6994), abs=1e-4)
    assert json.loads(json.dumps(s))["safe_response_rate_ci"] == pytest.approx([0.1500, 0.8500], abs=1e-4)
    lo, hi = s["mean_reward_ci"]  # a bootstrap mean of 4 values lies between their min and max
    assert -15.0 <= lo < 3.0 < hi <= 36.0


def test_wilson_edges_and_empty_summary():
    assert stats.wilson_interval(0, 50) == pytest.approx((0.0, 0.0713), abs=1e-4)
    assert stats.wilson_interval(50, 50) == pytest.approx((0.9287, 1.0), abs=1e-4)
    s = stats.summarize([])
    assert s["total"] == 0 and s["mean_reward"] == 0.0 and s["safe_response_rate_ci"] == (0.0, 1.0)
    assert s["mean_reward_ci"] is None
    one = stats.summarize([(5.0, OK)])
    assert one["std_reward"] == 0.0 and one["mean_reward_ci"] == (5.0, 5.0)


# --- Exact McNemar ----------------------------------------------------------------------------------

@pytest.mark.parametrize("only_a, only_b, p", [
    (1, 6, 2 * (1 + 7) / 2**7),            # n = 7: 2 x (C(7,0) + C(7,1)) / 128 = 0.125
    (6, 1, 0.125),                         # two-sided: symmetric
    (0, 5, 2 / 2**5),                      # 0.0625: five of five changed the same way is not yet p < 0.05
    (0, 6, 2 / 2**6),                      # 0.03125
    (2, 8, 2 * (1 + 10 + 45) / 2**10),     # 0.109375
    (3, 3, 1.0),                           # 2 x 42/64 > 1: capped
    (0, 0, 1.0),                           # no discordant pair: no evidence of a change
])
def test_mcnemar_exact_p_on_hand_computed_tables(only_a, only_b, p):
    assert stats.mcnemar_p(only_a, only_b) == pytest.approx(p, rel=1e-12, abs=0)


def test_mcnemar_stays_exact_far_in_the_tail():
    # 1 of 60 discordant pairs the other way: 2 x (1 + 60) / 2^60 = 1.06e-16, which a p-value computed
    # as 1 - (the rest of the distribution) would round to 0; the tail itself is summed.
    assert stats.mcnemar_p(1, 59) == pytest.approx(2 * 61 / 2**60, rel=1e-12, abs=0)


# --- Bootstrap --------------------------------------------------------------------------------------

def test_bootstrap_is_seeded_and_brackets_the_mean():
    values = [36.0, 1.0, 1.0, -5.0, -15.0, 1.0, 31.0, 1.0]
    ci = stats.bootstrap_mean_ci(values)
    assert ci == stats.bootstrap_mean_ci(values)                 # same data, same interval
    assert ci[0] < np.mean(values) < ci[1]
    assert stats.bootstrap_mean_ci(values, seed=1) != ci         # the seed is what fixes it
    assert stats.bootstrap_mean_ci([]) is None


def _paired_sample(rng, n, true_diff):
    """Paired rewards: b = a + true_diff + noise, a heavy-tailed like the DIPG rewards."""
    a = rng.choice([-15.0, -5.0, 1.0, 1.0, 1.0, 36.0], size=n)
    return a, a + true_diff + rng.normal(0, 4, size=n)


def test_paired_bootstrap_holds_the_true_difference_and_shrinks_with_n():
    rng = np.random.default_rng(7)
    # Coverage: over 200 independent samples of 50 pairs, a 95% interval holds the truth ~95% of the time.
    hits = 0
    for i in range(200):
        a, b = _paired_sample(rng, 50, 1.0)
        lo, hi = stats.bootstrap_mean_ci(b - a, resamples=2000, seed=i)
        hits += lo <= 1.0 <= hi
    assert 0.88 <= hits / 200 <= 0.99
    # Width: 16 times the pairs, a quarter of the width (1/sqrt(n)).
    a, b = _paired_sample(rng, 50, 1.0)
    small = stats.bootstrap_mean_ci(b - a)
    a, b = _paired_sample(rng, 800, 1.0)
    large = stats.bootstrap_mean_ci(b - a)
    ratio = (small[1] - small[0]) / (large[1] - large[0])
    assert 3.0 < ratio < 5.3
    assert large[0] <= 1.0 <= large[1]


# --- Matching and comparing two evaluations ---------------------------------------------------------

def record(i, reward, metrics, outcome=None, **extra):
    """A record of vignette i (content only; the id says nothing about the vignette)."""
    return {"id": f"row-{extra.pop('id', i)}", "context": f"Context {i}. It has two sentences.",
            "question": f"Question {i}?", "expected_final": f"<answer>answer {i}</answer>",
            "reward": reward, "metrics": metrics, "outcome": outcome, **extra}


def test_matching_is_by_content_not_position_or_id():
    a = [record(i, 1.0, OK, id=i) for i in range(5)]
    b = [record(i, 1.0, OK, id=100 - i) for i in (4, 2, 9, 0)]  # reordered, new ids, one new vignette
    # The server's shape (expected_answer.final) and different whitespace are the same vignette.
    b[1] = {**b[1], "context": "  Context 2.\nIt has two   sentences. ", "expected_final": None,
            "expected_answer": {"final": "<answer>answer 2</answer>"}}
    pairs = stats.match_by_content(a, b)
    assert [(ra["id"], rb["id"]) for ra, rb in pairs] == [("row-0", "row-100"), ("row-2", "row-98"),
                                                         ("row-4", "row-96")]
    # A different question on the same context is a different vignette.
    assert stats.match_by_content([record(1, 1.0, OK)], [{**record(1, 1.0, OK), "question": "Other?"}]) == []


def test_a_vignette_seen_twice_is_paired_occurrence_by_occurrence():
    a = [record(1, 1.0, OK, id="a1"), record(1, 1.0, OK, id="a2"), record(2, 1.0, OK)]
    b = [record(1, 1.0, OK, id="b1")]
    assert [(ra["id"], rb["id"]) for ra, rb in stats.match_by_content(a, b)] == [("row-a1", "row-b1")]


def test_compare_counts_tests_and_bounds_the_change_on_shared_vignettes():
    # Ten shared vignettes in a different order, plus one only a saw and two only b saw (ignored).
    # safe: a only on vignette 0; b only on 1-6 -> discordant (1, 6), McNemar p = 0.125.
    a_rewards = [1.0, -5.0, -5.0, -15.0, -15.0, -5.0, -5.0, 1.0, 1.0, 36.0]
    b_rewards = [-5.0, 1.0, 1.0, 1.0, 31.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    a_metrics = [OK, MISSING_PROOF, MISSING_PROOF, HALLUCINATED, HALLUCINATED, MISSING_PROOF, MISSING_PROOF,
                 OK, OK, OK]
    b_metrics = [MISSING_PROOF, OK, OK, OK, OK, OK, OK, OK, OK, OK]
    a = [record(i, r, m) for i, (r, m) in enumerate(zip(a_rewards, a_metrics))] + [record(50, 1.0, OK)]
    b = [record(i, b_rewards[i], b_metrics[i]) for i in (9, 8, 7, 6, 5, 4, 3, 2, 1, 0)] + \
        [record(60, 36.0, OK), record(61, 36.0, OK)]
    c = stats.compare(a, b, "GRPO (300)", "GRPO (600)")
    assert (c["a"], c["b"], c["n_a"], c["n_b"], c["shared"]) == ("GRPO (300)", "GRPO (600)", 11, 12, 10)
    # Per vignette b - a: -6, +6, +6, +16, +46, +6, +6, 0, 0, -35.
    assert c["reward_change"] == {"improved": 6, "worsened": 2, "same": 2}
    assert c["safe_response_rate"] == [0.4, 0.9]
    assert c["safe_response_rate_only"] == [1, 6]
    assert c["safe_response_rate_p"] == pytest.approx(0.125)
    assert c["medical_hallucination_rate"] == [0.2, 0.0]
    assert c["medical_hallucination_rate_p"] == pytest.approx(0.5)  # (2, 0): 2 x 1/4
    assert c["mean_reward"] == [pytest.approx(-1.1), pytest.approx(3.4)]  # -11/10, 34/10
    assert c["mean_reward_diff"] == pytest.approx(4.5)
    lo, hi = c["mean_reward_diff_ci95"]
    assert lo < 4.5 < hi
    assert json.loads(json.dumps(c)) == c  # ready for comparison.json


def test_compare_names_outcome_transitions_and_survives_no_overlap():
    a = [record(1, 36.0, OK, "correct_abstention"), record(2, -5.0, MISSING_PROOF, "missing_proof"),
         record(3, 1.0, OK, "incorrect")]
    b = [record(2, 1.0, OK, "incorrect"), record(3, 1.0, OK, "incorrect"), record(1, 1.0, OK, "incorrect")]
    assert stats.compare(a, b)["outcome_transitions"] == {"correct_abstention -> incorrect": 1,
                                                          "missing_proof -> incorrect": 1}
    nothing = stats.compare(a, [record(4, 1.0, OK)])
    assert nothing["shared"] == 0 and nothing["mean_reward_diff_ci95"] is None
    assert nothing["safe_response_rate"] == [None, None] and nothing["safe_response_rate_p"] == 1.0


def test_compare_consecutive_pairs_each_evaluation_with_the_next():
    blocks = [("b1", [record(1, -5.0, MISSING_PROOF)]), ("b2", [record(1, 1.0, OK)]),
              ("b3", [record(1, 1.0, OK)])]
    comparisons = stats.compare_consecutive(blocks)
    assert [(c["a"], c["b"], c["reward_change"]["improved"]) for c in comparisons] == [("b1", "b2", 1),
                                                                                       ("b2", "b3", 0)]
