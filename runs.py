"""Run bookkeeping, which keeps long runs safe and which a reader of the method can skip (it imports nothing of ours):
run directories, several processes on one mesh, per-step metrics, Ctrl-C, child processes for a journey's blocks."""

import contextlib
import importlib.util
import json
import logging
import math
import multiprocessing
import os
import pickle
import shutil
import signal
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

log = logging.getLogger("train")


def setup_logging() -> None:
    """Our own INFO lines (which model and which data run); the libraries' warnings only."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)
    for noisy in ("absl", "jax", "orbax", "tunix"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def write_json(path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, default=str, ensure_ascii=False) + "\n")


def write_text(path, text: str) -> None:
    """Write a file atomically (a temporary file, then a rename): a crash never leaves half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def read_metadata(run_dir) -> dict | None:
    """RUN_DIR/metadata.json as a dict, or None when there is no run there; a damaged one stops us in one line."""
    path = Path(run_dir) / "metadata.json"
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (ValueError, OSError) as e:
        sys.exit(f"error: {path} cannot be read ({e}); restore it from a copy, or remove {run_dir} to start again")


def join_processes() -> int:
    """Join a multi-process launch before JAX touches a device (JAX_NUM_PROCESSES, SLURM, Open MPI, TPU slices)."""
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
    from jax.experimental import multihost_utils
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def check_inputs_agree(config: dict, steps: list, first_step: int) -> None:
    """Several processes: compare digests of the configuration and of every step's inputs (one collective)."""
    import jax
    from jax.experimental import multihost_utils
    digests = np.array([zlib.crc32(pickle.dumps(x)) for x in [json.dumps(config, default=str), *steps]], np.uint32)
    differ = np.flatnonzero((multihost_utils.process_allgather(digests) != digests).any(axis=0))
    if jax.process_count() > 1 and differ.size:
        what = f"the inputs of global step {first_step + differ[0] - 1}" if differ[0] else "the configuration"
        sys.exit(f"error: {what} differ between process {jax.process_index()} and another; every host must run "
                 "the same command on the same files (README \"Several hosts\")")


def parse_mesh(text: str) -> dict:
    """'fsdp=2,tp=1' -> {'fsdp': 2, 'tp': 1}."""
    axes = {"fsdp": 1, "tp": 1}
    for part in filter(None, text.replace(" ", "").split(",")):
        name, _, value = part.partition("=")
        if name not in axes or not value.isdigit() or int(value) < 1:
            raise ValueError(f"--mesh {text!r}: expected fsdp=N,tp=M with N, M >= 1")
        axes[name] = int(value)
    return axes


# Run directories: what a block trains on, where it writes, what it continues

def load_init_run(path: str) -> dict:
    meta = read_metadata(path)
    if meta is None:
        sys.exit(f"error: --init-from {path}: no run there (no {Path(path) / 'metadata.json'}); "
                 "pass a directory written by train.py")
    if not meta.get("complete"):
        sys.exit(f"error: --init-from {path}: that run stopped at step {meta.get('global_step')} of "
                 f"{meta.get('end_step')}; finish it first with: python train.py --phase {meta['phase']} --out {path} --resume")
    return meta


RUN_FILES = ("metadata.json", "metrics.jsonl", "checkpoints", "tensorboard", "tunix_logs", "wandb")  # what a run writes


def check_run_dir(run_dir, overwrite: bool) -> None:
    """A new run goes into a new or empty directory, or with --overwrite one holding a run of train.py; nothing else."""
    run_dir, existing = Path(run_dir), read_metadata(run_dir)
    ours = isinstance(existing, dict) and "lineage" in existing
    if not ours and (run_dir.is_file() or run_dir.is_dir() and any(run_dir.iterdir())):
        sys.exit(f"error: --out {run_dir} holds files that are not a run of train.py (no metadata.json of ours); "
                 "choose another --out (--overwrite replaces only a run directory that train.py wrote)")
    if ours and not overwrite:
        again = "" if existing.get("complete") else "pass --resume to continue it, "
        sys.exit(f"error: --out {run_dir} already holds a {existing['phase']} run at step {existing['global_step']}; "
                 f"{again}--overwrite to replace it, or choose another --out")


def prepare_run_dir(run_dir, metadata: dict) -> Path:
    """Write a new run's metadata.json, first removing the files of the run it replaces (check_run_dir allowed it)."""
    run_dir = Path(run_dir)
    wait_for_all_processes("run directory checked")  # every process looked before process 0 writes
    if is_main_process():
        remove_run_files(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "metadata.json", metadata)
    wait_for_all_processes("run directory written")
    return run_dir


