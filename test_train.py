"""End-to-end tests of train.py on the real Tunix stack with the `tiny` model.

One chain of real runs, shared by the tests (module fixture, a few minutes on 2 CPU cores):
SFT steps 1-2 -> GRPO soft steps 3-4 (stopped after step 3 as if by Ctrl-C, then resumed) ->
GRPO medium steps 5-6 (also logged to Weights & Biases, offline); plus a one-step GSM8K format phase
for the phase rules.
Each run is a subprocess, exactly what a user types. Compiled XLA programs are shared between the
subprocesses through JAX's persistent compilation cache, which is what keeps this fast.
"""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import grpo
import gsm8k
import model
import rewards
import train

HERE = Path(__file__).resolve().parent
TRAIN = [sys.executable, str(HERE / "train.py")]
# The smallest settings that still run every part of the method.
TINY = ["--model", "tiny", "--lora-rank", "8", "--lora-alpha", "8", "--n-prompts", "8", "--sample-every", "0"]
TINY_GRPO = TINY + ["--num-generations", "2", "--max-tokens-to-generate", "8", "--max-prompt-length", "64",
                    "--kv-cache-size", "128", "--save-every", "1"]


def run(args, env, check=True):
    proc = subprocess.run(TRAIN + [str(a) for a in args], capture_output=True, text=True, env=env, cwd=HERE, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def rows_of(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def metadata(run_dir):
    return json.loads((Path(run_dir) / "metadata.json").read_text())


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("jax_cache")
    return dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", PYTHONUNBUFFERED="1")


@pytest.fixture(scope="module")
def chain(tmp_path_factory, env):
    root = tmp_path_factory.mktemp("runs")
    sft, soft, medium = root / "sft", root / "grpo_soft", root / "grpo_medium"
    out = {"root": root, "sft": sft, "soft": soft, "medium": medium}
    # SFT steps 1-2 (2 micro-batches each), stopped after step 1 as if by Ctrl-C, then resumed.
    out["sft_stopped_proc"] = run(["--phase", "sft", *TINY, "--steps", 2, "--batch-size", 1,
                                   "--gradient-accumulation-steps", 2, "--max-seq-length", 768,
                                   "--max-tokens-to-generate", 8, "--stop-after", 1, "--out", sft], env)
    out["sft_stopped_meta"], out["sft_stopped_rows"] = metadata(sft), rows_of(sft)
    out["sft_proc"] = run(["--phase", "sft", "--resume", "--out", sft], env)
    # Block 2, interrupted after its first step (global step 3), then resumed.
    out["stopped_proc"] = run(["--phase", "grpo", "--penalty", "soft", "--init-from", sft, *TINY_GRPO, "--steps", 2,
                               "--stop-after", 3, "--out", soft], env)
    out["stopped_meta"], out["stopped_rows"] = metadata(soft), rows_of(soft)
    out["resume_proc"] = run(["--phase", "grpo", "--resume", "--out", soft], env)
    out["medium_proc"] = run(["--phase", "grpo", "--penalty", "medium", "--init-from", soft, *TINY_GRPO,
                              "--steps", 2, "--out", medium, "--wandb", "dipg-test", "--sample-every", 1],
                             dict(env, WANDB_MODE="offline"))
    return out


# ------------------------------------------------------------------------------------------------
# --print-config: the published block is the default
# ------------------------------------------------------------------------------------------------

def print_config(*args, env=None):
    proc = run(["--print-config", *args], env or os.environ)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_print_config_grpo_is_the_published_block():
    c = print_config("--phase", "grpo", "--penalty", "soft")
    published = {  # REFERENCE.md section 3
        "model": "gemma-3-1b-it", "max_steps": 300, "learning_rate": 3e-6, "lr_init": 1e-8, "warmup_ratio": 0.1,
        "lr_end_ratio": 0.1, "weight_decay": 0.1, "max_grad_norm": 0.1, "batch_size": 1, "num_generations": 4,
        "num_iterations": 1, "beta": 0.08, "epsilon": 0.2, "max_prompt_length": 1024, "max_tokens_to_generate": 512,
        "kv_cache_size": 2048, "temperature": 1.0, "top_p": 1.0, "top_k": 50, "lora_rank": 64, "lora_alpha": 64.0,
        "save_every": 100, "keep_checkpoints": 2, "start_step": 1, "end_step": 300,
        # Issue 9: the loss of Tunix 0.1.3, optax's Adam betas, the schedule each block restarts.
        "kl_loss_mode": "low_var_kl", "loss_agg_mode": "token-mean", "adam_b1": 0.9, "adam_b2": 0.999,
        "lr_schedule": {"init": 1e-8, "peak": 3e-6, "warmup_steps": 30, "decay_steps": 300, "end": pytest.approx(3e-7),
                        "start_count": 0},
        # Issue 21: chained as the raw logs show (block 1: nothing before it), rollouts stop at <eos> only,
        # the adapters in the base weights' dtype, grain's shuffle with the published seed.
        "chaining": "published", "data_start_position": 0, "stop_tokens": ["<eos>"], "lora_dtype": "base",
        "shuffle_seed": 42,
    }
    assert {k: c[k] for k in published} == published
    # REFERENCE.md section 2, soft column.
    soft = {"conflict_reward": 20, "abstain_reward": 20, "hallucination_penalty": -5, "missing_answer_penalty": -5,
            "hallucinated_trace_penalty": -10, "proof_inconsistency_penalty": -5, "incorrect_answer_penalty": -5,
            "conflict_penalty": -5, "abstain_penalty": -5, "missing_trace_penalty": -5, "correct_abstention_reward": 30,
            "verifiable_trace_reward": 15, "correct_synthesis_reward": 20, "exact_format_reward": 10,
            "format_mismatch_penalty": -10, "no_hallucination_reward": 5}
    assert {k: c[k] for k in soft} == soft


def test_print_config_medium_and_sft():
    c = print_config("--phase", "grpo", "--penalty", "medium")
    medium = {"hallucination_penalty": -10, "missing_answer_penalty": -10, "hallucinated_trace_penalty": -15,
              "proof_inconsistency_penalty": -10, "incorrect_answer_penalty": -10, "conflict_penalty": -10,
              "abstain_penalty": -10, "missing_trace_penalty": -10, "correct_abstention_reward": 30}
    assert {k: c[k] for k in medium} == medium
    s = print_config("--phase", "sft")
    assert {k: s[k] for k in ("max_seq_length", "batch_size", "gradient_accumulation_steps", "max_steps",
                              "learning_rate", "weight_decay", "max_grad_norm", "lora_rank")} == {
        "max_seq_length": 1024, "batch_size": 2, "gradient_accumulation_steps": 8, "max_steps": 300,
        "learning_rate": 2e-5, "weight_decay": 0.01, "max_grad_norm": 1.0, "lora_rank": 64}
    assert "beta" not in s and "hallucination_penalty" not in s  # no GRPO keys in an SFT config
    f = print_config("--phase", "format")
    assert f["reward_functions"] == [fn.__name__ for fn in gsm8k.PHASE_REWARDS["format"]]
    assert (f["slice_start"], f["slice_end"]) == (0.0, 0.25)


def test_print_config_curriculum_shows_every_block_and_runs_nothing(tmp_path):
    out = tmp_path / "journey"
    proc = run(["--phase", "curriculum", "--preset", "cpu", "--print-config", "--out", out, "--top-k", "20"],
               os.environ)
    sft, soft = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    assert {k: sft[k] for k in train.PRESETS["cpu"]["sft"]} == train.PRESETS["cpu"]["sft"]
    assert {k: soft[k] for k in train.PRESETS["cpu"]["grpo"]} == train.PRESETS["cpu"]["grpo"]
    assert (sft["start_step"], sft["end_step"], soft["start_step"], soft["end_step"]) == (1, 12, 13, 14)
    assert soft["init_from"] == str((out / "sft").resolve()) and soft["top_k"] == 20  # a flag wins
    assert not out.exists()  # no evaluation, no training, no run directory


def test_flags_override_defaults():
    c = print_config("--phase", "grpo", "--steps", "7", "--beta", "0", "--top-k", "20", "--mesh", "fsdp=1,tp=1")
    assert (c["max_steps"], c["end_step"], c["beta"], c["top_k"], c["penalty"]) == (7, 7, 0.0, 20, "soft")


# ------------------------------------------------------------------------------------------------
# Bad input: one clear line, no traceback, nothing overwritten
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, expected", [
    (["--phase", "ppo"], "invalid choice: 'ppo'"),
    (["--phase", "grpo", "--penalty", "hard"], "invalid choice: 'hard'"),
    (["--phase", "sft", "--penalty", "soft"], "--penalty applies to --phase grpo only"),
    (["--phase", "grpo", "--kv-cache-size", "1500"], "--kv-cache-size 1500 must exceed"),
    (["--phase", "grpo", "--num-generations", "1"], "--num-generations must be >= 2"),
    (["--phase", "grpo", "--logps-chunk-size", "0"], "--remat decoder is applied in our chunked loss"),
    (["--phase", "sft", "--logps-chunk-size", "-1"], "--logps-chunk-size must be >= 0"),
    (["--phase", "grpo", "--mesh", "dp=2"], "--mesh 'dp=2'"),
    (["--phase", "grpo", "--init-from", "/nonexistent/run"], "--init-from /nonexistent/run: no run there"),
    (["--phase", "grpo", "--resume"], "--resume needs --out"),
    (["--phase", "grpo", "--system-prompt", "/nonexistent/instructions.txt"],
     "--system-prompt /nonexistent/instructions.txt: cannot read it"),
    (["--phase", "grpo", "--stop-tokens", "<end_of_turn>,</s>"], "--stop-tokens <end_of_turn>,</s>: use <eos>"),
    (["--phase", "grpo", "--chaining", "reset"], "invalid choice: 'reset'"),
])
def test_bad_input_is_one_clear_line(args, expected):
    proc = run(args + ["--print-config"], os.environ, check=False)
    assert proc.returncode != 0
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr


