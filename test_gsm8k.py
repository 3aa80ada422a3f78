"""Tests for gsm8k.py, the seed-002 curriculum, in the file's order: the data (builtin gsm_symbolic splits,
local files, the data.py CLI, the phase-1 slice, the phase-3 mixed stream with reasoning-gym's scorers),
then the rewards and metrics on tricky strings, dodges (the template copied, the base 270M's real echo of the
instructions from tests_data/) against real attempts, the exit criteria, and a property: no string makes a reward
raise or return NaN. Real components throughout (reasoning-gym included); no model run, no network."""

import collections
import json
import math
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, strategies as st

import data
import gsm8k
import runs
import train
from test_rewards import ANY_TEXT, COMPOSED, PROPERTY  # the response strategies the DIPG properties use

# --------------------------------------------------------------------------
# 1. Data
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gsm():
    return {split: gsm8k.load_gsm8k("builtin", split) for split in ("train", "test")}


def test_gsm8k_builtin_is_deterministic_and_disjoint(gsm):
    assert len(gsm["train"]) == 7473 and len(gsm["test"]) == 1319
    assert gsm8k.load_gsm8k("builtin", "test", n=50) == gsm["test"][:50]
    assert not {r["question"] for r in gsm["train"]} & {r["question"] for r in gsm["test"]}
    assert len({r["question"] for r in gsm["train"]}) == len(gsm["train"])
    assert all(gsm8k._to_number(r["answer"]) is not None for r in gsm["train"] + gsm["test"])
    assert gsm8k.load_gsm8k("builtin", "test", n=20, seed=1) != gsm["test"][:20]


def test_gsm8k_local_file_gold_parsing(tmp_path):
    data.write_rows([{"question": "How many?", "answer": "Add them up.\n#### 1,234"},
                     {"question": "And now?", "answer": "42"}], str(tmp_path / "gsm.jsonl"))
    rows = gsm8k.load_gsm8k(str(tmp_path / "gsm.jsonl"), "test")
    assert [r["answer"] for r in rows] == ["1234", "42"]
    data.write_rows([{"question": "How many?", "answer": "#### 3"}, {"question": "x"}], str(tmp_path / "bad.jsonl"))
    with pytest.raises(data.DataError, match=r"bad.jsonl: row 1: needs non-empty 'question' and 'answer'"):
        gsm8k.load_gsm8k(str(tmp_path / "bad.jsonl"), "test")


def test_gsm8k_cli_writes_rows_that_load_back(tmp_path, gsm):
    out = tmp_path / "g.jsonl"
    assert gsm8k.main(["gsm8k", "--source", "builtin", "--split", "train", "--n", "100", "--out", str(out)]) == 0
    rows = gsm8k.load_gsm8k(str(out), "train")
    assert [(r["question"], r["answer"], r["id"]) for r in rows] == [(r["question"], r["answer"], r["id"]) for r in gsm["train"][:100]]
    prompt = gsm8k.gsm8k_prompt(rows[0]["question"])
    assert "<reasoning>" in prompt and "<answer>" in prompt and prompt.endswith("<start_of_turn>model\n")
    # a correct, well-formatted reply to that prompt earns the strict-correctness reward
    reply = f"<reasoning>work</reasoning>\n<answer>{rows[0]['answer']}</answer>"
    assert gsm8k.check_answer_strict([prompt], [reply], [rows[0]["answer"]]) == [gsm8k.CORRECT_REWARD]


def test_iterable_slice_semantics():
    items = list(range(10))
    assert list(gsm8k.iterable_slice(items, 0.2, 0.5)) == [2, 3, 4]
    assert list(gsm8k.iterable_slice(items, 0.0, 1.0)) == items
    assert list(gsm8k.iterable_slice(items, 0.3, 0.3)) == []
    assert list(gsm8k.iterable_slice(list(range(7)), 0.0, 0.25)) == [0]  # int() floors both ends
    lazy = gsm8k.iterable_slice(items, 0.5, 1.0)
    assert next(lazy) == 5 and list(lazy) == [6, 7, 8, 9]
    with pytest.raises(ValueError):
        gsm8k.iterable_slice(items, 0.6, 0.4)


def rg_score(item: dict, answer: str | None) -> float:
    """reasoning-gym's own score (0..1) for a mixed-stream item; exact match for GSM8K items."""
    if item.get("entry") is None:
        return float(answer is not None and answer.strip().replace(",", "") == item["answer"])
    import reasoning_gym

    return float(reasoning_gym.get_score_answer_fn(item["task"])(answer, item["entry"]))