def remove_run_files(run_dir) -> None:
    for path in (Path(run_dir) / name for name in RUN_FILES):
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def finish_run_dir(run_dir, last_step: int, ended_early: bool = False, **fields) -> dict:
    """Record how far the block got: RUN_DIR/metadata.json's global_step and complete (also when ended_early)."""
    metadata = {**read_metadata(run_dir), **fields}
    metadata.update(global_step=last_step, complete=ended_early or last_step >= metadata["end_step"])
    if is_main_process():
        write_json(Path(run_dir) / "metadata.json", metadata)
    wait_for_all_processes("run recorded")  # the next block of a journey reads it on every process
    return metadata


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
    check_wandb(existing["config"])
    check_resumable(run_dir, existing)
    log.info("resuming %s with its saved configuration", run_dir)
    return run_dir, existing["config"]


def check_resumable(run_dir, existing: dict) -> None:
    """A run that got past its first step continues from a checkpoint: refused when there is none."""
    root = Path(run_dir) / existing["checkpoint_dir"]
    if existing["global_step"] >= existing["start_step"] and not has_checkpoint(root):
        sys.exit(f"error: --resume: {root} holds no checkpoint to continue from (the run reached step "
                 f"{existing['global_step']}); restore it, or start the block again with --overwrite")


@contextlib.contextmanager
def restoring(root: Path):
    """Around a Tunix trainer restoring root's latest checkpoint: an unreadable one stops us in one line."""
    quiet = logging.getLogger("asyncio")  # orbax reads arrays concurrently: one more traceback per damaged one
    quiet.disabled = True
    try:
        yield
        quiet.disabled = False
    except (ValueError, KeyError, TypeError):  # the saved tree is not this model's: restore_checkpoint says so
        raise
    except Exception as e:
        if not has_checkpoint(root) or os.environ.get("TRAIN_DEBUG"):
            raise
        step = max(int(p.name) for p in root.iterdir() if p.name.isdigit())
        print(f"error: {root / str(step)}: this checkpoint cannot be read ({str(e.__cause__ or e).splitlines()[0][:200]}); "
              "remove it to go on from the one before, or start the block again with --overwrite", file=sys.stderr, flush=True)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)  # orbax's reads still in flight print tracebacks as we exit
        sys.exit(1)


def has_checkpoint(root: Path) -> bool:  # orbax renames a checkpoint's directory to its step once it is whole
    return any(p.name.isdigit() and p.is_dir() for p in root.rglob("*")) if root.is_dir() else False


def remove_if_empty_run(run_dir) -> None:
    """A fresh run that failed before its first checkpoint leaves nothing behind: the same command runs again."""
    run_dir = Path(run_dir)
    if is_main_process() and run_dir.is_dir() and not has_checkpoint(run_dir / "checkpoints"):
        remove_run_files(run_dir)
        if not any(run_dir.iterdir()):
            run_dir.rmdir()


# Per-step metrics: Tunix's scalars -> RUN_DIR/metrics.jsonl, a progress bar, TensorBoard

def read_rows(run_dir) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


# Tunix scalar ("<prefix>/<name>", mode dropped) -> metrics.jsonl key.
ROW_KEYS = {
    "actor/loss": "loss", "actor/kl": "kl", "actor/grad_norm": "grad_norm", "perf/global_step_time": "seconds",
    "rewards/score/mean": "reward_mean", "rewards/score/max": "reward_max", "rewards/score/min": "reward_min",
    "completions/mean_length": "completion_len_mean", "perf/sum/rollout_time": "rollout_seconds",
    "perf/sum/refer_inference_time": "reference_seconds", "perf/sum/actor_train_time": "update_seconds"}