def test_out_holding_another_run_is_refused(chain, env):
    before = (chain["sft"] / "metadata.json").read_text()
    proc = run(["--phase", "grpo", *TINY_GRPO, "--steps", 1, "--out", chain["sft"]], env, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "already holds a sft run at step 2" in proc.stderr and "--overwrite" in proc.stderr
    assert (chain["sft"] / "metadata.json").read_text() == before


def test_missing_weights_name_the_embedded_model(tmp_path):
    # gemma-3-1b-it is the default; here its weights cannot be had. No silent swap: an error that
    # says what to pass instead, and no half-made run directory.
    proc = run(["--phase", "grpo", "--model-path", tmp_path / "nothing", "--n-prompts", "2", "--out", tmp_path / "r"],
               os.environ, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "--model gemma-3-270m" in proc.stderr
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------------------------
# The chain: SFT -> GRPO soft (interrupted, resumed) -> GRPO medium
# ------------------------------------------------------------------------------------------------

def test_sft_rows_and_format_report(chain):
    assert (chain["sft_stopped_meta"]["global_step"], chain["sft_stopped_meta"]["complete"]) == (1, False)
    assert [x["step"] for x in chain["sft_stopped_rows"]] == [1]
    r = rows_of(chain["sft"])
    assert [x["step"] for x in r] == [1, 2]
    assert all(x["phase"] == "sft" and np.isfinite(x["loss"]) and x["loss"] > 0 for x in r)
    assert "format adherence after SFT:" in chain["sft_proc"].stdout
    meta = metadata(chain["sft"])
    assert meta["complete"] and meta["global_step"] == 2 and meta["reward_set"] == "sft_format"


def test_sft_step_seconds_are_each_steps_own(tmp_path, env):
    """Tunix hands a step's loss over only after the next step has begun (on CPU: has run), and the last
    one at the very end: timing the gaps between those hand-overs gave the last step ~0 s."""
    out = tmp_path / "sft"
    run(["--phase", "sft", *TINY, "--steps", 3, "--batch-size", 1, "--gradient-accumulation-steps", 1,
         "--max-seq-length", 768, "--max-tokens-to-generate", 0, "--out", out], env)
    r = rows_of(out)
    assert [x["step"] for x in r] == [1, 2, 3]
    steady = r[1]["seconds"]  # step 1 also compiles
    assert 0.5 * steady < r[2]["seconds"] < 2 * steady, [x["seconds"] for x in r]
    assert r[2]["tokens_per_second"] == pytest.approx(768 / r[2]["seconds"])


def test_global_steps_continue_across_blocks(chain):
    assert [x["step"] for x in rows_of(chain["soft"])] == [3, 4]
    assert [x["step"] for x in rows_of(chain["medium"])] == [5, 6]
    soft, medium = metadata(chain["soft"]), metadata(chain["medium"])
    assert (soft["start_step"], soft["global_step"], soft["complete"]) == (3, 4, True)
    assert (medium["start_step"], medium["global_step"], medium["complete"]) == (5, 6, True)


def test_grpo_metrics_rows(chain):
    for row in rows_of(chain["soft"]) + rows_of(chain["medium"]):
        assert row["phase"] == "grpo" and row["penalty"] in ("soft", "medium")
        for key in ("reward_mean", "reward_std", "reward_min", "reward_max", "completion_len_mean", "kl", "loss",
                    "seconds", "tokens_per_second", "rollout_seconds", "reference_seconds", "update_seconds"):
            assert isinstance(row[key], float) and np.isfinite(row[key]), (key, row)
        assert row["reward_min"] <= row["reward_mean"] <= row["reward_max"]
        assert row["n_completions"] == 2
        counts = [row[k] for k in ("format_error", "hallucination", "abstention", "refusal", "missing_proof")]
        assert all(isinstance(c, int) and 0 <= c <= 2 for c in counts)
        assert 0 < row["completion_len_mean"] <= 8
    # Each block is scored at its own penalty level. The random tiny model writes text that parses
    # but quotes nothing: exact_format_reward + missing_trace_penalty (soft 10 - 5, medium 10 - 10).
    for block in ("soft", "medium"):
        level = rewards.PENALTIES[block]
        empty = [x for x in rows_of(chain[block]) if x["missing_proof"] == x["n_completions"]]
        assert empty, "expected the random model's completions to have empty proofs"
        for row in empty:
            assert row["reward_mean"] == level.exact_format_reward + level.missing_trace_penalty


def test_tensorboard_shows_the_journey(chain):
    """Each block writes TensorBoard event files under its global steps, so `tensorboard --logdir runs`
    draws the chain as one curve per metric; a GRPO block also logs its outcome counts."""
    from tensorboard.backend.event_processing import event_accumulator

    def scalars(run_dir):
        acc = event_accumulator.EventAccumulator(str(run_dir / "tensorboard"))
        acc.Reload()
        return {tag: [e.step for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}

    assert scalars(chain["sft"])["sft/loss"] == [1, 2]
    soft, medium = scalars(chain["soft"]), scalars(chain["medium"])
    for tag in ("grpo/reward_mean", "grpo/kl", "grpo/loss", "grpo/learning_rate", "grpo/seconds",
                "grpo/hallucination", "grpo/missing_proof", "grpo/groups_with_spread"):
        assert soft[tag] == [3, 4] and medium[tag] == [5, 6], tag


def wandb_records(run_dir):
    """What W&B recorded for a block run with WANDB_MODE=offline: its transaction log
    RUN_DIR/wandb/offline-run-*/run-*.wandb, the file `wandb sync` uploads (wandb has no public reader):
    protobuf Records in LevelDB's log format, 32 KiB blocks of chunks [crc32, length, type]."""
    from wandb.proto import wandb_internal_pb2

    (path,) = Path(run_dir).glob("wandb/offline-run-*/run-*.wandb")
    data, block, pos, chunks, records = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little room left in the block for a chunk header: padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        chunks, pos = chunks + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            records.append(wandb_internal_pb2.Record.FromString(chunks))
            chunks = b""
    return records


def test_wandb_gets_the_rows_and_samples(chain):
    """--wandb PROJECT: the block's W&B run (named after its directory, grouped by the journey's) holds
    its configuration, every metrics.jsonl row under its global step, with the TensorBoard tags, and
    the sample completions."""
    records = wandb_records(chain["medium"])
    (run,) = [r.run for r in records if r.HasField("run")]
    assert (run.project, run.run_group, run.display_name) == ("dipg-test", chain["root"].name, "grpo_medium")
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert (config["penalty"], config["start_step"], config["wandb"]) == ("medium", 5, "dipg-test")
    history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
               for r in records if r.HasField("history")]
    logged = [h for h in history if "grpo/loss" in h]  # "_step": W&B's own step, here the global step
    expected = rows_of(chain["medium"])
    assert [h["_step"] for h in logged] == [r["step"] for r in expected] == [5, 6]
    for h, row in zip(logged, expected):
        numbers = {f"grpo/{k}": v for k, v in row.items() if k != "step" and type(v) in (int, float)}
        assert {k: v for k, v in h.items() if k.startswith("grpo/")} == pytest.approx(numbers)
    samples = [h for h in history if "samples/path" in h]
    assert [h["_step"] for h in samples] == [5, 6]
    for h in samples:
        table = json.loads(next(chain["medium"].glob(f"wandb/offline-run-*/files/{h['samples/path']}")).read_text())
        ((step, tag, text),) = table["data"]
        assert table["columns"] == ["step", "tag", "text"] and step == h["_step"] and tag.startswith("completion")


def test_wandb_missing_is_one_clear_line(chain, tmp_path):
    """Without the wandb package, --wandb stops before anything runs, saying how to get it; so does
    --resume of an interrupted run that was started with --wandb (its saved configuration)."""
    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    (interrupted / "metadata.json").write_text(json.dumps(dict(metadata(chain["medium"]), complete=False)))
    hide_wandb = "import sys; sys.modules['wandb'] = None; import train; sys.exit(train.main())"
    for flags in (["--phase", "sft", "--wandb", "p", "--print-config"],
                  ["--phase", "grpo", "--resume", "--out", str(interrupted)]):
        proc = subprocess.run([sys.executable, "-c", hide_wandb, *flags], capture_output=True, text=True, cwd=HERE,
                              timeout=300)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert proc.stderr.strip().splitlines()[-1] == \
            "error: --wandb needs the wandb package, which is not installed: pip install wandb"


def test_lineage_records_every_block(chain):
    lineage = metadata(chain["medium"])["lineage"]
    assert [(b["phase"], b["penalty"], b["start_step"], b["end_step"]) for b in lineage] == [
        ("sft", None, 1, 2), ("grpo", "soft", 3, 4), ("grpo", "medium", 5, 6)]
    assert [Path(b["run_dir"]) for b in lineage] == [chain["sft"].resolve(), chain["soft"].resolve(),
                                                      chain["medium"].resolve()]


def test_each_block_continues_the_prompt_order(chain):
    """As the raw logs show (REFERENCE section 3): one shuffled order (grain, seed 42) for the whole run,
    each block starting where the previous one stopped, resumed blocks included."""
    import data

    config = print_config("--phase", "grpo", *TINY_GRPO, "--steps", "6")
    rows = data.fit_prompts(grpo.load_rows(config), model.load_tokenizer(model.ensure_gemma3_270m() / "tokenizer.model"),
                            config["max_prompt_length"])
    order = data.prompt_order(rows, 1, config["shuffle_seed"])
    expected = [data.example_id(order[i]["answer"][0]) for i in range(4)]
    assert [x["examples"][0] for x in rows_of(chain["soft"]) + rows_of(chain["medium"])] == expected
    assert len(set(expected)) > 1


def test_stop_saves_and_resume_continues_at_its_step(chain):
    stopped = chain["stopped_meta"]
    assert (stopped["global_step"], stopped["complete"]) == (3, False)
    assert [x["step"] for x in chain["stopped_rows"]] == [3]
    assert "--resume" in chain["stopped_proc"].stdout
    assert "resuming at global step 4" in chain["resume_proc"].stderr
    # Resumed from the step-3 checkpoint: steps 3 and 4 each appear once, with the learning rate
    # schedule where it was (step 4 is the block's second and last step: the cosine's end).
    r = rows_of(chain["soft"])
    assert [x["step"] for x in r] == [3, 4]
    assert r[1]["learning_rate"] < r[0]["learning_rate"]


def lora_of(run_dir):
    """The newest checkpoint's LoRA arrays, read back with orbax, by parameter path."""
    import orbax.checkpoint as ocp

    meta = metadata(run_dir)
    root = Path(run_dir) / meta["checkpoint_dir"]
    step = max(int(p.name) for p in root.iterdir() if p.name.isdigit())
    tree = ocp.PyTreeCheckpointer().restore(str(root / str(step) / "model_params"))
    flat = {}

    def walk(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, path + (str(k),))
        else:
            flat["/".join(path)] = np.asarray(node)

    walk(tree, ())
    return flat


def test_only_lora_weights_are_trained_and_they_change(chain):
    sft, soft, medium = lora_of(chain["sft"]), lora_of(chain["soft"]), lora_of(chain["medium"])
    # Checkpoints hold the LoRA adapters only: the base weights are never written, so every block
    # runs on the base model as loaded (Tunix's optimizer is over nnx.LoRAParam).
    assert sft.keys() == soft.keys() == medium.keys()
    assert all("lora_a" in k or "lora_b" in k for k in sft), sorted(sft)[:5]
    # Each block moved the adapters it started from.
    for before, after in ((sft, soft), (soft, medium)):
        assert any(not np.array_equal(before[k], after[k]) for k in before)


# ------------------------------------------------------------------------------------------------
# Seed 002's phase rules
# ------------------------------------------------------------------------------------------------

def test_phase_rules(chain, env):
    fmt = chain["root"] / "format"
    proc = run(["--phase", "format", *TINY_GRPO, "--n-prompts", 4, "--steps", 1, "--out", fmt, "--slice-end", "0.1"], env)
    # At the end of a phase: the exit criteria, judged from metrics.jsonl, and what to run next.
    assert "exit criteria over the last 1 steps: answer extraction" in proc.stdout
    assert any(line.startswith("next:") and "python train.py --phase" in line for line in proc.stdout.splitlines())
    r = rows_of(fmt)
    assert [x["step"] for x in r] == [1] and 0.0 <= r[0]["answer_extraction_rate"] <= 1.0
    assert "rewards" in r[0] and set(r[0]["rewards"]) == {"punish_refusal", "strict_format_gate", "light_length_penalty"}
    # format -> generalize changes dataset (GSM8K -> mixed) and rewards (format -> correctness): refused.
    proc = run(["--phase", "generalize", "--init-from", fmt, "--print-config"], env, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "changes both the dataset" in proc.stderr and "--force" in proc.stderr
    # One change at a time is fine; --force overrides the rule.
    assert print_config("--phase", "correctness", "--init-from", str(fmt), env=env)["start_step"] == 2
    assert print_config("--phase", "generalize", "--init-from", str(fmt), "--force", env=env)["start_step"] == 2


# ------------------------------------------------------------------------------------------------
# A real Ctrl-C
# ------------------------------------------------------------------------------------------------

def test_ctrl_c_saves_and_resume_finishes_the_block(tmp_path, env):
    import signal
    import time

    out = tmp_path / "interrupted"
    args = ["--phase", "grpo", *TINY_GRPO, "--steps", 6, "--out", out]
    proc = subprocess.Popen(TRAIN + [str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=HERE)
    deadline = time.time() + 600
    while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().strip()):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)  # as step 1 ends (its row is written before its checkpoint) or later
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 130, stderr[-3000:]  # as a shell reports Ctrl-C: a script sees the run unfinished
    meta = metadata(out)
    assert not meta["complete"] and 1 <= meta["global_step"] < 6, meta
    assert "Ctrl-C: finishing the current step" in stderr
    assert f"stopped at global step {meta['global_step']}" in stdout
    assert [r["step"] for r in rows_of(out)] == list(range(1, meta["global_step"] + 1))
    run(["--phase", "grpo", "--resume", "--out", out], env)
    assert [r["step"] for r in rows_of(out)] == [1, 2, 3, 4, 5, 6]
    assert metadata(out)["complete"]


def test_curriculum_runs_each_block_evaluates_it_and_resumes(tmp_path, env):
    """--phase curriculum: SFT then a soft block, each evaluated; interrupted inside the GRPO block,
    the same command resumes it, then skips everything already done."""
    root = tmp_path / "runs"
    journey = ["--phase", "curriculum", "--schedule", "sft,soft", "--preset", "cpu", *TINY_GRPO,
               "--steps", 2, "--max-seq-length", 768, "--out", root, "--eval-protocol", "clean,published"]
    first = run(journey + ["--stop-after", 3], env, check=False)
    assert first.returncode == 1 and "run the same command again" in first.stdout
    assert metadata(root / "sft")["complete"] and (root / "eval" / "sft" / "summary.json").is_file()
    assert not metadata(root / "grpo_soft_4")["complete"]

    second = run(journey, env)
    assert "already trained" in second.stdout and "reusing" in second.stdout  # SFT and its evaluation
    grpo = metadata(root / "grpo_soft_4")
    assert grpo["complete"] and [b["phase"] for b in grpo["lineage"]] == ["sft", "grpo"]
    assert [r["step"] for r in rows_of(root / "grpo_soft_4")] == [3, 4]
    table = (root / "table.md").read_text()
    # GRPO columns count steps after SFT; two scripted policies show what a number is worth
    assert table.splitlines()[0] == "| Metric | Base | SFT | GRPO (2) | Always abstain | Copy best line |"
    summary = json.loads((root / "eval" / "grpo_soft_4" / "summary.json").read_text())
    cpu_eval = train.PRESETS["cpu"]["eval"]  # the cpu preset's evaluation
    assert (summary["total"], summary["settings"]["max_new_tokens"]) == (cpu_eval["n"], cpu_eval["max_new_tokens"])
    assert (root / "curriculum.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Both protocols when asked: the first in table.md, the other beside it; each says which it is, and
    # consecutive columns are compared on the vignettes both saw (clean: all of them).
    assert "Protocol: clean" in table and "| Change, paired | Base → SFT | SFT → GRPO (2) |" in table
    published = (root / "table_published.md").read_text()
    assert "Protocol: published" in published and (root / "curriculum_published.png").is_file()
    draws = [json.loads((root / "eval_published" / name / "summary.json").read_text())["settings"]
             for name in ("base", "sft", "grpo_soft_4")]
    assert [d["draw"] for d in draws] == [0, 2, 4] and all(d["protocol"] == "published" for d in draws)
    assert summary["settings"]["ids"] == json.loads((root / "eval" / "sft" / "summary.json").read_text())["settings"]["ids"]

    third = run(journey, env)
    assert third.stdout.count("already trained") == 2 and third.stdout.count("reusing") == 6  # 3 runs x 2 protocols


def test_gsm8k_curriculum_gates_each_phase_evaluates_it_and_resumes(tmp_path, env):
    """--curriculum gsm8k: seed 002's phases, each from the previous one and evaluated on held-out GSM8K items
    against the one before; interrupted, the same command resumes; a phase whose exit criteria did not hold
    (a random model never answers) keeps the next one waiting, unless --force; done, everything is reused."""
    root = tmp_path / "gsm"
    journey = ["--phase", "curriculum", "--curriculum", "gsm8k", "--schedule", ",".join(gsm8k.PHASES), *TINY_GRPO, "--steps", 3,
               "--preset", "cpu", "--exit-window", 2, "--out", root]
    first = run(journey + ["--stop-after", 1], env, check=False)
    assert first.returncode == 1 and "run the same command again" in first.stdout
    assert not metadata(root / "format_3")["complete"] and (root / "eval" / "base" / "summary.json").is_file()

    gated = run(journey, env, check=False)
    assert gated.returncode == 1 and "format ended at global step 3: its step limit" in gated.stdout
    assert "format's exit criteria did not hold: the next phase waits" in gated.stdout
    assert [r["step"] for r in rows_of(root / "format_3")] == [1, 2, 3] and not (root / "correctness_6").exists()

    forced = run(journey + ["--force"], env)
    assert "already trained" in forced.stdout and "reusing" in forced.stdout
    assert [b["phase"] for b in metadata(root / "generalize_9")["lineage"]] == list(gsm8k.PHASES)
    table = (root / "table.md").read_text()
    assert table.splitlines()[0] == "| Metric | Base | Format (3) | Correctness (6) | Generalize (9) |"
    assert "| Change, paired | Base → Format (3) | Format (3) → Correctness (6) |" in table and "Answer Extraction" in table
    comparison = json.loads((root / "comparisons" / "comparison_1-2.json").read_text())
    n = train.GSM8K_PRESETS["cpu"]["eval"]["n"]
    assert comparison["shared"] == n and {"answer_extraction_rate_p", "dodge_rate_p"} <= set(comparison)
    assert (root / "curriculum.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    again = run(journey + ["--force"], env)
    assert again.stdout.count("already trained") == 3 and again.stdout.count("reusing") == 4


def test_gsm8k_phase_ends_when_its_exit_criteria_hold(tmp_path, env):
    """Checked as it trains: criteria that hold from the first step (loosened: a random model never answers)
    end the phase there, complete; the next phase starts from it."""
    out = tmp_path / "format"
    proc = run(["--phase", "format", *TINY_GRPO, "--steps", 4, "--exit-window", 1, "--exit-extraction", 0,
                "--exit-refusal", 1, "--out", out], env)
    assert "exit criteria met: finishing the current step" in proc.stderr
    assert "format ended at global step 1: its exit criteria held" in proc.stdout
    assert (metadata(out)["global_step"], metadata(out)["complete"]) == (1, True) and len(rows_of(out)) == 1
    assert f"next: python train.py --phase correctness --init-from {out}" in proc.stdout


def test_curriculum_schedule_is_checked(env):
    proc = run(["--phase", "curriculum", "--schedule", "soft,sft"], env, check=False)
    assert proc.returncode == 2 and "--schedule 'soft,sft'" in proc.stderr
    proc = run(["--phase", "curriculum", "--curriculum", "gsm8k", "--schedule", "format,soft"], env, check=False)
    assert proc.returncode == 2 and "--schedule 'format,soft'" in proc.stderr and "GSM8K phases" in proc.stderr


# ------------------------------------------------------------------------------------------------
# Beyond one machine: several processes join one mesh (here two local CPU processes)
# ------------------------------------------------------------------------------------------------

JOIN = """
import json, sys, time, jax, jax.numpy as jnp, numpy as np
from pathlib import Path
import model, runs, train
n = runs.join_processes()
axes = runs.mesh_axes("fsdp=1,tp=1")
mesh = model.make_mesh(axes["fsdp"], axes["tp"])
x = jax.make_array_from_callback((8,), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp")),
                                 lambda i: np.arange(8.0)[i])
# Both processes prepare the same --out, process 1 late: it must not find process 0's new run there.
args, parser = train.parse_args(["--phase", "grpo", "--model", "tiny", "--out", sys.argv[1]])
time.sleep(2 * jax.process_index())
wrote, write_json = [], runs.write_json  # the files each process writes (still written)
runs.write_json = lambda path, obj: (wrote.append(Path(path).name), write_json(path, obj))
_, run_dir, new_run = train.start_block(args, parser)
runs.prepare_run_dir(run_dir, new_run)
print(json.dumps({"processes": n, "devices": jax.device_count(), "axes": axes,
                  "sum": float(jax.jit(jnp.sum)(x)), "main": runs.is_main_process(),
                  "run_dir": sorted(p.name for p in run_dir.iterdir()), "wrote": wrote}))
"""


def test_two_processes_join_one_mesh(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_PROCESSES="2", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}")
    procs = [subprocess.Popen([sys.executable, "-c", JOIN, str(tmp_path / "run")], cwd=HERE, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(env, JAX_PROCESS_ID=str(i)))
             for i in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    errors = "\n".join(f"process {i}: {err[-1500:]}" for i, (_, err) in enumerate(outputs))
    assert [p.returncode for p in procs] == [0, 0], errors
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    for r in results:
        assert (r["processes"], r["devices"], r["axes"], r["sum"]) == (2, 2, {"fsdp": 2, "tp": 1}, 28.0)
        assert r["run_dir"] == ["metadata.json"]  # written once, seen by both
    assert [r["main"] for r in results] == [True, False]  # process 0 alone writes the run's files
    assert [r["wrote"] for r in results] == [["metadata.json"], []]
