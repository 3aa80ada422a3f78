"""One command for a short GPU window: what it must tell us, under one wall-clock budget, into one JSON file.

    python3 device_check.py --out /tmp/device_check --budget 540 --report "$OUT"   # the GPU window
    python device_check.py --model tiny --preset cpu --out /tmp/dc ...             # this CPU, tiny sizes (test_device.py)

The parts and OUT/summary.json: README "One command for a GPU window"; run again, it skips parts done."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import runs

HERE = Path(__file__).resolve().parent
# Issue 23's targets on one H100/H200: the GRPO step at gemma-3-1b-it size, published settings, and the whole `gpu`
# journey on the 270M (SFT 300 + four 300-step blocks + five evaluations), compilation included.
TARGETS = {"grpo_bfloat16": {"median_step_seconds": 0.7, "first_step_seconds": 45, "peak_device_gb": 16},
           "grpo_float32": {"peak_device_gb": 80}, "journey": {"seconds": 600}}
PARTS = tuple(TARGETS)  # in the order they run
MIN_SECONDS = 5  # a part is not started with less time than this left
OUT_OF_MEMORY = ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory")
REPORT_FILES = ("summary.json", "table.md", "curriculum.png", "grpo_bfloat16.log", "grpo_float32.log", "journey.log")


def run_logged(cmd: list[str], log: Path, seconds: float, grace: float) -> tuple[int, float]:
    """cmd, output appended to log, under `timeout` (Ctrl-C at the deadline, hard kill `grace` s later) -> (code, s)."""
    start = time.time()
    with open(log, "a") as f:
        f.write(f"\n$ {shlex.join(cmd)}   # at most {seconds:.0f} s\n")
        f.flush()
        code = subprocess.run(["timeout", "-s", "INT", "-k", f"{grace:.0f}", f"{seconds:.0f}", *cmd],
                              stdout=f, stderr=subprocess.STDOUT, cwd=HERE, check=False).returncode
    return code, round(time.time() - start, 1)


def last_error(log: Path) -> str | None:
    """The last line of a log that names an error (an out-of-memory one first), else its last line."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    for needles in (OUT_OF_MEMORY, ("Error", "error")):
        found = [line for line in lines if any(n in line for n in needles)]
        if found:
            return found[-1][:500]
    return lines[-1][:500] if lines else None


def grpo_part(dtype: str, args, seconds: float) -> dict:
    """bench_grpo.py in `dtype`; a finished record (out of memory included) is kept in OUT/grpo_<dtype>.json."""
    record_path, log = Path(args.out, f"grpo_{dtype}.json"), Path(args.out, f"grpo_{dtype}.log")
    if record_path.exists():
        return json.loads(record_path.read_text())
    if seconds < MIN_SECONDS:
        return {"skipped": f"{seconds:.0f} s left"}
    cmd = [sys.executable, "bench_grpo.py", "--model", args.model, "--dtype", dtype, "--steps", str(args.steps),
           "--out", str(record_path)] + (["--random-weights"] if args.model != "tiny" else [])
    bench = shlex.split(args.bench_args)
    if args.model == "tiny":  # a test on any machine: bfloat16 on a CPU is refused without it
        bench += ([] if "--" in bench else ["--"]) + ["--allow-cpu"]
    code, wall = run_logged(cmd + bench, log, seconds, args.grace)
    if record_path.exists():  # bench_grpo writes it last: it measured
        bench_record = json.loads(record_path.read_text())
        peak = bench_record.get("peak_device_bytes")
        record = {"fits": True, "wall_seconds": wall, "median_step_seconds": bench_record["seconds"],
                  "first_step_seconds": bench_record["first_step_seconds"],
                  "peak_device_gb": None if peak is None else round(peak / 1e9, 2),
                  "stopped_by_deadline": code == 124, "bench": bench_record}
    else:
        error = last_error(log)
        if code == 124 or not error or not any(n in error for n in OUT_OF_MEMORY):  # nothing to keep: try again
            return {"fits": None, "wall_seconds": wall, "exit_code": code, "error": error,
                    "stopped_by_deadline": code == 124}
        record = {"fits": False, "wall_seconds": wall, "error": error}
    runs.write_json(record_path, record)
    return record


