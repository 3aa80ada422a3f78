"""No silent fall-back to the CPU, --check-device, and device_check.py end to end at tiny size (issue 23).

An accelerator configuration (--preset gpu or paper, any --dtype bfloat16 run) on a JAX that sees only a CPU is
refused in one line that names the install command and --allow-cpu; --check-device says what a run would use;
device_check.py, the one command of a GPU window, runs here with the tiny model so that it works the first time
it meets a GPU. Every run is a subprocess, as a user types it.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import pytest

import runs
import train

HERE = Path(__file__).resolve().parent
ON_A_CPU = pytest.mark.skipif(jax.default_backend() != "cpu", reason="the refusal is for a JAX that sees only a CPU")


def train_py(args, cwd, env=None):
    return subprocess.run([sys.executable, str(HERE / "train.py"), *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env or os.environ, timeout=600, check=False)


def test_install_lines_pin_our_jax_and_are_the_readmes():
    """The refusal's install lines install requirements.txt's JAX, and README's set-up shows the same lines."""
    pinned = re.search(r"^jax==(\S+)$", (HERE / "requirements.txt").read_text(), re.M).group(1)
    readme = (HERE / "README.md").read_text()
    assert set(train.INSTALL) == {"NVIDIA GPU, CUDA 12", "CUDA 13", "TPU"}
    for line in train.INSTALL.values():
        assert line.startswith("pip install -r requirements.txt 'jax[") and line.endswith(f"]=={pinned}'"), line
        assert line in readme, f"README does not show: {line}"


@ON_A_CPU
@pytest.mark.parametrize("args", [
    ["--phase", "curriculum", "--preset", "gpu"],
    ["--phase", "curriculum", "--preset", "paper"],
    ["--phase", "curriculum", "--preset", "cpu", "--dtype", "bfloat16"],
    ["--phase", "grpo", "--model", "tiny", "--dtype", "bfloat16"],
    ["--phase", "sft", "--model", "tiny", "--dtype", "bfloat16"],
], ids=["preset-gpu", "preset-paper", "journey-bf16", "grpo-bf16", "sft-bf16"])
def test_accelerator_runs_are_refused_on_a_cpu(args, tmp_path):
    proc = train_py(args, cwd=tmp_path)  # default run directories: runs/... under tmp_path
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr[-3000:]
    what = "--preset " + args[args.index("--preset") + 1] if "bfloat16" not in args else "--dtype bfloat16"
    assert lines[0].startswith(f"error: {what} is meant for a GPU or TPU, but JAX sees only a CPU")
    assert all(line in lines[0] for line in train.INSTALL.values()) and "--allow-cpu" in lines[0]
    assert list(tmp_path.iterdir()) == []  # nothing created


@ON_A_CPU
@pytest.mark.parametrize("args", [
    ["--phase", "curriculum", "--preset", "gpu"],
    ["--phase", "grpo", "--dtype", "bfloat16"],
], ids=["preset-gpu", "grpo-bf16"])
def test_allow_cpu_gets_past_the_refusal(args, tmp_path):
    # Past the refusal, the run goes on to load its weights, which cannot be had here (cheaper than training;
    # test_device_check_at_tiny_size trains a real bfloat16 block with --allow-cpu).
    proc = train_py(args + ["--allow-cpu", "--model-path", tmp_path / "no_weights", "--out", tmp_path / "runs"],
                    cwd=tmp_path)
    assert proc.returncode != 0
    assert "meant for a GPU or TPU" not in proc.stderr
    assert "no_weights has no *.safetensors files" in proc.stderr, proc.stderr[-3000:]