class MetricsLog:
    """A Tunix metrics backend writing one row per GLOBAL step: RUN_DIR/metrics.jsonl, TensorBoard, the progress bar, W&B.
    Tunix counts rollout-side metrics ("rewards", "completions", our "step") BEFORE their update, the others after; we
    file each under its 1-based local step. A step's timers complete its row at the next checkpoint."""

    ROLLOUT_PREFIXES = ("rewards", "completions", "step")
    # Counts of completions (what grpo.step_metrics reports): whole numbers in the rows.
    COUNTS = ("n_completions", "format_error", "missing_proof", "hallucination", "correct_abstention",
              "correct_answer", "incorrect", "abstention", "refusal")

    def __init__(self, run_dir: Path, config: dict, schedule):
        self.run_dir, self.config, self.schedule = Path(run_dir), config, schedule  # local step k: schedule(k - 1)
        self.scalars: dict[int, dict] = {}  # local step -> Tunix's scalars, "<prefix>/<name>"
        self.extras: dict[int, dict] = {}  # per-step values that are not Tunix scalars (grpo.py, stop_hooks)
        self.rows: dict[int, dict] = {}  # local step -> its row, as written
        self.samples: dict[int, list] = {}  # local step -> [(tag, text)], for W&B
        self.lock = threading.Lock()  # rollout metrics and samples come from Tunix's data thread
        self.main = is_main_process()
        self.bar = self.events = self.wandb = None
        # Tunix's backends are process-wide listeners, never removed: take scalars only between start() and finish().
        self.active = False
        self.non_finite = None  # the first local step whose weights were not finite (never saved)

    def start(self, done_steps: int) -> None:
        """After the restore (done_steps): forget the rows and events of the steps redone, open the bar and writers."""
        config = self.config
        first = config["start_step"] + done_steps  # the first global step this process trains
        self.kept = [r for r in read_rows(self.run_dir) if r["step"] < first]
        self.final = self.saved = done_steps  # Tunix logs nothing more for the steps up to this one
        self.bar = tqdm(total=config["max_steps"], initial=done_steps, unit="step", disable=not self.main,
                        desc=f"{config['phase']}{'/' + config['penalty'] if config['penalty'] else ''}")
        if self.main:
            if (self.run_dir / "metrics.jsonl").exists():
                self.write_jsonl()
            # TensorBoard: a new event file, written through (tensorboardX's SummaryWriter writes from a thread
            # and a kill loses its tail), first dropping the events of the steps redone (purged at a START).
            from tensorboardX.event_file_writer import EventsWriter
            from tensorboardX.proto.event_pb2 import Event, SessionLog
            (self.run_dir / "tensorboard").mkdir(exist_ok=True)
            self.events = EventsWriter(str(self.run_dir / "tensorboard" / "events"))
            self.events.write_event(Event(wall_time=time.time(), step=first, session_log=SessionLog(status=SessionLog.START)))
            if config.get("wandb"):
                from tunix.sft.metrics_logger import WandbBackend
                # One W&B run per block (resumed: a new run of the same name), grouped by the journey's directory.
                self.wandb = WandbBackend(project=config["wandb"], name=self.run_dir.name, config=config,
                                          group=self.run_dir.resolve().parent.name, dir=self.run_dir)
        self.active = True

    def options(self, run_dir: Path):
        """The MetricsLoggerOptions to hand to a Tunix trainer: this object is its only backend."""
        from tunix.sft import metrics_logger
        return metrics_logger.MetricsLoggerOptions(log_dir=str(Path(run_dir) / "tunix_logs"),
                                                   backend_kwargs={"custom_backend": [lambda: self]})

    def log_scalar(self, event: str, value, step=None, **kwargs):
        parts = event.split("/")
        if not self.active or step is None or len(parts) < 3 or parts[1] != "train":
            return
        try:
            value = float(np.mean(np.asarray(value, dtype=float)))
        except (TypeError, ValueError):
            return
        step = int(step) + (1 if parts[0] in self.ROLLOUT_PREFIXES else 0)
        with self.lock:
            self.scalars.setdefault(step, {})["/".join([parts[0]] + parts[2:])] = value

    def row(self, local_step: int) -> dict:
        """A step's row: the step, the block, Tunix's scalars under readable names, then the extras."""
        row = {"step": self.config["start_step"] - 1 + local_step, "phase": self.config["phase"],
               "penalty": self.config["penalty"]}
        functions = self.config.get("reward_functions") or []
        for name, value in self.scalars[local_step].items():
            key = ROW_KEYS.get(name, name.removeprefix("step/"))
            if key.removeprefix("rewards/") in functions:  # GSM8K: each reward function's mean
                row.setdefault("rewards", {})[key.removeprefix("rewards/")] = value
            elif not key.startswith(("rewards/", "perf/mean/", "actor/learning_rate")):  # repeats, or a step late
                row[key] = int(round(value)) if key in self.COUNTS else value
        row.update(self.extras.get(local_step, {}))  # SFT: Tunix times no steps; stop_hooks adds "seconds"
        # Tunix reads the rate from the optimizer state after the update: use the schedule.
        row["learning_rate"] = float(self.schedule(local_step - 1))
        tokens = row.pop("tokens_per_step", None) or row.get("completion_len_mean", 0) * row.get("n_completions", 0)
        row["tokens_per_second"] = tokens / row["seconds"] if tokens and row.get("seconds") else None
        return row

    def write_rows(self) -> None:
        """Write the rows of the steps trained so far (once their loss is in) that are new or have grown."""
        with self.lock:
            steps = sorted(s for s, scalars in self.scalars.items() if s > self.final and "actor/loss" in scalars)
            changed = {s: row for s in steps if (row := self.row(s)) != self.rows.get(s)}
            if not changed or not self.main:
                return
            tags = lambda r: {f"{self.config['phase']}/{k}": v for k, v in r.items()  # a row's numbers, tagged
                              if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
            for s, row in changed.items():  # what TensorBoard and W&B have not been sent for the step
                sent = tags(self.rows.get(s, {}))
                self.send(row["step"], {t: v for t, v in tags(row).items() if t not in sent}, self.samples.pop(s, []))
            new = [s for s in changed if s not in self.rows]
            self.rows.update(changed)
            self.final = max([self.final] + steps[:-1])
            self.write_jsonl()
            if new:
                last = self.rows[new[-1]]
                self.bar.set_postfix({k: "-" if last[k] is None or math.isnan(last[k]) else f"{last[k]:.{d}f}"
                                      for k, d in (("loss", 3), ("reward_mean", 2), ("kl", 4), ("seconds", 1))
                                      if k in last}, refresh=False)
                self.bar.update(len(new))

    def write_jsonl(self) -> None:  # the rows before this process's first step, then its own
        rows = self.kept + [self.rows[s] for s in sorted(self.rows)]
        write_text(self.run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))

    def send(self, step: int, scalars: dict, samples: list) -> None:
        """To TensorBoard (written through) and W&B (a step's values until a later step's: in step order)."""
        from tensorboardX import summary
        from tensorboardX.proto.event_pb2 import Event
        for s in [summary.scalar(*x) for x in scalars.items()] + [summary.text(t, f"```\n{x}\n```") for t, x in samples]:
            self.events.write_event(Event(wall_time=time.time(), step=step, summary=s))
        self.events.flush()
        if self.wandb is not None:
            import wandb
            for tag, value in scalars.items():
                self.wandb.log_scalar(tag, value, step=step)
            for tag, text in samples:
                wandb.log({"samples": wandb.Table(columns=["step", "tag", "text"], data=[[step, tag, text]])}, step=step)

    def text(self, tag: str, text: str, local_step: int) -> None:
        """A sample completion: under the progress bar now, in TensorBoard's text tab and W&B with its row."""
        if self.main:
            with self.lock:
                self.samples.setdefault(local_step, []).append((tag, text))
            self.bar.write(f"--- step {self.config['start_step'] - 1 + local_step}, {tag}:\n{text[:1500]}\n---")

    def close(self):  # Tunix closes its backends when its trainer closes; ours outlive that
        pass

    def finish(self):
        self.write_rows()
        self.active = False
        for writer in (self.bar, self.events, self.wandb):
            if writer is not None:
                writer.close()
        if self.non_finite is not None:  # exit non-zero; the run's last checkpoint is its step
            scalars, first = self.scalars.get(self.non_finite, {}), self.config["start_step"] - 1
            finish_run_dir(self.run_dir, first + self.saved)
            sys.exit(f"error: global step {first + self.non_finite}: loss {scalars.get('actor/loss')}, gradient norm "
                     f"{scalars.get('actor/grad_norm')}: the weights are not finite and were not saved (last checkpoint: "
                     f"step {first + self.saved}). Usually too large a --learning-rate or --max-grad-norm"
                     f"{'' if self.config['phase'] == 'sft' else ', --beta, --epsilon or --temperature'}: start the "
                     "block again with a smaller one (--overwrite)")


