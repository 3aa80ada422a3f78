"""Several hosts, every phase (README "Several hosts"), proven with two local processes x 4 CPU devices on one
mesh against one process x 8 devices, on `tiny`, through train.py's command line:

* a journey (`--schedule sft,soft`, every block evaluated) across both processes, stopped inside its GRPO block
  and run again: it resumes on both processes and writes one table;
* its SFT and GRPO steps equal one process's (<= 1e-5), each process placing only its part of an SFT batch;
* a prompt that differs on one process stops the run in one line naming the step.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent

# Runs train.main once per command (commands separated by "::") and prints, as its last line, the batch sizes the
# models' forward passes were traced with (SFT steps; GRPO's reference pass and update): the global batches.
SCRIPT = """
import json, sys
import jax
import grpo, grpo_loss, train
# tiny's completions all score the same under the DIPG reward (no advantage, a zero loss): score their lengths.
grpo.reward_functions = lambda config: [lambda prompts, completions, **_: [float(len(c) % 5) for c in completions]]
train.PRESETS["cpu"]["eval"].update(n=2, max_new_tokens=16, batch_size=2)  # evaluations: short (a test)
fed, hidden_states = [], grpo_loss.hidden_states
def recorded(model, tokens, *args):
    fed.append(tokens.shape[0])
    return hidden_states(model, tokens, *args)
grpo_loss.hidden_states = recorded
code = 0
try:
    for command in " ".join(sys.argv[1:]).split(" :: "):
        code = code or train.main(command.split())
finally:
    print(json.dumps({"process": jax.process_index(), "fed": sorted(set(fed))}))
sys.exit(code)
"""
TINY = ("--model tiny --lora-rank 8 --lora-alpha 8 --sample-every 0 --mesh fsdp=4,tp=2 --num-generations 2 "
        "--max-tokens-to-generate 8 --max-prompt-length 64 --kv-cache-size 128 --save-every 1")
FLAGS = TINY + " --n-prompts 12 --steps 2 --batch-size 4 --gradient-accumulation-steps 1 --max-seq-length 768"
# What the journey's cpu preset sets that FLAGS leave open: the single-process blocks set it too.
PRESET = {"sft": "--learning-rate 2e-4 --remat none", "grpo": "--remat none"}


def launch(command: str, processes: int, env: dict, cwds=None) -> list[tuple[int, str, str, dict]]:
    """Run SCRIPT with `command` on `processes` local processes, 8 CPU devices in all; -> per process
    (exit code, stdout, stderr, what the SFT trainer was fed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(env, JAX_PLATFORMS="cpu", PYTHONPATH=str(HERE), PYTHONUNBUFFERED="1",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={8 // processes}")
    if processes > 1:
        env.update(JAX_NUM_PROCESSES=str(processes), JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}")
    procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, *command.split()], cwd=(cwds or [HERE] * processes)[i],
                              env=dict(env, JAX_PROCESS_ID=str(i)), text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for i in range(processes)]
    done = [(p, *p.communicate(timeout=900)) for p in procs]
    return [(p.returncode, out, err, json.loads(out.strip().splitlines()[-1]) if out.strip() else {})
            for p, out, err in done]


def ok(results):
    assert [r[0] for r in results] == [0] * len(results), "\n".join(r[2][-3000:] for r in results)
    return results


def rows(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("jax_cache")
    return dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, env):
    """The journey on two processes (stopped inside its GRPO block, then the same command again) and its
    two blocks on one process with 8 devices."""
    root, one = tmp_path_factory.mktemp("two"), tmp_path_factory.mktemp("one")
    journey = f"--phase curriculum --schedule sft,soft --preset cpu {FLAGS} --out {root}"
    stopped = launch(journey + " --stop-after 3", 2, env)
    again = ok(launch(journey, 2, env))
    single = ok(launch(f"--phase sft {FLAGS} {PRESET['sft']} --out {one / 'sft'} :: --phase grpo {FLAGS} "
                       f"{PRESET['grpo']} --init-from {one / 'sft'} --out {one / 'grpo'}", 1, env))
    return dict(root=root, one=one, stopped=stopped, again=again, single=single)


def test_journey_across_two_processes_resumes_and_writes_one_table(runs):
    root = runs["root"]
    assert [r[0] for r in runs["stopped"]] == [1, 1], "\n".join(r[2][-3000:] for r in runs["stopped"])
    assert all("run the same command again" in r[1] for r in runs["stopped"])
    # The second command skipped what was done and resumed GRPO on both processes after its step 3.
    assert all("already trained" in r[1] and "resuming at global step 4" in r[2] for r in runs["again"])
    assert [r["step"] for r in rows(root / "grpo_soft_4")] == [3, 4]
    assert [p.name for p in sorted((root / "grpo_soft_4" / "checkpoints" / "actor").iterdir())] == ["1", "2"]
    assert sorted(p.name for p in root.glob("table*.md")) == ["table.md"]  # one table, written by process 0
    table = (root / "table.md").read_text()
    assert table.splitlines()[0] == "| Metric | Base | SFT | GRPO (2) | Always abstain | Copy best line |"
    assert ["table" in r[1] and "wrote" in r[1] for r in runs["again"]] == [True, False]
    summary = json.loads((root / "eval" / "grpo_soft_4" / "summary.json").read_text())
    assert summary["total"] == 2 and summary["checkpoint_step"] == 2


def test_sft_steps_equal_one_process(runs):
    two, one = rows(runs["root"] / "sft"), rows(runs["one"] / "sft")
    assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2]
    np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], rtol=0, atol=1e-5)