def test_mixed_stream_proportions_and_scorers():
    items = gsm8k.load_mixed(200, seed=5)
    assert collections.Counter(i["domain"] for i in items) == {"gsm8k": 100, "code": 50, "qa": 50}
    assert {i["task"] for i in items if i["domain"] == "code"} == {"bf"}
    assert {i["task"] for i in items if i["domain"] == "qa"} == set(gsm8k.MIXED_TASKS["qa"])
    assert items == gsm8k.load_mixed(200, seed=5)
    assert len({i["id"] for i in items}) == 200
    for item in items:
        assert rg_score(item, item["answer"]) == 1.0, item["id"]          # reasoning-gym's own scorer
        assert rg_score(item, "definitely wrong") < 1.0
        reply = f"<reasoning>r</reasoning><answer>{item['answer']}</answer>"  # and the phase-2 exact match
        assert gsm8k.check_answer_strict([""], [reply], [item["answer"]]) == [gsm8k.CORRECT_REWARD], item["id"]
    window = list(islice(gsm8k.mixed_domain_stream(seed=5, block=100), 300))
    for b in range(3):
        assert collections.Counter(i["domain"] for i in window[b * 100:(b + 1) * 100]) == {"gsm8k": 50, "code": 25, "qa": 25}
    assert window[:100] == gsm8k.load_mixed(100, seed=5)
    assert len({i["id"] for i in window}) == 300  # no item repeats across blocks
    with pytest.raises(ValueError, match="bad mix"):
        gsm8k.load_mixed(10, mix={"gsm8k": 1, "poetry": 1})


# --------------------------------------------------------------------------
# 2. Rewards and per-phase metrics
# --------------------------------------------------------------------------

GOOD = "<reasoning>3 boxes of 4 apples is 3 * 4 = 12.</reasoning>\n<answer>12</answer>"


@pytest.mark.parametrize("text, expected", [
    (GOOD, "12"),
    ("<reasoning>r</reasoning><answer> 1,000 </answer>", "1,000"),
    ("<answer>5</answer> then <answer>6</answer>", "6"),          # repeated: the last
    ("<answer><answer>5</answer></answer>", "5"),                  # nested: the innermost
    ("Some text <answer>7</answer> more text", "7"),               # extraction is lenient about position
    ("<answer>   </answer>", None),
    ("<answer>5", None),                                           # unclosed
    ("<ANSWER>5</ANSWER>", None),                                  # tags are exact lower-case
    ("The answer is 12.", None),
    ("", None),
])
def test_extract_answer(text, expected):
    assert gsm8k.extract_answer(text) == expected


@pytest.mark.parametrize("gold_text, expected", [
    ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", "72"),
    ("#### 1,000\n", "1000"),
    ("a #### 3 #### -4", "-4"),
    ("  18 ", "18"),
    ("", ""),
])
def test_parse_gsm8k_gold(gold_text, expected):
    assert gsm8k.parse_gsm8k_gold(gold_text) == expected


def formatted(answer, reasoning="Work it out step by step."):
    return f"<reasoning>{reasoning}</reasoning><answer>{answer}</answer>"


@pytest.mark.parametrize("answer, gold, correct", [
    ("1000", "1000", True), ("1,000", "1000", True), ("$1,000", "1000", True), ("1000.0", "1000", True),
    ("1000%", "1000", True), (" 1 000 ", "1000", True), ("$5", "#### 5", True), ("-3", "-3", True),
    ("0.50", "0.5", True), ("3/4", "0.75", True), ("−3", "-3", True), ("-$3", "-3", True),
    ("18 apples", "18", False), ("18 or 20", "18", False), ("1e3", "1000", False), ("17", "18", False),
    ("eighteen", "18", False), ("18", "Paris", False), ("paris.", "Paris", True), ("", "", False),
])
def test_check_answer_strict_normalization(answer, gold, correct):
    reward = gsm8k.check_answer_strict(["p"], [formatted(answer)], [gold])
    assert reward == [gsm8k.CORRECT_REWARD if correct else 0.0]


