"""Per-step metrics survive a kill: every trained step is recorded exactly once (runs.MetricsLog).

A real tiny GRPO block (and an SFT block) is killed with SIGKILL at several moments -- right after a
checkpoint lands on disk, right after a row lands in metrics.jsonl, in the middle of a step -- and
resumed with --resume each time until it is complete. Then metrics.jsonl holds each step once, and
TensorBoard (read as TensorBoard reads it, purges applied) holds each of a row's numbers once, under
that row's step. A kill can only cost a step's timings, never its row.
"""

import signal
import subprocess
import time

import pytest

import test_train
from test_train import TINY, TINY_GRPO, TRAIN, metadata, rows_of, run

env = test_train.env  # its fixture: the subprocesses share one JAX compilation cache


def train_until(args, env, out, moment, after=0.0):
    """Start train.py and SIGKILL it once moment() is true (+ `after` seconds). Its output goes to a
    file: a pipe nobody reads would fill up and stall it."""
    log = out.parent / f"{out.name}.log"
    with open(log, "a") as f:
        proc = subprocess.Popen(TRAIN + [str(a) for a in args], stdout=f, stderr=f, env=env)
    deadline = time.time() + 600
    while not moment():
        assert proc.poll() is None, f"train.py {args} ended before the moment to kill it:\n{log.read_text()[-3000:]}"
        assert time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.02)
    time.sleep(after)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def checkpoint(out, k):
    """Checkpoint k is on disk (orbax renames its directory once it is whole)."""
    return lambda: (out / "metadata.json").exists() and (out / metadata(out)["checkpoint_dir"] / str(k)).is_dir()


def row(out, k):
    return lambda: (out / "metrics.jsonl").exists() and k in [r["step"] for r in rows_of(out)]


def tensorboard(out) -> dict:
    """{step: {tag: [values]}} as TensorBoard shows it: the EventAccumulator applies the purges a
    resumed run writes (events of the steps it redoes)."""
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    by_step = {}
    for tag in acc.Tags()["scalars"]:
        for e in acc.Scalars(tag):
            by_step.setdefault(e.step, {}).setdefault(tag, []).append(e.value)
    return by_step


def assert_each_step_once(out, phase, steps):
    rows = rows_of(out)
    assert [r["step"] for r in rows] == steps
    shown = tensorboard(out)
    assert sorted(shown) == steps
    for r in rows:
        numbers = {f"{phase}/{k}": v for k, v in r.items() if k != "step" and type(v) in (int, float)}
        assert {tag: values for tag, values in shown[r["step"]].items()} == \
            {tag: [pytest.approx(v, rel=1e-6)] for tag, v in numbers.items()}, r["step"]  # TensorBoard: float32
    assert metadata(out)["complete"]


def test_grpo_killed_at_any_moment_records_every_step_once(tmp_path, env):
    out = tmp_path / "grpo"
    first = ["--phase", "grpo", *TINY_GRPO, "--steps", 6, "--out", out]
    resume = ["--phase", "grpo", "--resume", "--out", out]
    train_until(first, env, out, checkpoint(out, 1))   # checkpoint 1 just landed
    train_until(resume, env, out, row(out, 3))         # step 3's row just landed
    train_until(resume, env, out, checkpoint(out, 5), after=0.5)  # in the middle of step 6
    run(resume, env)
    rows = rows_of(out)
    assert_each_step_once(out, "grpo", [1, 2, 3, 4, 5, 6])
    for r in rows:  # everything but the timings (of a step killed after its checkpoint) is there
        for key in ("loss", "kl", "reward_mean", "completion_len_mean", "n_completions", "learning_rate", "examples"):
            assert key in r, (key, r)
    assert "seconds" in rows[-1]  # the last step was not killed


def test_sft_killed_after_a_checkpoint_records_every_step_once(tmp_path, env):
    out = tmp_path / "sft"
    first = ["--phase", "sft", *TINY, "--steps", 3, "--batch-size", 1, "--gradient-accumulation-steps", 1,
             "--max-seq-length", 768, "--max-tokens-to-generate", 0, "--save-every", 1, "--out", out]
    train_until(first, env, out, checkpoint(out, 1))
    run(["--phase", "sft", "--resume", "--out", out], env)
    assert_each_step_once(out, "sft", [1, 2, 3])
    assert all("loss" in r and "seconds" in r for r in rows_of(out))