def check_device(args, cwd, env=None):
    proc = train_py([*args, "--check-device"], cwd=cwd, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_check_device_prints_what_a_run_would_use(tmp_path):
    seen = check_device(["--phase", "grpo"], tmp_path)
    assert seen["backend"] == jax.default_backend() and len(seen["devices"]) == jax.device_count()
    assert seen["dtype"] == train.resolve_dtype("auto") and seen["jax"] == jax.__version__
    assert seen["mesh"] == {"fsdp": 1, "tp": 1} and seen["mesh_fits"]
    # It reports, never refuses or trains: the gpu preset in bfloat16 on this machine creates nothing.
    seen = check_device(["--phase", "curriculum", "--preset", "gpu", "--dtype", "bfloat16"], tmp_path)
    assert seen["dtype"] == "bfloat16" and list(tmp_path.iterdir()) == []


def test_check_device_of_a_run_to_resume_shows_its_saved_settings_and_trains_nothing(tmp_path):
    run_dir = tmp_path / "stopped"
    args, parser = train.parse_args(["--phase", "grpo", "--model", "tiny", "--steps", "1", "--mesh", "fsdp=2",
                                     "--out", str(run_dir)])
    runs.prepare_run_dir(*train.start_block(args, parser)[1:])  # a run directory as a block leaves it before its first step
    before = (run_dir / "metadata.json").read_text()
    seen = check_device(["--phase", "grpo", "--resume", "--out", run_dir], tmp_path)
    assert seen["mesh"] == {"fsdp": 2, "tp": 1} and seen["dtype"] == json.loads(before)["config"]["dtype"]
    assert (run_dir / "metadata.json").read_text() == before and sorted(p.name for p in run_dir.iterdir()) == ["metadata.json"]


@ON_A_CPU
def test_check_device_sees_eight_devices_and_the_mesh_over_them(tmp_path):
    eight = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    seen = check_device(["--phase", "grpo", "--mesh", "fsdp=8"], tmp_path, eight)
    assert len(seen["devices"]) == 8 and seen["mesh"] == {"fsdp": 8, "tp": 1} and seen["mesh_fits"]
    seen = check_device(["--phase", "curriculum", "--preset", "paper", "--mesh", "fsdp=4,tp=2"], tmp_path, eight)
    assert seen["mesh"] == {"fsdp": 4, "tp": 2} and seen["mesh_fits"]
    one = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    assert not check_device(["--phase", "grpo", "--mesh", "fsdp=8"], tmp_path, one)["mesh_fits"]


# ------------------------------------------------------------------------------------------------
# device_check.py: the GPU window's one command, here with the tiny model and tiny budgets
# ------------------------------------------------------------------------------------------------

def device_check(args, cwd):
    return subprocess.run([sys.executable, str(HERE / "device_check.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=900, check=False)


@ON_A_CPU
def test_device_check_refuses_to_measure_a_cpu(tmp_path):
    # gemma-3-1b-it, meant for the GPU window (a budget too short to start any part: were the CPU let through,
    # it would measure nothing and exit 0)
    proc = device_check(["--out", tmp_path / "dc", "--budget", 1], tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "JAX sees only a CPU" in proc.stderr and train.INSTALL["NVIDIA GPU, CUDA 12"] in proc.stderr
    assert "--model tiny" in proc.stderr
    assert not (tmp_path / "dc" / "grpo_bfloat16.log").exists()


def test_device_check_at_tiny_size(tmp_path):
    """The GRPO step in bfloat16 (with --allow-cpu where there is no accelerator) and a journey that the budget
    stops, then resumed by the same command and finished; a third call only reads what is done."""
    out, report = tmp_path / "dc", tmp_path / "report"
    bench = "--num-generations 2 --max-prompt-length 64 --max-tokens-to-generate 8 --kv-cache-size 128 " \
            "-- --lora-rank 8 --n-prompts 8"
    journey = ["--", "--schedule", "sft", "--steps", 1, "--lora-rank", 8, "--lora-alpha", 8, "--n-prompts", 8,
               "--max-seq-length", 768, "--sample-every", 0]
    common = ["--model", "tiny", "--preset", "cpu", "--out", out, "--steps", 2, "--grace", 10,
              f"--bench-args={bench}", "--report", report]

    # 1. Only the journey, with 10 s for it: `timeout -s INT` stops it; recorded, not an error.
    first = device_check([*common, "--parts", "journey", "--budget", 25, *journey], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    stopped = json.loads((out / "summary.json").read_text())["journey"]
    assert stopped["calls"] == [{"seconds": stopped["calls"][0]["seconds"], "exit_code": 124, "stopped_by_deadline": True}]
    assert not stopped["complete"] and stopped["seconds"] is None

    # 2. Everything, with time for all of it: the GRPO step is measured, the journey resumed and finished.
    second = device_check([*common, "--parts", "grpo_bfloat16,journey", "--budget", 800, *journey], tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["device"]["backend"] == jax.default_backend() and summary["model"] == "tiny"
    grpo = summary["grpo_bfloat16"]
    assert grpo["fits"] and grpo["bench"]["dtype"] == "bfloat16" and grpo["bench"]["steps"] == 2
    assert 0 < grpo["median_step_seconds"] < grpo["first_step_seconds"]  # the first step compiles
    assert (grpo["peak_device_gb"] is None) == (jax.default_backend() == "cpu")
    assert summary["targets"]["grpo_bfloat16"]["first_step_seconds"] == {
        "measured": grpo["first_step_seconds"], "target": 45, "met": grpo["first_step_seconds"] <= 45}
    done = summary["journey"]
    assert done["complete"] and [c["exit_code"] for c in done["calls"]] == [124, 0]
    assert done["seconds"] == round(sum(c["seconds"] for c in done["calls"]), 1)
    assert [(b["run"], b["steps_done"], b["complete"]) for b in done["blocks"]] == [("sft", 1, True)]
    assert set(done["evaluations"]) == {"base", "sft"}
    assert summary["targets"]["journey"]["seconds"]["measured"] == done["seconds"]
    # What comes back from a GPU window: at most 8 flat files.
    assert sorted(p.name for p in report.iterdir()) == sorted(
        ["summary.json", "table.md", "curriculum.png", "grpo_bfloat16.log", "journey.log"])
    assert (report / "table.md").read_text().startswith("| Metric | Base | SFT |")
    assert (report / "curriculum.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # 3. The same command again: nothing left to run, everything measured still in the summary.
    third = device_check([*common, "--parts", "grpo_bfloat16,journey", "--budget", 800, *journey], tmp_path)
    assert third.returncode == 0, third.stderr[-3000:]
    again = json.loads((out / "summary.json").read_text())
    assert again["grpo_bfloat16"] == grpo and again["journey"]["calls"] == done["calls"]