@pytest.mark.parametrize("text, passes", [
    (GOOD, True),
    ("  \n" + GOOD + "\n\n", True),
    (GOOD + "<end_of_turn>", True),                                      # sampler leftovers are not text
    ("<reasoning>r</reasoning>   <answer>12</answer>", True),
    ("Sure! " + GOOD, False),                                            # text around
    (GOOD + " Hope that helps.", False),
    ("<answer>12</answer>", False),                                      # no reasoning
    ("<reasoning>r</reasoning><answer> </answer>", False),               # empty answer
    ("<reasoning> </reasoning><answer>12</answer>", False),              # empty reasoning
    ("<reasoning>r</reasoning><answer>12</answer><answer>13</answer>", False),  # repeated
    ("<reasoning>r<answer>1</answer></reasoning><answer>12</answer>", False),   # nested
    ("<answer>12</answer><reasoning>r</reasoning>", False),              # order
    ("<Reasoning>r</Reasoning><Answer>12</Answer>", False),              # case
    ("", False),
])
def test_strict_format_gate(text, passes):
    assert gsm8k.strict_format_gate(["p"], [text], ["12"]) == [0.0 if passes else gsm8k.FORMAT_FAIL_PENALTY]


def test_format_is_a_gate_for_correctness():
    # The right number outside the contract earns nothing for correctness.
    assert gsm8k.check_answer_strict(["p"], ["The answer is <answer>12</answer>"], ["12"]) == [0.0]
    assert gsm8k.check_answer_strict(["p"], [GOOD], ["12"]) == [gsm8k.CORRECT_REWARD]


@pytest.mark.parametrize("text, refusal", [
    ("I'm sorry, but I can't help with that.", True),
    ("I can’t solve this.", True),                                       # typographic apostrophe
    (formatted("I don't know"), True),
    (formatted("It cannot be determined"), True),
    ("<reasoning>r</reasoning><answer></answer>", True),                 # the tag without an attempt
    ("", True), ("   ", True),
    (formatted("12", reasoning="I can't split 7 evenly, so I round."), False),  # reasoning does not count
    (GOOD, False), ("The answer is 12.", False),
])
def test_punish_refusal(text, refusal):
    assert gsm8k.punish_refusal(["p"], [text], ["12"]) == [gsm8k.REFUSAL_PENALTY if refusal else 0.0]


def test_length_penalties():
    pad = lambda n: formatted("12", reasoning="x" * (n - len(formatted("12", reasoning=""))))
    assert [len(pad(n)) for n in (900, 1500, 3000)] == [900, 1500, 3000]
    assert gsm8k.light_length_penalty(["p"] * 3, [pad(900), pad(1500), pad(3000)]) == [0.0, -0.25, -0.5]
    # Correct answers pay the light penalty, wrong ones -0.5 growing to -1.0 at 1,000 characters.
    assert gsm8k.penalize_length(["p"] * 2, [pad(900), pad(1500)], ["12", "12"]) == [0.0, -0.25]
    assert gsm8k.penalize_length(["p"] * 3, [pad(500), pad(1000), pad(3000)], ["13"] * 3) == [-0.75, -1.0, -1.0]
    assert gsm8k.penalize_length(["p"], [""], ["13"]) == [-0.5]


def test_phase_rewards_order_outcomes():
    def total(phase, text, gold="12"):
        return sum(fn(["p"], [text], [gold])[0] for fn in gsm8k.PHASE_REWARDS[phase])

    correct, wrong = GOOD, formatted("13")
    unformatted, refusal = "The answer is 12.", "I'm sorry, I cannot help with that."
    for phase in ("correctness", "generalize"):
        assert total(phase, correct) > total(phase, wrong) > total(phase, unformatted) > total(phase, refusal)
    assert total("format", wrong) == total("format", correct) == 0.0     # no correctness in phase 1
    assert total("format", unformatted) > total("format", refusal)
    assert gsm8k.PHASE_REWARDS["generalize"] is gsm8k.PHASE_REWARDS["correctness"]
    assert [f.__name__ for f in gsm8k.PHASE_REWARDS["format"]] == ["punish_refusal", "strict_format_gate", "light_length_penalty"]


def test_gsm8k_rewards_tunix_inputs():
    golds = np.repeat(np.array(["#### 12"]), 2)
    prompts = np.repeat(np.array(["p"]), 2)
    assert gsm8k.check_answer_strict(prompts, [GOOD, formatted("13")], golds) == [gsm8k.CORRECT_REWARD, 0.0]
    assert gsm8k.check_answer_strict(prompts, [GOOD, GOOD], ["12"]) == [gsm8k.CORRECT_REWARD] * 2  # one gold per group