def rows_before_checkpoints(metrics: MetricsLog, trainer, cluster=None) -> None:
    """A step's row is written before its checkpoint (Tunix 0.1.7 logs it later; private names, checked)."""
    for owner, name in ((trainer, "_write_train_metrics"), (cluster, "_log_metrics"), (cluster, "_buffered_train_metrics")):
        if owner is not None and not hasattr(owner, name):
            raise AttributeError(f"{type(owner).__name__}.{name} not found: this Tunix version buffers its "
                                 "metrics otherwise; runs.rows_before_checkpoints needs updating")
    import jax
    import jax.numpy as jnp
    from flax import nnx
    save = trainer.checkpoint_manager.save
    finite = jax.jit(lambda t: jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(t)])))

    def save_after_rows(step, model, *args, **kwargs):
        trainer._write_train_metrics()  # the step's loss
        while cluster is not None and cluster._buffered_train_metrics:  # its rollout, the last step's timers
            cluster._log_metrics(cluster._buffered_train_metrics.pop(0))
        metrics.write_rows()
        if metrics.non_finite is None and not finite(nnx.state(model, nnx.LoRAParam)):  # a non-finite loss or gradient
            metrics.non_finite = step  # never saved; the block stops after this step, as on Ctrl-C
            (cluster.cluster_config.training_config if cluster else trainer.config).max_steps = 0
        if metrics.non_finite is not None or not save(step, model, *args, **kwargs):
            return False
        metrics.saved = step
        return True

    trainer.checkpoint_manager.save = save_after_rows