def test_every_row_computed_once(runs):
    # Every process feeds the whole batch and places its devices' part: the global batches are SFT's 4 rows and
    # GRPO's 4 prompts x 2 completions, as on one process, not a copy of them per process.
    assert runs["single"][0][3]["fed"] == [4, 8]
    assert [r[3]["fed"] for r in runs["stopped"] + runs["again"]] == [[4, 8], [4, 8], [8], [8]]


def test_grpo_steps_equal_one_process(runs):
    keys = ("loss", "kl", "grad_norm", "reward_mean")
    two, one = rows(runs["root"] / "grpo_soft_4"), rows(runs["one"] / "grpo")
    assert [r["step"] for r in two] == [r["step"] for r in one] == [3, 4]
    assert all(r["grad_norm"] > 0 for r in one)  # the scripted rewards differ: a real update
    np.testing.assert_allclose([[r[k] for k in keys] for r in two], [[r[k] for k in keys] for r in one],
                               rtol=0, atol=1e-5)
    for name in ("sft", "grpo_soft_4"):  # the same block configuration on both sides
        two_cfg = json.loads((runs["root"] / name / "metadata.json").read_text())["config"]
        one_cfg = json.loads((runs["one"] / name.split("_")[0] / "metadata.json").read_text())["config"]
        assert {k: v for k, v in two_cfg.items() if k != "init_from"} == {k: v for k, v in one_cfg.items() if k != "init_from"}


def test_a_prompt_differing_on_one_process_stops_in_one_line(tmp_path, env):
    import data

    subprocess.run([sys.executable, str(HERE / "data.py"), "dipg", "--split", "train", "--n", "4",
                    "--out", str(tmp_path / "rows.jsonl")], check=True, capture_output=True)
    lines = (tmp_path / "rows.jsonl").read_text().splitlines()
    for host in ("a", "b"):  # the "same" file on two hosts; on b, row 2's question differs
        (tmp_path / host).mkdir()
        if host == "b":
            lines[2] = lines[2].replace("<question>", "<question>Briefly: ", 1)
        (tmp_path / host / "rows.jsonl").write_text("\n".join(lines) + "\n")
    order = [int(b["i"][0]) for b in data.prompt_order([{"i": i} for i in range(4)], 1, 42)[:4]]
    results = launch(f"--phase grpo --dataset rows.jsonl --steps 4 {TINY} "
                     f"--out {tmp_path / 'run'}", 2, env, cwds=[tmp_path / "a", tmp_path / "b"])
    for code, _, err, _ in results:
        assert code == 1 and "Traceback" not in err, err[-3000:]
        assert err.strip().splitlines()[-1].startswith(
            f"error: the inputs of global step {order.index(2) + 1} differ between process ")
    assert not (tmp_path / "run").exists()  # nothing left behind