def test_unpairable_golds_are_a_wiring_error():
    # Golds that cannot be paired with the completions are the caller's bug: a clear error, never a silent 0.
    prompts = np.repeat(np.array(["p"]), 2)
    with pytest.raises(ValueError, match=r"^check_answer_strict: cannot pair 0 gold answers with 2 completions; "
                                         r"pass the batch's 'answer' column"):
        gsm8k.check_answer_strict(prompts, [GOOD, GOOD], None)
    with pytest.raises(ValueError, match=r"^penalize_length: cannot pair 2 gold answers with 3 completions"):
        gsm8k.penalize_length(["p"] * 3, [GOOD] * 3, ["12", "13"])
    with pytest.raises(ValueError, match=r"^phase_metrics: cannot pair 2 gold answers with 3 completions"):
        gsm8k.phase_metrics([GOOD] * 3, ["12", "13"])


def test_phase_metrics():
    completions = [GOOD, formatted("13"), "The answer is 12.", "I'm sorry, I cannot do this."]
    m = gsm8k.phase_metrics(completions, ["12"] * 4)
    assert m["answer_extraction_rate"] == 0.5
    assert m["format_rate"] == 0.5
    assert m["refusal_rate"] == 0.25
    assert m["accuracy"] == 0.25
    assert m["mean_length"] == sum(map(len, completions)) / 4
    assert m["mean_wrong_length"] == sum(map(len, completions[1:])) / 3
    assert gsm8k.phase_metrics([], [])["accuracy"] == 0.0


# --------------------------------------------------------------------------
# 2b. Dodges: the template copied, or the instructions echoed, is not an answer
# --------------------------------------------------------------------------

# Real greedy outputs of the base gemma-3-270m for builtin GSM8K prompts: it echoes the instructions
# (how they were made: the file's "how").
ECHOES = json.loads((Path(__file__).parent / "tests_data" / "gsm8k_270m_greedy_echo.json").read_text())["rows"]
TEMPLATE = "\n".join(gsm8k.GSM8K_INSTRUCTIONS.splitlines()[-2:])  # the contract, as the prompt shows it
ECHO_GOLD = ECHOES[0]["answer"]  # "175": 350 ogres, halved, doubled, halved
WORK = "David slew 0.5 * 350 = 175 ogres. Bruce slew 2 * 175 = 350. Charles slew 0.5 * 350 = {}."
WRONG = f"<reasoning>{WORK.format(350)}</reasoning>\n<answer>350</answer>"
RIGHT = f"<reasoning>{WORK.format(175)}</reasoning>\n<answer>175</answer>"
DODGES = [
    TEMPLATE,
    "  \n" + TEMPLATE.replace("\n", "\n\n") + "\n\n",                  # whitespace around and between
    TEMPLATE.replace("\n", ""),
    TEMPLATE.replace("...", " ... ") + "<end_of_turn>",
    TEMPLATE.replace("...", "\u2026"),                                   # the one-character ellipsis
    TEMPLATE.replace("...", ". . ."),
    "<reasoning>...</reasoning>\n<answer>a number, no units</answer>",  # the instructions in the slot
    *[row["completion"] for row in ECHOES],
]


def test_echo_fixture_is_what_the_base_model_wrote():
    assert TEMPLATE == "<reasoning>...</reasoning>\n<answer>...</answer>"
    for row in ECHOES:  # each echoes the instructions, so its last <answer> block is the template's
        assert row["completion"].startswith(gsm8k.GSM8K_INSTRUCTIONS.format(form="a number, no units")) and gsm8k.extract_answer(row["completion"]) == "..."


@pytest.mark.parametrize("text", DODGES)
def test_template_and_echo_are_dodges(text):
    assert gsm8k.punish_refusal(["p"], [text], [ECHO_GOLD]) == [gsm8k.REFUSAL_PENALTY]
    assert gsm8k.strict_format_gate(["p"], [text], [ECHO_GOLD]) == [gsm8k.FORMAT_FAIL_PENALTY]
    m = gsm8k.phase_metrics([text], [ECHO_GOLD])
    assert (m["answer_extraction_rate"], m["format_rate"], m["refusal_rate"]) == (0.0, 0.0, 1.0)