# Interruption: Ctrl-C (or --stop-after) finishes the current step, saves, and exits

class StopRequest:
    """First Ctrl-C or SIGTERM (SLURM, Kubernetes, docker stop): stop after this step and save; a second: stop now.
    `signum` (class-wide) is the signal that stopped the latest block: the exit code is 128 + it."""
    SIGNALS, signum = (signal.SIGINT, signal.SIGTERM), None

    def __init__(self, on_stop):
        self.on_stop, self.requested = on_stop, False

    def __enter__(self):
        StopRequest.signum = None
        self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        StopRequest.signum = signum
        self.request("Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name)

    def request(self, why: str):
        if not self.requested:
            self.requested = True
            print(f"\n{why}: finishing the current step, saving a checkpoint, then exiting "
                  "(again to quit without saving)", file=sys.stderr, flush=True)
            self.on_stop()

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def stop_hooks(stopper: StopRequest, config: dict, stop_after: int | None, sft_metrics: MetricsLog | None = None,
               until=None):
    """Tunix TrainingHooks: --stop-after or until() act as a Ctrl-C in that step; SFT: each step's time and tokens."""
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
            if until is not None and until():
                stopper.request("exit criteria met")
            if sft_metrics is not None and trainer.iter_steps % config["gradient_accumulation_steps"] == 0:
                started[trainer.train_steps + 1] = time.time()

        def on_train_step_end(self, trainer, train_step, train_loss):
            # Tunix logs the loss as the step ends (rows_before_checkpoints): it took from its first micro-batch to now.
            if sft_metrics is not None:
                tokens = config["batch_size"] * config["gradient_accumulation_steps"] * config["max_seq_length"]
                sft_metrics.extras[train_step] = {"tokens_per_step": tokens, "seconds": time.time() - started.pop(train_step)}

    return Hooks()


def checkpointing(config: dict, root: Path) -> dict:
    """Tunix trainers' checkpoint options: every save_every steps, keep the newest few."""
    import orbax.checkpoint as ocp
    return dict(checkpoint_root_directory=str(root.resolve()),
                checkpointing_options=ocp.CheckpointManagerOptions(save_interval_steps=config["save_every"],
                                                                   max_to_keep=config["keep_checkpoints"]))


# The whole journey in one command: every block and every evaluation in a child process

def _watch_parent(parent: int) -> None:  # no child outlives its parent: once it is gone, stop as on SIGTERM
    while os.getppid() == parent:
        time.sleep(1)
    os.kill(os.getpid(), signal.SIGTERM)


def _call_and_send(conn, parent: int, fn, args, kwargs):
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    os.setpgid(0, 0)  # Ctrl-C in a terminal reaches the parent alone, which passes it on once
    setup_logging()
    try:
        result = ("ok", fn(*args, **kwargs))
    except (SystemExit, KeyboardInterrupt) as e:  # a refusal or a stop: one line, which the parent prints
        result = ("exit", getattr(e, "code", 130))
    except BaseException:  # our bug: its traceback is printed here, once
        result = ("exit", f"error: {getattr(fn, '__name__', fn)} failed (its traceback is above)")
        raise
    finally:
        with contextlib.suppress(OSError):  # the parent may be gone
            conn.send(result)


def in_child_process(fn, *args, **kwargs):
    """fn's result from a fresh process (five blocks outgrow 24 GB); a signal passes to it, then exits 128 + it."""
    import jax
    if jax.process_count() > 1:  # several hosts: run here (a child would need its own coordinator; TPUs stay taken)
        return fn(*args, **kwargs)
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_call_and_send, args=(send, os.getpid(), fn, args, kwargs))
    received = []
    previous = {s: signal.signal(s, lambda signum, _: (received.append(signum), child.pid and os.kill(child.pid, signum)))
                for s in StopRequest.SIGNALS}
    try:
        child.start()
        send.close()
        try:
            status, value = receive.recv()
        except EOFError:  # killed without a word (e.g. out of memory)
            status, value = "exit", f"error: {getattr(fn, '__name__', fn)} died; run the same command again to resume"
        child.join()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if received:
        print("interrupted; run the same command again to resume the journey", file=sys.stderr)
        sys.exit(128 + received[0])
    if status == "exit":
        sys.exit(value)
    return value
