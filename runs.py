"""Run bookkeeping: the machinery that keeps long runs safe. You can skip this file.

The method lives in rewards.py -> data.py -> model.py -> train.py -> eval.py. This module holds what
every long run needs and no reader of the method does, so a fork never has to touch it:

  run directories   RUN_DIR/metadata.json (configuration, lineage of blocks, global step, complete?)
  phase rules       seed 002: never change the dataset and the rewards in the same step
  metrics           one JSON row per global step in RUN_DIR/metrics.jsonl, a progress bar, and
                    TensorBoard event files in RUN_DIR/tensorboard (tensorboardX, as Tunix logs);
                    with --wandb PROJECT also a Weights & Biases run per block
  interruption      Ctrl-C finishes the step under way, saves a checkpoint, exits; --resume goes on
  the journey       --phase curriculum: every block and evaluation in a child process, resumable
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger("train")


def setup_logging() -> None:
    """Our own INFO lines (which model and which data run); the libraries' warnings only."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)
    for noisy in ("absl", "jax", "orbax", "tunix"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def write_json(path, obj) -> None:
    """Write JSON atomically (a temporary file, then a rename): a crash never leaves half a file."""
    import tempfile

    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(obj, indent=2, default=str, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def read_metadata(run_dir) -> dict | None:
    """RUN_DIR/metadata.json as a dict, or None when there is no run there."""
    try:
        return json.loads((Path(run_dir) / "metadata.json").read_text())
    except (FileNotFoundError, NotADirectoryError):
        return None


def join_processes() -> int:
    """Join a multi-process launch before JAX touches a device; returns the number of processes.

    Several processes (the hosts of a TPU slice, GPU nodes) must call jax.distributed.initialize()
    before any computation; then jax.devices() lists every device of every process, one mesh spans
    them all (mesh_axes), and process 0 writes metadata, logs and plots (is_main_process). Triggered
    by JAX_NUM_PROCESSES (+ JAX_PROCESS_ID, JAX_COORDINATOR_ADDRESS=host:port: any launcher), or by a
    launcher JAX detects itself (multi-host Cloud TPU, SLURM, Open MPI). One process does nothing."""
    import jax

    if "JAX_NUM_PROCESSES" in os.environ:
        jax.distributed.initialize(num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                                   process_id=int(os.environ["JAX_PROCESS_ID"]))
    elif any(int(os.environ.get(v, "1")) > 1 for v in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")) \
            or "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
        jax.distributed.initialize()  # JAX reads the coordinator, count and rank from the launcher
    return jax.process_count()


def mesh_axes(text: str) -> dict:
    """--mesh, widened over every device of a multi-process launch: fsdp = devices // tp."""
    import jax

    axes = parse_mesh(text)
    if jax.process_count() > 1 and axes["fsdp"] * axes["tp"] < jax.device_count():
        axes["fsdp"] = jax.device_count() // axes["tp"]
        log.info("%d processes, %d devices: mesh fsdp=%d,tp=%d", jax.process_count(), jax.device_count(),
                 axes["fsdp"], axes["tp"])
    return axes


def is_main_process() -> bool:
    """On a multi-process launch (a TPU pod slice, several GPU hosts) one process writes the files."""
    import jax

    return jax.process_index() == 0


def wait_for_all_processes(name: str) -> None:
    """A multi-process launch: no process goes past this point before every one has reached it."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# ================================================================================================
# Configuration: train.py's published settings, the flags over them, and the checks
# ================================================================================================

def parse_args(method, argv=None):
    """The command line: every published setting of train.py (method.GRPO, method.SFT) is a flag
    --like-this; left unset, it takes the published value of the phase."""
    import argparse

    import rewards

    p = argparse.ArgumentParser(description="SFT and GRPO blocks of the DIPG penalty-annealing curriculum "
                                            "(and seed 002's GSM8K phases) with Tunix.")
    p.add_argument("--phase", required=True, choices=method.PHASES + ("curriculum",),
                   help="one block, or 'curriculum': the whole journey of --schedule, evaluated after each block")
    p.add_argument("--penalty", choices=tuple(rewards.PENALTIES), help="DIPG penalty level of a GRPO block (default soft)")
    p.add_argument("--model", help="gemma-3-1b-it (published), gemma-3-270m (embedded, offline) or tiny (tests)")
    p.add_argument("--model-path", help="local Hugging Face-format directory with the model's weights")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="auto: bfloat16 on GPU/TPU (as the published TPU run), float32 on CPU")
    p.add_argument("--mesh", default="fsdp=1,tp=1", help="device mesh over Tunix's axes (default %(default)s)")
    p.add_argument("--dataset", default="builtin", help="builtin (default), hub, a hub id or a local .jsonl/.json/.parquet")
    p.add_argument("--n-prompts", type=int, help="use only the first N rows of the dataset")
    p.add_argument("--seed", type=int, default=0, help="data order and LoRA init (default %(default)s)")
    p.add_argument("--sample-every", type=int, default=25, help="show one completion every N steps (0: never)")
    p.add_argument("--wandb", metavar="PROJECT", help="also log metrics and samples to this Weights & Biases project "
                                                      "(pip install wandb; WANDB_MODE=offline: local files only)")
    # Every published setting is a flag; left unset, it takes the published value of the phase.
    choices = {"kl_loss_mode": ("low_var_kl", "kl", "mse_kl"), "data_order": ("restart", "continue"),
               "sft_schedule": ("constant", "notebook"), "loss_agg_mode": None,
               "remat": ("none", "block", "decoder")}
    for key in dict.fromkeys([*method.GRPO, *method.SFT, *method.GSM8K_SLICE]):
        if key == "model":
            continue
        grpo, sft = method.GRPO.get(key), method.SFT.get(key, method.GSM8K_SLICE.get(key))
        published = " / ".join(f"{name} {v}" for name, v in (("GRPO", grpo), ("SFT", sft)) if v is not None)
        flags = ["--" + key.replace("_", "-")] + (["--steps"] if key == "max_steps" else [])
        p.add_argument(*flags, dest=key, type=type(grpo if grpo is not None else sft), choices=choices.get(key),
                       help=f"default{'' if key in method.NOT_PUBLISHED else ' (published)'}: {published}")
    j = p.add_argument_group("run directory and the journey")
    j.add_argument("--out", help="run directory (default runs/<phase>[_<penalty>]_<end step>); curriculum: its root")
    j.add_argument("--init-from", metavar="RUN_DIR", help="start from this run's weights and continue its global steps")
    j.add_argument("--resume", action="store_true", help="continue the interrupted run in --out at its last checkpoint")
    j.add_argument("--overwrite", action="store_true", help="replace whatever is in --out")
    j.add_argument("--force", action="store_true", help="start a phase that changes both dataset and rewards")
    j.add_argument("--print-config", action="store_true", help="print the resolved configuration as JSON and exit")
    j.add_argument("--stop-after", type=int, metavar="GLOBAL_STEP", help="debug: behave as if Ctrl-C came during this step")
    j.add_argument("--schedule", help="curriculum: blocks in order (default: the preset's; published: sft,"
                                      + ",".join(method.PUBLISHED_SCHEDULE) + ")")
    j.add_argument("--preset", choices=tuple(method.PRESETS), default="paper",
                   help="curriculum: paper = the published journey (gemma-3-1b-it); gpu = the same on the embedded "
                        "270M for one accelerator (~20 min on an H100); cpu = base vs SFT + one short GRPO block "
                        "on 2 CPU cores (~20 min)")
    j.add_argument("--eval-dataset", help="curriculum: evaluation vignettes (default: the builtin eval split)")
    return p.parse_args(argv), p




def resolve_config(method, args, parser, init_meta: dict | None) -> dict:
    """The flat configuration of one block: flags over the published defaults of its phase. A block
    started --init-from keeps the model and LoRA shape of that run (its LoRA weights must fit)."""
    phase = args.phase
    if args.penalty and phase != "grpo":
        parser.error(f"--penalty applies to --phase grpo only (got --phase {phase})")
    import dataclasses

    import gsm8k
    import rewards

    defaults = method.phase_defaults(phase)
    if init_meta is not None:
        for key in ("model", "lora_rank", "lora_alpha"):
            asked = getattr(args, key)
            if asked is not None and asked != init_meta.get(key):
                parser.error(f"--{key.replace('_', '-')} {asked} differs from the init run's {init_meta.get(key)} "
                             f"({args.init_from}); its LoRA weights belong to that model. Drop the flag.")
            defaults[key] = init_meta[key]
    config = {"phase": phase, "penalty": (args.penalty or "soft") if phase == "grpo" else None}
    config.update({k: v if getattr(args, k, None) is None else getattr(args, k) for k, v in defaults.items()})
    config.update(model_path=args.model_path or (init_meta or {}).get("model_path"), dtype=resolve_dtype(args.dtype),
                  mesh=args.mesh, dataset=args.dataset, n_prompts=args.n_prompts, seed=args.seed, wandb=args.wandb,
                  init_from=str(Path(args.init_from).resolve()) if args.init_from else None,
                  start_step=(init_meta["global_step"] + 1) if init_meta else 1)
    config["end_step"] = config["start_step"] + config["max_steps"] - 1
    config["lr_schedule"] = method.lr_schedule(config)
    if phase == "grpo":  # the rewards by their published names, so --print-config shows the whole block
        config.update(dataclasses.asdict(rewards.PENALTIES[config["penalty"]]))
    elif phase != "sft":
        config["reward_functions"] = [f.__name__ for f in gsm8k.PHASE_REWARDS[phase]]
    check_wandb(config)
    # Checks a typo would otherwise turn into a confusing failure an hour later.
    try:
        parse_mesh(config["mesh"])
    except ValueError as e:
        parser.error(str(e))
    if config["max_steps"] < 1:
        parser.error("--steps must be >= 1")
    if config["logps_chunk_size"] < 0:
        parser.error("--logps-chunk-size must be >= 0 (0: Tunix's full logits)")
    if config["logps_chunk_size"] == 0 and config["remat"] != "none":
        parser.error(f"--remat {config['remat']} is applied in our chunked loss, which --logps-chunk-size 0 "
                     "replaces with Tunix's own: add --remat none")
    if phase != "sft":
        if config["num_generations"] < 2:
            parser.error("--num-generations must be >= 2: GRPO compares completions within a group")
        if config["kv_cache_size"] <= config["max_prompt_length"] + config["max_tokens_to_generate"]:
            parser.error(f"--kv-cache-size {config['kv_cache_size']} must exceed --max-prompt-length + "
                         f"--max-tokens-to-generate = {config['max_prompt_length'] + config['max_tokens_to_generate']}")
    if phase == "format" and not 0 <= config["slice_start"] < config["slice_end"] <= 1:
        parser.error("--slice-start/--slice-end: need 0 <= start < end <= 1")
    return config


def resolve_dtype(dtype: str) -> str:
    """--dtype auto: bfloat16 on accelerators (the published TPU run computed in bf16), float32 on CPU
    (bfloat16 matrix products are slow there)."""
    if dtype != "auto":
        return dtype
    import jax

    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def parse_mesh(text: str) -> dict:
    """'fsdp=2,tp=1' -> {'fsdp': 2, 'tp': 1}."""
    axes = {"fsdp": 1, "tp": 1}
    for part in filter(None, text.replace(" ", "").split(",")):
        name, _, value = part.partition("=")
        if name not in axes or not value.isdigit() or int(value) < 1:
            raise ValueError(f"--mesh {text!r}: expected fsdp=N,tp=M with N, M >= 1")
        axes[name] = int(value)
    return axes


# ================================================================================================
# Run directories: what a block trains on, where it writes, what it continues
# ================================================================================================

GSM8K_PHASES = ("format", "correctness", "generalize")


def reward_set(config: dict) -> str:
    """What the block optimises, as compared by the phase rules."""
    if config["phase"] == "sft":
        return "sft_format"
    if config["phase"] == "grpo":
        return f"dipg_{config['penalty']}"
    return "gsm8k_" + ("format" if config["phase"] == "format" else "correctness")  # generalize keeps phase 2's


def dataset_id(config: dict) -> str:
    """Which data the block trains on. The format phase's slice is part of GSM8K, so format and
    correctness share a dataset (seed 002 changes only the rewards between them)."""
    source = config["dataset"]
    if config["phase"] in ("sft", "grpo"):
        return f"{source}:dipg/train"
    if config["phase"] == "generalize":
        return f"{source}:mixed(gsm8k,code,qa)"
    return f"{source}:gsm8k/train"


def default_out(config: dict) -> Path:
    name = config["phase"] if config["phase"] == "sft" else "_".join(
        filter(None, [config["phase"], config["penalty"], str(config["end_step"])]))
    return Path("runs") / name


def load_init_run(path: str) -> dict:
    meta = read_metadata(path)
    if meta is None:
        sys.exit(f"error: --init-from {path}: no run there (no {Path(path) / 'metadata.json'}); "
                 "pass a directory written by train.py")
    if not meta.get("complete"):
        sys.exit(f"error: --init-from {path}: that run stopped at step {meta.get('global_step')} of "
                 f"{meta.get('end_step')}; finish it first with: python train.py --phase {meta['phase']} --out {path} --resume")
    return meta


def check_phase_rules(config: dict, init_meta: dict | None, force: bool) -> None:
    """Seed 002: 'Do NOT change dataset and rewards at the same time.'"""
    if init_meta is None:
        return
    old_data, old_rewards = init_meta.get("dataset"), init_meta.get("reward_set")
    new_data, new_rewards = dataset_id(config), reward_set(config)
    if old_data != new_data and old_rewards != new_rewards:
        message = (f"--phase {config['phase']} from {config['init_from']} changes both the dataset ({old_data} -> {new_data}) "
                   f"and the rewards ({old_rewards} -> {new_rewards}); seed 002's rule is to change one at a time")
        if not force:
            sys.exit(f"error: {message}. Run the phase in between first, or pass --force.")
        log.warning("%s (--force given: going ahead)", message)


def prepare_run_dir(out, config: dict, init_meta: dict | None = None, overwrite: bool = False) -> Path:
    """Create the run directory and its metadata.json; never over a run unless --overwrite."""
    run_dir = Path(out) if out else default_out(config)
    existing = read_metadata(run_dir)
    if run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        what = f"a {existing['phase']} run at step {existing['global_step']}" if existing else "other files"
        sys.exit(f"error: --out {run_dir} already holds {what}; pass --resume to continue it, "
                 "--overwrite to replace it, or choose another --out")
    wait_for_all_processes("run directory checked")  # every process looked before process 0 writes
    this_block = {"run_dir": str(run_dir.resolve()), "phase": config["phase"], "penalty": config["penalty"],
                  "start_step": config["start_step"], "end_step": config["end_step"]}
    metadata = {
        "phase": config["phase"], "penalty": config["penalty"], "model": config["model"],
        "model_path": config["model_path"], "lora_rank": config["lora_rank"], "lora_alpha": config["lora_alpha"],
        "start_step": config["start_step"], "global_step": config["start_step"] - 1, "end_step": config["end_step"],
        "max_steps": config["max_steps"], "dataset": dataset_id(config), "reward_set": reward_set(config),
        # Tunix's RLCluster writes the actor's checkpoints one level down, under "actor".
        "checkpoint_dir": "checkpoints" if config["phase"] == "sft" else "checkpoints/actor",
        "config": config, "complete": False,
        "lineage": (init_meta["lineage"] if init_meta else []) + [this_block],
    }
    if is_main_process():
        if overwrite:
            shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "metadata.json", metadata)
    wait_for_all_processes("run directory written")
    return run_dir


def check_wandb(config: dict) -> None:
    """--wandb (also a resumed run's saved one) fails now, not when the first step is logged."""
    if config.get("wandb") and importlib.util.find_spec("wandb") is None:
        sys.exit("error: --wandb needs the wandb package, which is not installed: pip install wandb")


def reopen_run_dir(out, phase: str, parser) -> tuple[Path, dict]:
    """--resume: the interrupted run in --out and its saved configuration."""
    if not out:
        parser.error("--resume needs --out RUN_DIR (the run to continue)")
    run_dir, existing = Path(out), read_metadata(out)
    if existing is None:
        sys.exit(f"error: --resume: {run_dir} holds no run to resume (no metadata.json); drop --resume to start one")
    if existing.get("complete"):
        sys.exit(f"error: --resume: {run_dir} is complete (step {existing['global_step']}); "
                 f"start the next block with --init-from {run_dir}")
    if existing["phase"] != phase:
        parser.error(f"--resume: {run_dir} is a {existing['phase']} run, not --phase {phase}")
    log.info("resuming %s with its saved configuration", run_dir)
    check_wandb(existing["config"])
    return run_dir, existing["config"]


def run_block(train_block, config: dict, run_dir, stop_after: int | None = None) -> Path:
    """Train one block into run_dir (train_block is train.py's SFT or GRPO), record how far it got,
    and say what to run next. A curriculum is a loop over this function."""
    run_dir = Path(run_dir)
    last = train_block(config, run_dir, stop_after=stop_after)
    metadata = read_metadata(run_dir)
    metadata.update(global_step=last, complete=last >= config["end_step"])
    if not is_main_process():
        return run_dir
    write_json(run_dir / "metadata.json", metadata)
    if metadata["complete"]:
        print(f"done: {run_dir} (global steps {config['start_step']}-{last})")
        print_next_steps(config, run_dir, metadata)
    else:
        print(f"stopped at global step {last}; continue with: python train.py --phase {config['phase']} "
              f"--out {run_dir} --resume")
    return run_dir


def remove_if_empty_run(run_dir) -> None:
    """A fresh run that failed before its first checkpoint (e.g. weights unavailable) leaves nothing
    behind, so the same command can simply be run again."""
    if is_main_process() and not any(Path(run_dir, "checkpoints").rglob("commit_success.txt")):
        shutil.rmtree(run_dir, ignore_errors=True)


# ================================================================================================
# After a block: what to run next (and, in the GSM8K phases, whether seed 002's exit criteria hold)
# ================================================================================================

def print_next_steps(config: dict, run_dir: Path, metadata: dict, schedule=("soft", "medium", "soft", "soft")) -> None:
    if config["phase"] in GSM8K_PHASES:  # seed 002's exit criteria, then the next phase
        import gsm8k

        gsm8k.print_next_steps(config, run_dir)
        return
    blocks = sum(1 for b in metadata["lineage"] if b["phase"] == "grpo")
    if blocks < len(schedule):
        print(f"next (published curriculum, block {blocks + 1}): python train.py --phase grpo "
              f"--penalty {schedule[blocks]} --init-from {run_dir}")
    print(f"evaluate: python eval.py --runs {run_dir}")


# ================================================================================================
# Per-step metrics: Tunix's scalars -> RUN_DIR/metrics.jsonl, a progress bar, TensorBoard
# ================================================================================================

def read_rows(run_dir) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


# Tunix scalar ("<prefix>/<name>", mode dropped) -> metrics.jsonl key.
ROW_KEYS = {
    "actor/loss": "loss", "actor/kl": "kl", "actor/grad_norm": "grad_norm",
    "rewards/score/mean": "reward_mean", "rewards/score/max": "reward_max", "rewards/score/min": "reward_min",
    "completions/mean_length": "completion_len_mean",
    "perf/global_step_time": "seconds", "perf/sum/rollout_time": "rollout_seconds",
    "perf/sum/refer_inference_time": "reference_seconds", "perf/sum/actor_train_time": "update_seconds",
}


class MetricsLog:
    """A Tunix metrics backend (metrax's LoggingBackend protocol: log_scalar, close).

    Tunix logs every scalar as "<prefix>/<mode>/<name>" with its own step count. Rollout-side
    metrics ("rewards", "completions", and our "step" metrics) carry the count BEFORE their update,
    the others (loss, KL, timers) the count after it; we file all under the 1-based local step they
    belong to. Tunix flushes a step's metrics late (its timers only once the next step has run), so
    a step's row is written when the last of `complete_keys` arrives. Each row goes to metrics.jsonl
    and, under the GLOBAL step, to TensorBoard (so `tensorboard --logdir runs` shows a whole journey)
    and, with --wandb, to Weights & Biases."""

    ROLLOUT_PREFIXES = ("rewards", "completions", "step")
    # Counts of completions (what train.step_metrics reports): whole numbers in the rows.
    COUNTS = ("n_completions", "format_error", "missing_proof", "hallucination", "correct_abstention",
              "correct_answer", "incorrect", "abstention", "refusal")

    def __init__(self, run_dir: Path, config: dict, schedule, complete_keys=()):
        self.run_dir, self.config, self.complete_keys = Path(run_dir), config, tuple(complete_keys)
        self.schedule = schedule  # the optimizer's: local step k updates with schedule(k - 1)
        self.path = self.run_dir / "metrics.jsonl"
        self.by_step: dict[int, dict] = {}
        self.extras: dict[int, dict] = {}  # per-step values that are not Tunix scalars (train.py, stop_hooks)
        self.lock = threading.Lock()  # rollout metrics are logged from Tunix's data thread
        self.main = is_main_process()
        self.bar = self.tensorboard = self.wandb = None
        # Tunix registers its backends as process-wide jax.monitoring listeners, which are never
        # removed: a log takes scalars only between start() and finish(), so a later block in the
        # same process (tests) never writes into an earlier block's files.
        self.active = False

    def start(self, done_steps: int) -> None:
        """Once the trainer has restored its checkpoint (done_steps > 0 on a resume): forget the rows
        of steps after it (they will be redone), open the progress bar and TensorBoard."""
        from tensorboardX import SummaryWriter
        from tqdm.auto import tqdm

        config = self.config
        if self.main and self.path.exists():
            keep = [r for r in read_rows(self.run_dir) if r["step"] <= config["start_step"] - 1 + done_steps]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))
        self.bar = tqdm(total=config["max_steps"], initial=done_steps, unit="step", disable=not self.main,
                        desc=f"{config['phase']}{'/' + config['penalty'] if config['penalty'] else ''}")
        self.tensorboard = SummaryWriter(str(self.run_dir / "tensorboard")) if self.main else None
        if self.main and config.get("wandb"):
            import wandb

            # One W&B run per block (a resumed block: a new run of the same name), grouped by the
            # journey's directory, its charts drawn against the global step: "step" in every log call.
            self.wandb = wandb.init(project=config["wandb"], group=self.run_dir.resolve().parent.name,
                                    name=self.run_dir.name, config=config, dir=self.run_dir)
            self.wandb.define_metric("*", step_metric="step")
        self.active = True

    def options(self, run_dir: Path):
        """The MetricsLoggerOptions to hand to a Tunix trainer: this object is its only backend."""
        from tunix.sft import metrics_logger

        return metrics_logger.MetricsLoggerOptions(log_dir=str(Path(run_dir) / "tunix_logs"),
                                                   backend_kwargs={"custom_backend": [lambda: self]})

    def log_scalar(self, event: str, value, step=None, **kwargs):
        import numpy as np

        parts = event.split("/")
        if not self.active or step is None or len(parts) < 3 or parts[1] != "train":
            return
        try:
            value = float(np.mean(np.asarray(value, dtype=float)))
        except (TypeError, ValueError):
            return
        step = int(step) + (1 if parts[0] in self.ROLLOUT_PREFIXES else 0)
        with self.lock:
            scalars = self.by_step.setdefault(step, {})
            scalars["/".join([parts[0]] + parts[2:])] = value
            if self.complete_keys and all(k in scalars for k in self.complete_keys):
                self.write_step(step, self.by_step.pop(step))

    def write_step(self, local_step: int, scalars: dict) -> None:
        """One row: the step, the block, Tunix's scalars under readable names, then the extras."""
        step = self.config["start_step"] - 1 + local_step
        row = {"step": step, "phase": self.config["phase"], "penalty": self.config["penalty"]}
        functions = self.config.get("reward_functions") or []
        for name, value in scalars.items():
            key = ROW_KEYS.get(name, name.removeprefix("step/"))
            if key.removeprefix("rewards/") in functions:  # GSM8K: each reward function's mean
                row.setdefault("rewards", {})[key.removeprefix("rewards/")] = value
            elif not key.startswith(("rewards/", "perf/mean/", "actor/learning_rate")):  # repeats, or a step late
                row[key] = int(round(value)) if key in self.COUNTS else value
        row.update(self.extras.pop(local_step, {}))  # SFT: Tunix times no steps; stop_hooks adds "seconds"
        # Tunix reads the rate from the optimizer state when it flushes, a step late: use the schedule.
        row["learning_rate"] = float(self.schedule(local_step - 1))
        tokens = row.pop("tokens_per_step", None) or row.get("completion_len_mean", 0) * row.get("n_completions", 0)
        row["tokens_per_second"] = tokens / row["seconds"] if tokens and row["seconds"] else None
        if not self.main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        scalars = {f"{self.config['phase']}/{key}": value for key, value in row.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step"}
        for tag, value in scalars.items():
            self.tensorboard.add_scalar(tag, value, step)
        self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log({"step": step, **scalars})
        self.bar.set_postfix({k: _fmt(row.get(k), d) for k, d in
                              (("loss", 3), ("reward_mean", 2), ("kl", 4), ("seconds", 1)) if k in row}, refresh=False)
        self.bar.update(1)

    def text(self, tag: str, text: str, local_step: int) -> None:
        """A sample completion, shown in TensorBoard's text tab and under the progress bar."""
        if self.main:
            step = self.config["start_step"] - 1 + local_step
            self.tensorboard.add_text(tag, "```\n" + text + "\n```", step)
            if self.wandb is not None:
                import wandb

                sample = wandb.Table(columns=["step", "tag", "text"], data=[[step, tag, text]])
                self.wandb.log({"step": step, "samples": sample})
            self.bar.write(f"--- step {step}, {tag}:\n{text[:1500]}\n---")

    def flush(self):
        """Write what is left (e.g. after an interruption), in step order."""
        with self.lock:
            for step in sorted(self.by_step):
                if "actor/loss" in self.by_step[step]:
                    self.write_step(step, self.by_step.pop(step))

    def close(self):  # Tunix closes its backends when its trainer closes; ours outlive that
        pass

    def finish(self):
        self.flush()
        self.active = False
        if self.bar is not None:
            self.bar.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def _fmt(x, digits=2):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


# ================================================================================================
# Interruption: Ctrl-C (or --stop-after) finishes the current step, saves, and exits
# ================================================================================================

class StopRequest:
    """First Ctrl-C: ask the trainer to stop after the current step (it then saves a checkpoint on
    its way out). Second Ctrl-C: stop now, without saving. `on_stop` tells the trainer."""

    def __init__(self, on_stop):
        self.on_stop, self.requested = on_stop, False

    def __enter__(self):
        self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.request("Ctrl-C")

    def request(self, why: str):
        if not self.requested:
            self.requested = True
            print(f"\n{why}: finishing the current step, saving a checkpoint, then exiting "
                  "(Ctrl-C again to quit without saving)", file=sys.stderr, flush=True)
            self.on_stop()

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)
        return False


def stop_hooks(stopper: StopRequest, config: dict, stop_after: int | None, sft_metrics: MetricsLog | None = None):
    """Tunix TrainingHooks: --stop-after GLOBAL_STEP behaves like a Ctrl-C during that step. For SFT
    (sft_metrics), also each step's row of metrics.jsonl, with the step's time: PeftTrainer times none."""
    from tunix.sft import hooks

    started = {}  # SFT: local step -> when the host began it (its first micro-batch)

    class Hooks(hooks.TrainingHooks):
        def on_train_start(self, trainer): pass
        def on_train_end(self, trainer): pass
        def on_eval_step_start(self, trainer): pass
        def on_eval_step_end(self, trainer, eval_loss): pass

        def on_train_step_start(self, trainer):  # before every micro-batch
            if stop_after is not None and config["start_step"] + trainer.train_steps >= stop_after:
                stopper.request(f"--stop-after {stop_after}")
            if sft_metrics is not None and trainer.iter_steps % config["gradient_accumulation_steps"] == 0:
                started[trainer.train_steps + 1] = time.time()

        def on_train_step_end(self, trainer, train_step, train_loss):
            if sft_metrics is None:
                return
            # Tunix hands over a step's loss late, after the next step has begun (on CPU: has run), so a
            # step's time runs from its start to the next one's (the last step's: to its loss).
            loss = float(train_loss)
            seconds = started.get(train_step + 1, time.time()) - started[train_step]
            tokens = config["batch_size"] * config["gradient_accumulation_steps"] * config["max_seq_length"]
            sft_metrics.extras[train_step] = {"tokens_per_step": tokens, "seconds": seconds}
            sft_metrics.write_step(train_step, {"actor/loss": loss})

    return Hooks()


def checkpointing(config: dict, root: Path) -> dict:
    """Tunix trainers' checkpoint options: every save_every steps, keep the newest few."""
    import orbax.checkpoint as ocp

    return dict(checkpoint_root_directory=str(root.resolve()),
                checkpointing_options=ocp.CheckpointManagerOptions(save_interval_steps=config["save_every"],
                                                                   max_to_keep=config["keep_checkpoints"]))


# ================================================================================================
# The whole journey in one command: every block and every evaluation in a child process
# ================================================================================================

def _call_and_send(conn, fn, args, kwargs):
    setup_logging()
    try:
        conn.send(("ok", fn(*args, **kwargs)))
    except BaseException as e:  # SystemExit included: the parent reports it
        conn.send(("error", e if isinstance(e, (SystemExit, KeyboardInterrupt)) else RuntimeError(repr(e))))
        raise


def in_child_process(fn, *args, **kwargs):
    """Run fn in a fresh process and return its result. Every block and every evaluation loads its
    own model; in one long-lived process JAX would keep all of them (and their compiled programs)
    alive, and five blocks outgrow 24 GB. A child process gives all of it back when it ends; the
    persistent compilation cache keeps the restart cheap."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_call_and_send, args=(send, fn, args, kwargs))
    child.start()
    send.close()
    try:
        status, value = receive.recv()
    except EOFError:  # killed without a word (e.g. out of memory)
        child.join()
        sys.exit(f"error: {getattr(fn, '__name__', fn)} died (exit code {child.exitcode}); "
                 "run the same command again to resume")
    except KeyboardInterrupt:  # the child got Ctrl-C too: let it save and finish, then stop here
        child.join()
        sys.exit("interrupted; run the same command again to resume the journey")
    child.join()
    if status == "error":
        raise value
    return value


def parse_schedule(text: str, levels) -> list[str]:
    blocks = [b.strip() for b in text.split(",") if b.strip()]
    bad = [b for b in blocks if b not in ("sft", *levels)]
    if not blocks or bad or "sft" in blocks[1:]:
        raise ValueError(f"--schedule {text!r}: expected a comma-separated list of GRPO penalty levels "
                         f"({', '.join(levels)}), optionally starting with sft (e.g. sft,soft,medium,soft,soft)")
    return blocks


def run_curriculum(args, parser, resolve_config, train_block, preset: dict, levels, published=None) -> int:
    """Train each block of --schedule from the previous one, evaluate it, and keep OUT/table.md and
    OUT/curriculum.png up to date. Finished blocks and evaluations are skipped, so rerunning the
    same command after an interruption resumes the journey where it stopped."""
    import argparse

    import eval as eval_lib

    try:
        schedule = parse_schedule(args.schedule or preset["schedule"], levels)
    except ValueError as e:
        parser.error(str(e))
    root = Path(args.out or "runs")

    def block_args(block: str, init_from):
        """The user's flags, then the preset's, then the published defaults (in resolve_config)."""
        b = argparse.Namespace(**vars(args))
        b.phase, b.penalty = ("sft", None) if block == "sft" else ("grpo", block)
        b.init_from = str(init_from) if init_from else None
        for key, value in preset[b.phase].items():
            if getattr(b, key, None) is None:
                setattr(b, key, value)
        return b

    if args.print_config:  # every block's configuration, one JSON object per line; nothing runs
        init_from, init_meta = args.init_from, load_init_run(args.init_from) if args.init_from else None
        for block in schedule:
            config = resolve_config(block_args(block, init_from), parser, init_meta)
            print(json.dumps(config))
            # what the next block will find in this one's metadata.json once it has run
            init_from, init_meta = root / default_out(config).name, {"global_step": config["end_step"], **{
                k: config[k] for k in ("model", "model_path", "lora_rank", "lora_alpha")}}
        return 0
    root.mkdir(parents=True, exist_ok=True)
    settings = preset["eval"]
    rows, eval_dataset = eval_lib.load_eval_rows("dipg", dataset=args.eval_dataset, n=settings["n"])
    references = eval_lib.reference_summaries(rows)  # what a number is worth: two policies with no model
    summaries = []
    init_from = args.init_from
    for i, block in enumerate(schedule, 1):
        b = block_args(block, init_from)
        init_meta = load_init_run(b.init_from) if b.init_from else None
        config = resolve_config(b, parser, init_meta)
        if i == 1:  # the model before any training: the table's first column
            summaries.append(in_child_process(eval_lib.evaluate_run, "base", rows, dataset_id=eval_dataset,
                                              model_name=config["model"], model_path=config["model_path"],
                                              max_new_tokens=settings["max_new_tokens"],
                                              batch_size=settings["batch_size"], out_dir=root / "eval" / "base"))
        run_dir = root / default_out(config).name
        existing = read_metadata(run_dir)
        print(f"\n=== block {i}/{len(schedule)}: {block} -> {run_dir} (global steps {config['start_step']}-{config['end_step']})")
        if existing and existing.get("complete"):
            print(f"already trained ({run_dir}/metadata.json says complete); skipping")
        else:
            if existing:  # interrupted earlier: continue it with its own saved configuration
                config = existing["config"]
            else:
                check_phase_rules(config, init_meta, args.force)
                config["sample_every"] = args.sample_every
                prepare_run_dir(run_dir, config, init_meta)
            in_child_process(run_block, train_block, config, run_dir, stop_after=args.stop_after)
            if not read_metadata(run_dir).get("complete"):
                print(f"stopped inside {run_dir}; run the same command again to resume the journey")
                return 1
        summaries.append(in_child_process(eval_lib.evaluate_run, str(run_dir), rows, dataset_id=eval_dataset,
                                          max_new_tokens=settings["max_new_tokens"],
                                          batch_size=settings["batch_size"], out_dir=root / "eval" / run_dir.name))
        table = eval_lib.write_table(summaries, root / "table.md", references=references)
        eval_lib.plot_curriculum(summaries, root / "curriculum.png", published=published)
        init_from = run_dir
    print(f"\n{table}\nwrote {root / 'table.md'} and {root / 'curriculum.png'}")
    return 0