def test_every_real_attempt_in_format_beats_every_dodge_in_every_phase():
    def total(phase, text):
        return sum(fn(["p"], [text], [ECHO_GOLD])[0] for fn in gsm8k.PHASE_REWARDS[phase])

    long_wrong = f"<reasoning>{WORK.format(350) * 12}</reasoning>\n<answer>350</answer>"  # ~1,900 characters
    unformatted = "Charles slew 175 ogres."
    no_working = "<reasoning>...</reasoning>\n<answer>175</answer>"  # an attempt, but no working: the gate fails
    for phase in gsm8k.PHASE_REWARDS:
        worst_attempt = min(total(phase, t) for t in (WRONG, RIGHT, long_wrong))
        best_dodge = max(total(phase, t) for t in DODGES)
        assert worst_attempt > total(phase, no_working) > best_dodge, phase
        assert total(phase, unformatted) > best_dodge, phase
    assert total("format", WRONG) == total("format", RIGHT) == 0.0  # phase 1 still does not check the number


@pytest.mark.parametrize("gold, attempts, dodges", [
    # GSM8K, letter_counting, number_sequence: a number, after check_answer_strict's normalisation
    ("175", ["175", "350", "$1,000", "-3", "0.5", "3/4", " 12. "], ["...", "a number, no units", "18 apples", "x", "?"]),
    ("-243", ["729", "-243"], ["...", "?", "next"]),
    # syllogism: Yes or No
    ("Yes", ["Yes", "no", "NO."], ["...", "Yes or No", "maybe", "175"]),
    # family_relationships (a relationship in one word) and bf (the printed word): one word
    ("mother-in-law", ["mother-in-law", "Aunt", "sister."], ["...", "in one word", "the mother", "<b>"]),
    ("swamp", ["swamp", "swamps", "hello"], ["...", "the exact output", "-"]),
])
def test_what_counts_as_an_answer_per_domain(gold, attempts, dodges):
    for answer in attempts:
        text = formatted(answer)
        assert gsm8k.punish_refusal(["p"], [text], [gold]) == [0.0], answer
        assert gsm8k.strict_format_gate(["p"], [text], [gold]) == [0.0], answer
        assert gsm8k.phase_metrics([text], [gold])["answer_extraction_rate"] == 1.0, answer
    for answer in dodges:
        text = formatted(answer)
        assert gsm8k.punish_refusal(["p"], [text], [gold]) == [gsm8k.REFUSAL_PENALTY], answer
        assert gsm8k.strict_format_gate(["p"], [text], [gold]) == [gsm8k.FORMAT_FAIL_PENALTY], answer


def test_every_phase3_gold_is_an_answer_and_the_template_is_not():
    for item in gsm8k.load_mixed(40, seed=3):  # all five tasks and GSM8K, from reasoning-gym
        golds = [item["answer"]] * 2
        assert gsm8k.punish_refusal(["p"] * 2, [formatted(item["answer"]), TEMPLATE], golds) == [0.0, gsm8k.REFUSAL_PENALTY], item["id"]
        assert gsm8k.strict_format_gate(["p"] * 2, [formatted(item["answer"]), TEMPLATE], golds) == [0.0, gsm8k.FORMAT_FAIL_PENALTY]


def test_gate_and_refusal_need_the_golds():
    # Whether an answer is an attempt depends on the task's kind of answer, read from the gold: no gold is a wiring bug.
    with pytest.raises(ValueError, match=r"^punish_refusal: cannot pair 0 gold answers with 1 completions"):
        gsm8k.punish_refusal(["p"], [GOOD], None)
    with pytest.raises(ValueError, match=r"^strict_format_gate: cannot pair 0 gold answers with 1 completions"):
        gsm8k.strict_format_gate(["p"], [GOOD], None)


def test_dodges_cannot_meet_the_exit_criteria(tmp_path):
    # A run whose completions are the template and echoes, logged as train.py logs a GSM8K step (step_counts), then judged.
    def run(completions):
        counts = gsm8k.step_counts(completions, [ECHO_GOLD] * len(completions))
        m = gsm8k.phase_metrics(completions, [ECHO_GOLD] * len(completions))
        assert counts["answer_extraction_rate"] == m["answer_extraction_rate"]
        return gsm8k.exit_criteria([{**counts, "mean_length_chars": 300.0}] * 20, train.GSM8K)

    dodged = run([TEMPLATE, ECHOES[0]["completion"], ECHOES[1]["completion"], TEMPLATE.replace("\n", "")])
    assert dodged["answer_extraction_rate"] == 0.0 and dodged["refusal_rate"] == 1.0
    assert not dodged["extraction_ok"] and not dodged["refusal_ok"]
    attempted = run([WRONG, RIGHT, WRONG, RIGHT])
    assert attempted["extraction_ok"] and attempted["refusal_ok"] and attempted["length_ok"]
    mixed = gsm8k.phase_metrics([TEMPLATE, ECHOES[0]["completion"], WRONG, RIGHT], [ECHO_GOLD] * 4)
    assert (mixed["answer_extraction_rate"], mixed["format_rate"], mixed["refusal_rate"], mixed["accuracy"]) == (0.5, 0.5, 0.5, 0.25)