def journey_part(args, seconds: float) -> dict:
    """train.py's journey under the deadline, resumed by each call (times in OUT/journey.json), and its blocks' times."""
    out = Path(args.out)
    history_path = out / "journey.json"
    history = json.loads(history_path.read_text()) if history_path.exists() else {"calls": [], "complete": False}
    if not history["complete"] and seconds < MIN_SECONDS:
        history = {**history, "skipped": f"{seconds:.0f} s left"}
    elif not history["complete"]:
        cmd = [sys.executable, "train.py", "--phase", "curriculum", "--preset", args.preset, "--out", str(out / "journey")]
        if args.model == "tiny":  # a test on any machine: the gpu preset on a CPU is refused without it
            cmd += ["--model", "tiny", "--allow-cpu"]
        code, wall = run_logged(cmd + args.journey_args, out / "journey.log", seconds, args.grace)
        history["calls"].append({"seconds": wall, "exit_code": code, "stopped_by_deadline": code == 124})
        history["complete"] = code == 0
        if code not in (0, 124):
            history["calls"][-1]["error"] = last_error(out / "journey.log")
        runs.write_json(history_path, history)
    for name in ("table.md", "curriculum.png"):  # the latest, after every evaluation so far
        if (out / "journey" / name).exists():
            shutil.copy(out / "journey" / name, out / name)
    blocks = []
    for meta_path in (out / "journey").glob("*/metadata.json"):
        meta, rows = runs.read_metadata(meta_path.parent), runs.read_rows(meta_path.parent)
        seconds = [r["seconds"] for r in rows if r.get("seconds") is not None]
        blocks.append({"run": meta_path.parent.name, "steps_done": meta["global_step"] - meta["start_step"] + 1,
                       "steps": meta["max_steps"], "complete": meta["complete"],
                       "step_seconds_total": round(sum(seconds), 1),
                       "median_step_seconds": round(statistics.median(seconds), 3) if seconds else None,
                       "start_step": meta["start_step"]})
    evaluations = {path.parent.name: {k: json.loads(path.read_text()).get(k) for k in
                                      ("load_seconds", "generation_seconds", "total", "mean_reward")}
                   for path in sorted((out / "journey" / "eval").glob("*/summary.json"))}
    total = round(sum(c["seconds"] for c in history["calls"]), 1)
    return {**history, "seconds": total if history["complete"] else None, "seconds_so_far": total,
            "blocks": sorted(blocks, key=lambda b: b.pop("start_step")), "evaluations": evaluations}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = shlex.join(["device_check.py", *argv])
    argv, journey_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Arguments after -- go to the journey's train.py (e.g. --schedule sft,soft).")
    p.add_argument("--out", required=True, help="working directory: parts done, logs, the journey, summary.json")
    p.add_argument("--budget", type=float, default=540, help="wall-clock seconds, all included (%(default)s)")
    p.add_argument("--parts", default=",".join(PARTS), help="which parts, in order (default %(default)s)")
    p.add_argument("--model", default="gemma-3-1b-it", choices=("gemma-3-1b-it", "gemma-3-270m", "tiny"),
                   help="the GRPO step's model; tiny (also in the journey, on any machine) is the test")
    p.add_argument("--preset", default="gpu", help="the journey's train.py preset (default %(default)s)")
    p.add_argument("--steps", type=int, default=5, help="GRPO steps per dtype; the first compiles (default %(default)s)")
    p.add_argument("--bench-seconds", type=float, default=200, help="at most this long per GRPO part (default %(default)s)")
    p.add_argument("--bench-args", default="", help="more bench_grpo.py flags, one string: --bench-args=\"--max-prompt-length 64\"")
    p.add_argument("--grace", type=float, default=30, help="seconds from Ctrl-C to hard kill (%(default)s)")
    p.add_argument("--report", metavar="DIR", help="also copy summary.json, table.md, curriculum.png and the logs here")
    args = p.parse_args(argv)
    args.journey_args = journey_args
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    if not parts or any(x not in PARTS for x in parts):
        p.error(f"--parts {args.parts!r}: choose from {','.join(PARTS)}")
    if shutil.which("timeout") is None:
        p.error("needs coreutils' timeout on PATH")
    start, out = time.time(), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # train.py --check-device in a child process: this one never starts JAX, so it holds no device memory.
    proc = subprocess.run([sys.executable, "train.py", "--phase", "grpo", "--model", args.model, "--check-device"],
                          capture_output=True, text=True, cwd=HERE, check=False)
    if proc.returncode != 0:
        sys.exit(f"error: train.py --check-device failed; is JAX installed? {proc.stderr.strip()[-1500:]}")
    device = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"device: {json.dumps(device)}", flush=True)
    if device["backend"] == "cpu" and args.model != "tiny":
        import train  # its install lines; train imports no JAX
        sys.exit("error: JAX sees only a CPU here, so this would measure nothing the check is for; install JAX for "
                 "the accelerator (" + "; ".join(f"{k}: {v}" for k, v in train.INSTALL.items()) + "), or run the "
                 "test: --model tiny")

    results = {}
    for part in parts:
        # Inside the budget: the part, then `grace` for its hard kill, then a few seconds for the summary.
        seconds = start + args.budget - time.time() - args.grace - 5
        print(f"{part}: at most {max(seconds, 0):.0f} s", flush=True)
        results[part] = (journey_part(args, seconds) if part == "journey" else
                         grpo_part(part.removeprefix("grpo_"), args, min(args.bench_seconds, seconds)))

    # The checkout's commit; none where the code came without git (a GPU machine gets a copy of the files).
    git = shutil.which("git") and subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=HERE)
    # Each target beside what was measured: met is False for a run out of memory, None where nothing was measured.
    met = lambda m, key, target: False if m.get("fits") is False else None if m.get(key) is None else m[key] <= target
    summary = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "commit": git and git.stdout.strip() or None, "device": device,
        "host": f"{platform.machine()}, {os.cpu_count()} CPU cores", "model": args.model, "preset": args.preset,
        "budget_seconds": args.budget, "wall_seconds": round(time.time() - start, 1), "command": command, **results,
        "targets": {part: {key: {"measured": (results.get(part) or {}).get(key), "target": target,
                                 "met": met(results.get(part) or {}, key, target)} for key, target in targets.items()}
                    for part, targets in TARGETS.items()}}
    runs.write_json(out / "summary.json", summary)
    if args.report:
        Path(args.report).mkdir(parents=True, exist_ok=True)
        for name in REPORT_FILES:
            if (out / name).exists():
                shutil.copy(out / name, Path(args.report) / name)
    print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