# --------------------------------------------------------------------------
# 3. Exit criteria, on a run's real metrics.jsonl
# --------------------------------------------------------------------------

def test_exit_criteria_and_next_steps(tmp_path, capsys):
    def write(refusals):  # 30 steps of 4 completions; extraction reaches 100% after step 4, length creeps up
        rows = [{"step": i + 1, "n_completions": 4, "answer_extraction_rate": 1.0 if i > 3 else 0.5,
                 "refusal": refusals, "mean_length_chars": 300 + i} for i in range(30)]
        data.write_rows(rows, str(tmp_path / "metrics.jsonl"))

    write(refusals=0)
    c = gsm8k.exit_criteria(runs.read_rows(tmp_path), train.GSM8K)
    assert c["met"] and c["window"] == 20 and c["answer_extraction_rate"] == 1.0 and c["refusal_rate"] == 0.0
    assert c["extraction_ok"] and c["refusal_ok"] and c["length_ok"] and c["length_drift"] == pytest.approx(10 / 314.5)  # steps 11-20 vs 21-30
    config = {**train.GSM8K, "start_step": 1, "end_step": 30}
    assert gsm8k.print_next_steps({**config, "phase": "format"}, tmp_path)
    assert capsys.readouterr().out.splitlines()[-1] == f"next: python train.py --phase correctness --init-from {tmp_path}"
    write(refusals=1)  # one refusal in four: not near zero
    assert not gsm8k.print_next_steps({**config, "phase": "correctness"}, tmp_path)
    out = capsys.readouterr().out
    assert "refusal 25.0% (not near zero)" in out and "-> NOT met" in out
    assert out.splitlines()[-1] == f"next: train longer in this phase: python train.py --phase correctness --init-from {tmp_path}"


# --------------------------------------------------------------------------
# 4. Property: nothing a model writes makes a reward raise or return NaN
# --------------------------------------------------------------------------

@PROPERTY
@given(texts=st.lists(st.one_of(ANY_TEXT, COMPOSED), min_size=1, max_size=4), gold=ANY_TEXT)
def test_gsm8k_rewards_never_raise(texts, gold):
    golds = [gold] * len(texts)
    for fn in {*gsm8k.PHASE_REWARDS["format"], *gsm8k.PHASE_REWARDS["correctness"]}:
        out = fn(["p"] * len(texts), texts, golds)
        assert len(out) == len(texts) and all(math.isfinite(x) for x in out)
    for text in texts:
        assert gsm8k.extract_answer(text) is None or isinstance(gsm8k.extract_answer(text), str)
    gsm8k.parse_gsm8k_gold(gold)
    gsm8k.phase_metrics(texts, golds)


def test_phase3_prompts_ask_for_the_form_the_rewards_accept():
    """A prompt never asks for what the gate calls a dodge: each phase-3 row asks for its own task's form
    (a number for GSM8K, Yes or No for syllogisms, one word for relations and printed words), and the
    gold written as asked passes the gate and is counted as an attempt."""
    rows = gsm8k.training_rows("generalize", "builtin", seed=0, n=40)
    forms = {gsm8k.answer_form(r["answer"]) for r in rows}
    assert forms == {"a number, no units", "Yes or No", "one word"}
    for row in rows:
        form = gsm8k.answer_form(row["answer"])
        assert f"give only the final answer ({form})" in row["prompts"]
        reply = f"<reasoning>worked it out</reasoning>\n<answer>{row['answer']}</answer>"
        assert gsm8k.strict_format_gate([row["prompts"]], [reply], [row["answer"]]) == [0.0], row
    assert gsm8k.gsm8k_prompt("q") == gsm8k.gsm8k_prompt("q", "42")  # GSM8K's prompt is unchanged
