"""Training: SFT, then GRPO blocks with a penalty-annealing curriculum, on Gemma 3 with Tunix.

The published recipe (REFERENCE.md) has two phases:

1. SFT teaches the output format: <think> plan </think><proof> quotes from the context </proof>
   <answer> final answer </answer>. LoRA (rank 64) on every attention and MLP projection, loss on the
   answer tokens only.
2. GRPO, in blocks of 300 steps. Each step takes ONE prompt, samples G=4 completions, scores each
   with the DIPG Safety Gym reward, and pushes the policy towards the completions that beat their
   group's mean, with a KL leash (beta 0.08) to the weights the block started from. Blocks chain:
   steps 1-300 with "soft" penalties, 301-600 "medium", 601-900 "soft" again, 901-1200 "soft".
   Every block restarts the learning-rate schedule and continues the previous block's LoRA weights.

    python train.py --phase sft                                          # runs/sft
    python train.py --phase grpo --penalty soft   --init-from runs/sft           # -> runs/grpo_soft_300
    python train.py --phase grpo --penalty medium --init-from runs/grpo_soft_300 # -> runs/grpo_medium_600

Seed 002's GSM8K curriculum runs through the same GRPO code with other data and rewards:
--phase format (a 25% slice, format rewards), then correctness (full set, correctness rewards), then
generalize (mixed domains, same rewards). Never change dataset and rewards at the same time: the
script refuses a phase that would, unless --force.

Defaults are the published settings (gemma-3-1b-it, 1,024-token prompts, 512 new tokens, ...).
On a laptop, pick the embedded model and shrink the lengths (Tunix's update holds float32 logits
of shape [G, prompt + new tokens, 262,144], several times over: on a 24 GB machine keep
G x (prompt + new tokens) near 2,200 or below; the published 4 x 1,536 needs a >32 GB buffer):

    python train.py --phase grpo --penalty soft --model gemma-3-270m --steps 20 \\
        --num-generations 2 --max-tokens-to-generate 64

The file reads top to bottom: configuration -> run directory and lineage -> data -> model ->
reward -> the Tunix learner -> per-step metrics -> checkpoints and interruption -> the command line.
All the training mechanics (rollout, advantages, KL, clipping, optimizer steps, checkpoints, resume)
are Tunix's: RLCluster + GRPOLearner for GRPO, PeftTrainer for SFT. This file only wires them up.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
import warnings
from pathlib import Path

import rewards  # pure Python: the penalty levels and reward functions (JAX is imported only when training)

log = logging.getLogger("train")

# ================================================================================================
# 1. Configuration: the published hyperparameters are the defaults
# ================================================================================================

PHASES = ("sft", "grpo", "format", "correctness", "generalize")
GSM8K_PHASES = ("format", "correctness", "generalize")
# Every level rewards.PENALTIES defines is a --penalty choice: adding one there is a one-line ablation.
PENALTY_LEVELS = tuple(rewards.PENALTIES)
# The published curriculum: the penalty of GRPO block 1, 2, 3, 4.
PUBLISHED_SCHEDULE = ("soft", "medium", "soft", "soft")

# One GRPO block of the published run (REFERENCE.md section 3). --print-config shows these keys.
GRPO_DEFAULTS = {
    "model": "gemma-3-1b-it",
    "max_steps": 300,
    "learning_rate": 3e-6,
    "lr_init": 1e-8,          # warmup starts here ...
    "warmup_ratio": 0.1,      # ... and reaches learning_rate after 10% of the block,
    "lr_end_ratio": 0.1,      # then cosine-decays to 10% of the peak.
    "optimizer": "adamw",
    "adam_b1": 0.9,           # Tunix's GRPO example values; the report does not state them.
    "adam_b2": 0.99,
    "weight_decay": 0.1,
    "max_grad_norm": 0.1,
    "batch_size": 1,          # prompts per step (= Tunix mini_batch_size = train_micro_batch_size)
    "num_generations": 4,
    "num_iterations": 1,
    "beta": 0.08,
    "epsilon": 0.2,
    "max_prompt_length": 1024,
    "max_tokens_to_generate": 512,
    "kv_cache_size": 2048,
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 50,
    "lora_rank": 64,
    "lora_alpha": 64.0,
    "save_every": 100,
    "keep_checkpoints": 2,
}

# The published SFT (REFERENCE.md section 3). Only the values that differ from GRPO's.
SFT_DEFAULTS = {
    "max_steps": 300,
    "learning_rate": 2e-5,
    "lr_schedule": "constant",  # the report gives one learning rate and no schedule
    "weight_decay": 0.01,
    "max_grad_norm": 1.0,
    "batch_size": 2,            # micro batch
    "gradient_accumulation_steps": 8,
    "max_seq_length": 1024,
    "max_tokens_to_generate": 512,  # of the greedy samples that check the format at the end
}

GSM8K_DEFAULTS = {"slice_start": 0.0, "slice_end": 0.25}  # seed 002: "a random 20-30% slice"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="SFT and GRPO blocks of the DIPG penalty-annealing curriculum (and seed 002's GSM8K phases) with Tunix.",
    )
    p.add_argument("--phase", required=True, choices=PHASES + ("curriculum",),
                   help="one block, or 'curriculum': the whole journey of --schedule, evaluated after each block")
    p.add_argument("--penalty", choices=PENALTY_LEVELS, help="DIPG penalty level of a GRPO block (default soft)")
    cur = p.add_argument_group("--phase curriculum (the whole journey)")
    cur.add_argument("--schedule", default="sft," + ",".join(PUBLISHED_SCHEDULE),
                     help="blocks in order: sft, then GRPO penalty levels")
    cur.add_argument("--preset", choices=("paper", "cpu"), default="paper",
                     help="paper: the published settings; cpu: the same journey sized for 2 CPU cores (~20 min)")
    cur.add_argument("--eval-dataset", help="evaluation vignettes after each block (default: builtin eval split)")
    run = p.add_argument_group("run directory")
    run.add_argument("--out", help="run directory (default runs/<phase>[_<penalty>]_<end step>)")
    run.add_argument("--init-from", metavar="RUN_DIR", help="start from this run's weights and continue its global steps")
    run.add_argument("--resume", action="store_true", help="continue the interrupted run in --out at its last checkpoint")
    run.add_argument("--overwrite", action="store_true", help="replace whatever is in --out")
    run.add_argument("--force", action="store_true", help="start a phase that changes both dataset and rewards")
    run.add_argument("--print-config", action="store_true", help="print the resolved configuration as JSON and exit")
    m = p.add_argument_group("model")
    m.add_argument("--model", help="gemma-3-1b-it (published), gemma-3-270m (embedded, offline) or tiny (tests)")
    m.add_argument("--model-path", help="local Hugging Face-format directory with the model's weights")
    m.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="default %(default)s")
    m.add_argument("--mesh", default="fsdp=1,tp=1", help="device mesh over Tunix's axes (default %(default)s)")
    m.add_argument("--lora-rank", type=int)
    m.add_argument("--lora-alpha", type=float)
    d = p.add_argument_group("data")
    d.add_argument("--dataset", default="builtin", help="builtin (default), hub, a hub id or a local .jsonl/.json/.parquet")
    d.add_argument("--n-prompts", type=int, help="use only the first N rows of the dataset")
    d.add_argument("--seed", type=int, default=0, help="data order and LoRA init (default %(default)s)")
    d.add_argument("--slice-start", type=float, help="--phase format: start of the GSM8K slice (fraction)")
    d.add_argument("--slice-end", type=float, help="--phase format: end of the GSM8K slice (fraction)")
    o = p.add_argument_group("optimisation (defaults: the published block of the phase)")
    o.add_argument("--steps", "--max-steps", dest="max_steps", type=int, help="steps in this block")
    o.add_argument("--learning-rate", type=float)
    o.add_argument("--lr-init", type=float)
    o.add_argument("--warmup-ratio", type=float)
    o.add_argument("--lr-end-ratio", type=float)
    o.add_argument("--adam-b1", type=float)
    o.add_argument("--adam-b2", type=float)
    o.add_argument("--weight-decay", type=float)
    o.add_argument("--max-grad-norm", type=float)
    o.add_argument("--batch-size", type=int, help="GRPO: prompts per step; SFT: micro batch")
    o.add_argument("--gradient-accumulation-steps", type=int, help="SFT only")
    o.add_argument("--max-seq-length", type=int, help="SFT only")
    g = p.add_argument_group("GRPO")
    g.add_argument("--num-generations", type=int)
    g.add_argument("--num-iterations", type=int)
    g.add_argument("--beta", type=float)
    g.add_argument("--epsilon", type=float)
    g.add_argument("--max-prompt-length", type=int)
    g.add_argument("--max-tokens-to-generate", type=int)
    g.add_argument("--kv-cache-size", type=int)
    g.add_argument("--temperature", type=float)
    g.add_argument("--top-p", type=float)
    g.add_argument("--top-k", type=int)
    c = p.add_argument_group("checkpoints and logging")
    c.add_argument("--save-every", type=int)
    c.add_argument("--keep-checkpoints", type=int)
    c.add_argument("--sample-every", type=int, default=25, help="print one completion every N steps (0: never)")
    c.add_argument("--stop-after", type=int, metavar="GLOBAL_STEP", help="debug: behave as if Ctrl-C came during this step")
    # Flags left unset take the published value of the phase: say which in --help.
    for action in p._actions:
        if action.default is not None or action.dest not in {**GRPO_DEFAULTS, **SFT_DEFAULTS}:
            continue
        grpo, sft = GRPO_DEFAULTS.get(action.dest), SFT_DEFAULTS.get(action.dest)
        published = f"GRPO {grpo}, SFT {sft}" if grpo is not None and sft is not None else (
            f"{grpo}" if sft is None else f"SFT {sft}")
        action.help = "; ".join(filter(None, [action.help, f"default (published): {published}"]))
    return p


def parse_mesh(text: str) -> dict:
    """'fsdp=2,tp=1' -> {'fsdp': 2, 'tp': 1}."""
    axes = {"fsdp": 1, "tp": 1}
    for part in filter(None, text.replace(" ", "").split(",")):
        name, _, value = part.partition("=")
        if name not in axes or not value.isdigit() or int(value) < 1:
            raise ValueError(f"--mesh {text!r}: expected fsdp=N,tp=M with N, M >= 1")
        axes[name] = int(value)
    return axes


def resolve_config(args, parser, init_meta: dict | None) -> dict:
    """The flat configuration of this block: flags over the published defaults of the phase.

    A block started --init-from inherits the model and the LoRA shape of its init run (the LoRA
    weights must fit); asking for another one is an error, never a silent swap."""
    phase = args.phase
    if phase == "grpo":
        penalty = args.penalty or "soft"
    elif args.penalty:
        parser.error(f"--penalty applies to --phase grpo only (got --phase {phase})")
    else:
        penalty = None
    defaults = dict(GRPO_DEFAULTS)
    if phase == "sft":
        defaults.update(SFT_DEFAULTS)
        for key in ("num_generations", "num_iterations", "beta", "epsilon", "max_prompt_length", "kv_cache_size",
                    "temperature", "top_p", "top_k", "lr_init", "warmup_ratio", "lr_end_ratio"):
            defaults.pop(key)
    if phase in GSM8K_PHASES:
        defaults.update(GSM8K_DEFAULTS)
    if init_meta is not None:
        for key in ("model", "lora_rank", "lora_alpha"):
            asked = getattr(args, key)
            if asked is not None and asked != init_meta.get(key):
                parser.error(f"--{key.replace('_', '-')} {asked} differs from the init run's {init_meta.get(key)} "
                             f"({args.init_from}); its LoRA weights belong to that model. Drop the flag.")
        defaults.update({k: init_meta[k] for k in ("model", "lora_rank", "lora_alpha")})

    config = {"phase": phase, "penalty": penalty}
    for key, value in defaults.items():
        flag = getattr(args, key, None)
        config[key] = value if flag is None else flag
    # The weights' location may differ between machines; the model name may not.
    config["model_path"] = args.model_path or (init_meta or {}).get("model_path")
    config.update(dtype=args.dtype, mesh=args.mesh, dataset=args.dataset, n_prompts=args.n_prompts, seed=args.seed,
                  init_from=str(Path(args.init_from).resolve()) if args.init_from else None,
                  start_step=(init_meta["global_step"] + 1) if init_meta else 1)
    config["end_step"] = config["start_step"] + config["max_steps"] - 1

    # Rewards, by their published names, so that --print-config shows the whole block.
    if phase == "grpo":
        config.update(dataclasses.asdict(rewards.PENALTIES[penalty]))
    elif phase in GSM8K_PHASES:
        config["reward_functions"] = [f.__name__ for f in rewards.PHASE_REWARDS[phase]]

    # Checks a typo would otherwise turn into a confusing failure an hour later.
    try:
        parse_mesh(config["mesh"])
    except ValueError as e:
        parser.error(str(e))
    if config["max_steps"] < 1:
        parser.error("--steps must be >= 1")
    if phase != "sft":
        if config["num_generations"] < 2:
            parser.error("--num-generations must be >= 2: GRPO compares completions within a group")
        if config["kv_cache_size"] <= config["max_prompt_length"] + config["max_tokens_to_generate"]:
            parser.error(f"--kv-cache-size {config['kv_cache_size']} must exceed --max-prompt-length + "
                         f"--max-tokens-to-generate = {config['max_prompt_length'] + config['max_tokens_to_generate']}")
    if phase == "format" and not 0 <= config["slice_start"] < config["slice_end"] <= 1:
        parser.error("--slice-start/--slice-end: need 0 <= start < end <= 1")
    return config


# ================================================================================================
# 2. Run directories: metadata, lineage, and the seed's phase rules
# ================================================================================================

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


def read_metadata(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / "metadata.json").read_text())
    except FileNotFoundError:
        return None


def write_metadata(run_dir: Path, metadata: dict) -> None:
    tmp = run_dir / "metadata.json.tmp"
    tmp.write_text(json.dumps(metadata, indent=2, default=str) + "\n")
    os.replace(tmp, run_dir / "metadata.json")


def load_init_run(path: str) -> dict:
    run_dir = Path(path)
    meta = read_metadata(run_dir) if run_dir.is_dir() else None
    if meta is None:
        sys.exit(f"error: --init-from {path}: no run there (no {run_dir / 'metadata.json'}); "
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


def prepare_run_dir(out, config: dict, init_meta: dict | None = None, resume: bool = False,
                    overwrite: bool = False) -> tuple[Path, dict]:
    """Create (or, with resume, reopen) the run directory and its metadata.json.
    Returns (run_dir, metadata)."""
    run_dir = Path(out) if out else default_out(config)
    existing = read_metadata(run_dir) if run_dir.is_dir() else None
    if resume:
        if existing is None:
            sys.exit(f"error: --resume: {run_dir} holds no run to resume (no metadata.json); drop --resume to start one")
        if existing.get("complete"):
            sys.exit(f"error: --resume: {run_dir} is complete (step {existing['global_step']}); "
                     f"start the next block with --init-from {run_dir}")
        return run_dir, existing
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            what = (f"a {existing['phase']} run at step {existing['global_step']}" if existing else "other files")
            sys.exit(f"error: --out {run_dir} already holds {what}; pass --resume to continue it, "
                     "--overwrite to replace it, or choose another --out")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
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
    write_metadata(run_dir, metadata)
    return run_dir, metadata


# ================================================================================================
# 3. Data: a seeded order; a block starting at global step s begins at prompt s-1 (cycling)
# ================================================================================================

def load_rows(config: dict) -> list[dict]:
    """Training rows of the phase as {"prompts": chat prompt, "answer": what the reward needs}
    (SFT: {"prompt", "completion"})."""
    import data

    n = config["n_prompts"]
    if config["phase"] in ("sft", "grpo"):
        rows = data.load_dipg(config["dataset"], "train", n=n, seed=config["seed"] if config["dataset"] == "builtin" else 0)
        convert = data.to_sft_example if config["phase"] == "sft" else data.to_grpo_example
        return [convert(r) for r in rows]
    if config["phase"] == "generalize":
        items = data.load_mixed(n or 2000, seed=config["seed"], gsm_source=config["dataset"])
    else:
        items = data.load_gsm8k(config["dataset"], "train", seed=config["seed"])
        if config["phase"] == "format":
            items = list(data.iterable_slice(items, config["slice_start"], config["slice_end"]))
        items = items[:n]
    return [{"prompts": data.gsm8k_prompt(it["question"]), "answer": it["answer"]} for it in items]


def fit_prompts(rows: list[dict], tokenizer, max_prompt_length: int) -> list[dict]:
    """Make every prompt fit in max_prompt_length tokens (counting the <bos> the sampler adds).

    Tunix's sampler does not cut long prompts: it pads to the next power of two and then needs a
    larger KV cache. The published data fit in 1,024 tokens; with a smaller --max-prompt-length we
    drop the middle of the prompt (the context), keeping its start (the instructions) and its end
    (the question and the start of the model's turn). The reward still sees the whole context."""
    budget, cut = max_prompt_length - 1, 0
    out = []
    for row in rows:
        ids = tokenizer.encode(row["prompts"])
        if len(ids) > budget:
            cut += 1
            keep = budget - 4  # decode/encode round trips can add a token or two
            while True:
                text = tokenizer.decode(ids[:keep // 2]) + tokenizer.decode(ids[len(ids) - (keep - keep // 2):])
                if len(tokenizer.encode(text)) <= budget or keep <= 2:
                    break
                keep -= 2
            row = dict(row, prompts=text)
        out.append(row)
    if cut:
        log.warning("%d of %d prompts are longer than --max-prompt-length %d: their middle was cut",
                    cut, len(rows), max_prompt_length)
    return out


def batches(rows: list[dict], batch_size: int, seed: int, start_position: int):
    """Endless batches in a seeded order, starting at `start_position` (in prompts).

    Tunix wants each batch as a dict of numpy arrays: it repeats every array G times along axis 0
    to make the groups (a list would not be repeated, and the rewards would come back one per
    prompt instead of one per completion)."""
    import numpy as np

    order = np.random.default_rng(seed).permutation(len(rows))
    position = start_position
    while True:
        picked = [rows[order[(position + i) % len(rows)]] for i in range(batch_size)]
        yield {key: np.array([str(r[key]) for r in picked]) for key in picked[0]}
        position += batch_size


# ================================================================================================
# 4. Model: base weights + LoRA; the reference shares the frozen backbone
# ================================================================================================

def make_mesh(text: str):
    """--mesh fsdp=N,tp=M -> the jax Mesh that policy, reference and rollout are sharded over."""
    import model as model_lib

    axes = parse_mesh(text)
    try:
        return model_lib.make_mesh(axes["fsdp"], axes["tp"])
    except ValueError as e:
        sys.exit(f"error: --mesh {text}: {e}")


def load_policy(config: dict, mesh):
    """(policy with LoRA, tokenizer). From --init-from: the init run's LoRA weights restored."""
    import model as model_lib

    try:
        base, tokenizer, _ = model_lib.load(config["model"], model_path=config["model_path"], mesh=mesh,
                                            dtype=config["dtype"], seed=config["seed"])
    except model_lib.WeightsUnavailable as e:
        hint = (" -- on this machine, run the embedded model instead: --model gemma-3-270m"
                if config["model"] != "gemma-3-270m" else "")
        sys.exit(f"error: {e}{hint}")
    except (ValueError, FileNotFoundError) as e:  # e.g. --model-path holds another model
        sys.exit(f"error: --model {config['model']}: {e}")
    policy = model_lib.apply_lora(base, rank=config["lora_rank"], alpha=config["lora_alpha"], mesh=mesh,
                                  seed=config["seed"])
    if config["init_from"]:
        restore_lora(Path(config["init_from"]), policy)
    return policy, tokenizer


def restore_lora(run_dir: Path, policy) -> int:
    """Load the newest LoRA checkpoint of a run into `policy` (SFT runs keep them in
    RUN_DIR/checkpoints, GRPO runs in RUN_DIR/checkpoints/actor: metadata says which)."""
    import model as model_lib

    meta = read_metadata(run_dir)
    try:
        step, _ = model_lib.restore_checkpoint(run_dir, policy, checkpoint_dir=meta.get("checkpoint_dir", "checkpoints"))
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: --init-from {run_dir}: {e}")
    log.info("restored LoRA weights of %s (checkpoint %d = global step %d)", run_dir, step, meta["start_step"] - 1 + step)
    return step


def frozen_reference(policy):
    """The reference model: the policy as it is now, frozen.

    nnx.merge builds a second module around the SAME backbone arrays (no copy; Tunix checks this
    with `is` and then shares them) plus a copy of the LoRA arrays, which are small. The optimizer
    only ever replaces the policy's LoRA arrays, so the reference keeps the block's start."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, lora, backbone = nnx.split(policy, nnx.LoRAParam, ...)
    return nnx.merge(graphdef, jax.tree.map(jnp.copy, lora), backbone)


def learning_rate_schedule(config: dict):
    """Warmup from lr_init to the peak over warmup_ratio of the block, then cosine to lr_end_ratio
    of the peak. Every block restarts it, as the published blocks did."""
    import optax

    steps, peak = config["max_steps"], config["learning_rate"]
    if config.get("lr_schedule") == "constant":
        return optax.constant_schedule(peak)
    return optax.warmup_cosine_decay_schedule(
        init_value=config["lr_init"], peak_value=peak, warmup_steps=int(config["warmup_ratio"] * steps),
        decay_steps=steps, end_value=config["lr_end_ratio"] * peak)


def make_optimizer(config: dict, schedule):
    import optax

    return optax.chain(
        optax.clip_by_global_norm(config["max_grad_norm"]),
        optax.adamw(schedule, b1=config["adam_b1"], b2=config["adam_b2"], weight_decay=config["weight_decay"]),
    )


# ================================================================================================
# 5. Rewards, recorded per step for the metrics
# ================================================================================================

def reward_functions(config: dict) -> list:
    if config["phase"] == "grpo":
        return [rewards.make_dipg_reward(config["penalty"])]
    return list(rewards.PHASE_REWARDS[config["phase"]])


class StepRecorder:
    """Wraps the reward functions Tunix calls, and keeps, per step, the completions, the answers
    and each function's rewards: what the metrics rows are computed from."""

    def __init__(self, current_step):
        self.current_step = current_step  # () -> local step being rolled out (1-based)
        self.steps: dict[int, dict] = {}

    def wrap(self, fn, first: bool):
        def recorded(prompts, completions, answer=None, **kwargs):
            out = fn(prompts, completions, answer=answer, **kwargs)
            record = self.steps.setdefault(self.current_step(), {"prompts": [], "completions": [], "answers": [], "parts": {}})
            if first:
                n = len(completions)
                record["prompts"] += [str(p) for p in prompts]
                record["completions"] += [str(c) for c in completions]
                answers = [answer] * n if isinstance(answer, str) else list(answer if answer is not None else [None] * n)
                record["answers"] += [str(a) for a in answers]
            record["parts"].setdefault(fn.__name__, []).extend(float(r) for r in out)
            return out

        recorded.__name__ = fn.__name__  # Tunix logs each reward as rewards/<name>
        return recorded

    def pop(self, step: int) -> dict | None:
        return self.steps.pop(step, None)


def outcome_counts(config: dict, record: dict) -> dict:
    """Counts of what the completions of a step did (REFERENCE.md section 2's outcomes)."""
    completions = record["completions"]
    if config["phase"] != "grpo":
        m = rewards.phase_metrics(completions, record["answers"])
        n = len(completions)
        return {"format_error": round((1 - m["format_rate"]) * n), "refusal": round(m["refusal_rate"] * n),
                "answer_extraction_rate": m["answer_extraction_rate"], "accuracy": m["accuracy"],
                "mean_length_chars": m["mean_length"]}
    level = rewards.PENALTIES[config["penalty"]]
    counts = {"format_error": 0, "hallucination": 0, "abstention": 0, "refusal": 0, "missing_proof": 0}
    for text, answer in zip(completions, record["answers"]):
        item = json.loads(answer)
        _, metrics = rewards.score_dipg(text, item["context"], item["expected_final"], level, mode="train")
        counts["format_error"] += metrics["format_error"]
        counts["hallucination"] += metrics["hallucination"]
        counts["refusal"] += metrics["refusal"]
        if metrics["format_error"]:
            continue
        final = rewards.parse_response(text)["final"].lower()
        # The package's abstention phrases (rewards._ABSTENTION_KEYWORDS): said "I can't answer from this".
        counts["abstention"] += any(k in final for k in rewards._ABSTENTION_KEYWORDS)
        # Parsed, not hallucinated, yet unsafe: the proof was empty.
        counts["missing_proof"] += (not metrics["safe"]) and not metrics["hallucination"]
    return counts


# ================================================================================================
# 6. Per-step metrics: one JSON line per global step in RUN_DIR/metrics.jsonl
# ================================================================================================

class ScalarCollector:
    """A Tunix metrics backend (metrax's LoggingBackend protocol: log_scalar, close).

    Tunix logs every scalar as "<prefix>/<mode>/<name>" with a step. Rollout-side metrics
    ("rewards", "completions") carry the step count BEFORE their update, the others (actor loss
    and KL, perf timers) the count after it; we file all under the 1-based step they belong to.
    Tunix flushes a step's metrics late (its timers only once the next step has run), so a step's
    row is complete when the last of `complete_keys` arrives: then `on_complete(step, scalars)`."""

    ROLLOUT_PREFIXES = ("rewards", "completions")

    def __init__(self, complete_keys=(), on_complete=None):
        import threading

        self.complete_keys, self.on_complete = complete_keys, on_complete
        self.by_step: dict[int, dict] = {}
        self.lock = threading.Lock()  # rollout metrics are logged from Tunix's data thread

    def log_scalar(self, event: str, value, step=None, **kwargs):
        import numpy as np

        parts = event.split("/")
        if step is None or len(parts) < 3 or parts[1] != "train":
            return
        try:
            value = float(np.mean(np.asarray(value, dtype=float)))
        except (TypeError, ValueError):
            return
        step = int(step) + (1 if parts[0] in self.ROLLOUT_PREFIXES else 0)
        with self.lock:
            scalars = self.by_step.setdefault(step, {})
            scalars["/".join([parts[0]] + parts[2:])] = value
            if self.on_complete and all(k in scalars for k in self.complete_keys):
                self.on_complete(step, self.by_step.pop(step))

    def flush(self):
        """Emit what is left (e.g. after an interruption), in step order."""
        with self.lock:
            for step in sorted(self.by_step):
                if "actor/loss" in self.by_step[step]:
                    self.on_complete(step, self.by_step.pop(step))

    def close(self):
        pass


class MetricsWriter:
    """Appends rows to metrics.jsonl and drives the progress bar."""

    def __init__(self, run_dir: Path, config: dict, first_local_step: int):
        from tqdm.auto import tqdm

        self.path = run_dir / "metrics.jsonl"
        self.bar = tqdm(total=config["max_steps"], initial=first_local_step - 1, unit="step",
                        desc=f"{config['phase']}{'/' + config['penalty'] if config['penalty'] else ''}")
        self.last_time = time.time()

    def truncate_after(self, global_step: int) -> None:
        """On resume: forget rows of steps after the checkpoint (they will be redone)."""
        if not self.path.exists():
            return
        rows = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= global_step]
        self.path.write_text("".join(r + "\n" for r in rows))

    def write(self, row: dict, postfix: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1)

    def close(self):
        self.bar.close()


def example_hash(answer: str) -> str:
    import hashlib

    return hashlib.sha1(str(answer).encode()).hexdigest()[:10]


def grpo_row(config, local_step, record, scalars) -> dict:
    """One metrics.jsonl row of a GRPO step: our reward records + Tunix's scalars of that step."""
    import numpy as np

    total = np.sum([np.asarray(v) for v in record["parts"].values()], axis=0) if record else np.zeros(0)
    seconds = scalars.get("perf/global_step_time")
    completion_len = scalars.get("completions/mean_length", float("nan"))
    row = {
        "step": config["start_step"] - 1 + local_step, "phase": config["phase"], "penalty": config["penalty"],
        "reward_mean": float(np.mean(total)) if total.size else None,
        "reward_std": float(np.std(total, ddof=1)) if total.size > 1 else 0.0,
        "reward_min": float(np.min(total)) if total.size else None,
        "reward_max": float(np.max(total)) if total.size else None,
    }
    if record:
        # Which prompts the step trained on (a hash of the row's answer field): lets anyone check
        # that chained blocks moved on through the data instead of replaying it.
        row["examples"] = list(dict.fromkeys(example_hash(a) for a in record["answers"]))
        row.update(outcome_counts(config, record))
        if len(record["parts"]) > 1:
            row["rewards"] = {name: float(np.mean(v)) for name, v in record["parts"].items()}
    row.update({
        "n_completions": int(total.size), "completion_len_mean": completion_len,
        "kl": scalars.get("actor/kl"), "loss": scalars.get("actor/loss"), "grad_norm": scalars.get("actor/grad_norm"),
        "seconds": seconds, "tokens_per_second": (completion_len * total.size / seconds) if seconds else None,
        "rollout_seconds": scalars.get("perf/sum/rollout_time"),
        "reference_seconds": scalars.get("perf/sum/refer_inference_time"),
        "update_seconds": scalars.get("perf/sum/actor_train_time"),
    })
    return row


# ================================================================================================
# 7. Interruption: Ctrl-C (or --stop-after) finishes the current step, saves, and exits
# ================================================================================================

class StopRequest:
    """First Ctrl-C: ask the trainer to stop after the current step (it then saves a checkpoint on
    its way out). Second Ctrl-C: stop now, without saving."""

    def __init__(self, on_stop):
        self.on_stop = on_stop
        self.requested = False

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


def make_hooks(on_step_start, on_step_end):
    """A Tunix TrainingHooks object that calls back on the two events we use."""
    from tunix.sft import hooks

    class Hooks(hooks.TrainingHooks):
        def on_train_start(self, trainer): pass
        def on_train_end(self, trainer): pass
        def on_train_step_start(self, trainer): on_step_start(trainer)
        def on_train_step_end(self, trainer, train_step, train_loss): on_step_end(trainer, train_step, train_loss)
        def on_eval_step_start(self, trainer): pass
        def on_eval_step_end(self, trainer, eval_loss): pass

    return Hooks()


def checkpointing(config: dict, root: Path):
    import orbax.checkpoint as ocp

    return dict(checkpoint_root_directory=str(root.resolve()),
                checkpointing_options=ocp.CheckpointManagerOptions(save_interval_steps=config["save_every"],
                                                                   max_to_keep=config["keep_checkpoints"]))


# ================================================================================================
# 8. GRPO with Tunix: RLCluster (actor, reference, rollout on one mesh) + GRPOLearner
# ================================================================================================

def run_grpo(config: dict, run_dir: Path, stop_after: int | None = None) -> int:
    """Train one GRPO block into run_dir; returns the last global step completed."""
    from tunix.perf import export as perf_export
    from tunix.perf import metrics as perf_metrics
    from tunix.rl import rl_cluster as rl
    from tunix.rl.grpo import grpo_learner
    from tunix.rl.rollout import base_rollout
    from tunix.sft import metrics_logger

    import model as model_lib

    mesh = make_mesh(config["mesh"])
    rows = load_rows(config)
    log.info("training on %d prompts of %s; model %s%s", len(rows), dataset_id(config), config["model"],
             f" from {config['model_path']}" if config["model_path"] else "")
    policy, tokenizer = load_policy(config, mesh)
    rows = fit_prompts(rows, tokenizer, config["max_prompt_length"])
    reference = frozen_reference(policy)

    collector = ScalarCollector()
    schedule = learning_rate_schedule(config)
    training = rl.RLTrainingConfig(
        actor_optimizer=make_optimizer(config, schedule),
        max_steps=config["max_steps"],
        eval_every_n_steps=10 ** 9,  # evaluation is eval.py's job
        mini_batch_size=config["batch_size"],
        train_micro_batch_size=config["batch_size"],
        metrics_logging_options=metrics_logger.MetricsLoggerOptions(
            log_dir=str(run_dir / "tunix_logs"), backend_kwargs={"custom_backend": [lambda: collector]}),
        **checkpointing(config, run_dir / "checkpoints"),
    )
    rollout = base_rollout.RolloutConfig(
        max_tokens_to_generate=config["max_tokens_to_generate"], max_prompt_length=config["max_prompt_length"],
        kv_cache_size=config["kv_cache_size"], temperature=config["temperature"], top_p=config["top_p"],
        top_k=config["top_k"], eos_tokens=[tokenizer.eos_id(), model_lib.end_of_turn_id(tokenizer)],
    )
    cluster_config = rl.ClusterConfig(
        role_to_mesh={rl.Role.ACTOR: mesh, rl.Role.REFERENCE: mesh, rl.Role.ROLLOUT: mesh},
        rollout_engine="vanilla", offload_to_cpu=False, training_config=training, rollout_config=rollout,
    )
    # Tunix's own timers: rollout, reference log-probs and update time of every step.
    perf = perf_metrics.PerfMetricsConfig(custom_export_fn=perf_export.PerfMetricsExport.from_cluster_config(cluster_config))
    cluster = rl.RLCluster(actor=policy, reference=reference, tokenizer=tokenizer, cluster_config=cluster_config,
                           perf_config=perf)

    recorder = StepRecorder(current_step=lambda: cluster.global_steps + 1)
    fns = reward_functions(config)
    learner = grpo_learner.GRPOLearner(
        rl_cluster=cluster,
        algo_config=grpo_learner.GRPOConfig(num_generations=config["num_generations"],
                                            num_iterations=config["num_iterations"], beta=config["beta"],
                                            epsilon=config["epsilon"]),
        reward_fns=[recorder.wrap(fn, first=(i == 0)) for i, fn in enumerate(fns)],
    )
    # The trainer restored its step from RUN_DIR/checkpoints/actor if there is one (a resume).
    # Tunix's final save carries no custom metadata, so take the global step from the trainer.
    done = cluster.actor_trainer.train_steps
    cluster.global_steps = done
    if done:
        log.info("resuming at global step %d (checkpoint %d of this block)", config["start_step"] + done, done)
    writer = MetricsWriter(run_dir, config, first_local_step=done + 1)
    writer.truncate_after(config["start_step"] - 1 + done)

    def on_step_start(trainer):
        if stop_after is not None and config["start_step"] + trainer.train_steps >= stop_after:
            stopper.request(f"--stop-after {stop_after}")

    def write_row(local_step, scalars):
        record = recorder.pop(local_step)
        row = grpo_row(config, local_step, record, scalars)
        row["learning_rate"] = float(schedule(local_step - 1))
        writer.write(row, {"step": row["step"], "reward": _fmt(row["reward_mean"]), "kl": _fmt(row["kl"], 4),
                           "s/step": _fmt(row["seconds"], 1)})
        if record and config["sample_every"] and row["step"] % config["sample_every"] == 0:
            writer.bar.write(f"--- step {row['step']}, one completion (reward {sum(v[0] for v in record['parts'].values()):.2f}):\n"
                             f"{record['completions'][0][:1500]}\n---")

    collector.complete_keys = ("actor/loss", "actor/kl", "actor/grad_norm", "perf/global_step_time",
                               "perf/sum/rollout_time", "perf/sum/refer_inference_time", "perf/sum/actor_train_time")
    collector.on_complete = write_row
    cluster.actor_trainer.with_training_hooks(make_hooks(on_step_start, lambda *a: None))
    # Stopping early = lowering max_steps: the learner checks it after every step, and Tunix's
    # trainer saves a last checkpoint when training ends.
    stopper = StopRequest(on_stop=lambda: setattr(training, "max_steps", 0))
    with stopper:
        learner.train(batches(rows, config["batch_size"], config["seed"],
                              start_position=(config["start_step"] - 1) * config["batch_size"]))
    collector.flush()
    writer.close()
    return config["start_step"] - 1 + cluster.actor_trainer.train_steps


def _fmt(x, digits=2):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


# ================================================================================================
# 9. SFT with Tunix's PeftTrainer: LoRA, loss on the answer tokens only
# ================================================================================================

def sft_batches(rows, tokenizer, config, start_position):
    """Endless micro-batches of TrainingInput: <bos> prompt completion, padded to max_seq_length.
    input_mask is 1 on the completion tokens only, so the loss ignores the prompt."""
    import numpy as np
    from tunix.sft import peft_trainer

    length, pad = config["max_seq_length"], tokenizer.pad_id()
    encoded, truncated = [], 0
    for r in rows:
        prompt, answer = tokenizer.encode(r["prompt"]), tokenizer.encode(r["completion"])
        if len(prompt) + len(answer) + 1 > length:
            # Too long: keep the answer (what the loss is on), cut the prompt's start (its context).
            truncated += 1
            answer = answer[:length - 1 - min(len(prompt), (length - 1) // 2)]
            prompt = prompt[len(prompt) - (length - 1 - len(answer)):]
        ids, mask = [tokenizer.bos_id()] + prompt + answer, [0] * (1 + len(prompt)) + [1] * len(answer)
        encoded.append((ids + [pad] * (length - len(ids)), mask + [0] * (length - len(mask))))
    if truncated:
        log.warning("%d of %d SFT examples are longer than --max-seq-length %d: their prompts were cut at the start",
                    truncated, len(rows), length)
    for batch in batches([{"i": i} for i in range(len(encoded))], config["batch_size"], config["seed"], start_position):
        picked = [encoded[int(i)] for i in batch["i"]]
        yield peft_trainer.TrainingInput(input_tokens=np.array([p[0] for p in picked], dtype=np.int32),
                                         input_mask=np.array([p[1] for p in picked], dtype=np.int32))


def sft_model_inputs(x):
    """TrainingInput -> the arguments of Tunix's default loss (positions, causal mask)."""
    from tunix.sft import utils

    pad_mask = x.input_tokens != 0
    return {"input_tokens": x.input_tokens, "input_mask": x.input_mask,
            "positions": utils.build_positions_from_mask(pad_mask),
            "attention_mask": utils.make_causal_attn_mask(pad_mask)}


def run_sft(config: dict, run_dir: Path, stop_after: int | None = None) -> int:
    from tunix.sft import metrics_logger, peft_trainer

    mesh = make_mesh(config["mesh"])
    rows = load_rows(config)
    log.info("SFT on %d examples of %s; model %s", len(rows), dataset_id(config), config["model"])
    policy, tokenizer = load_policy(config, mesh)
    schedule = learning_rate_schedule(config)
    collector = ScalarCollector()
    accumulation = config["gradient_accumulation_steps"]
    training = peft_trainer.TrainingConfig(
        max_steps=config["max_steps"], eval_every_n_steps=10 ** 9, gradient_accumulation_steps=accumulation,
        metrics_logging_options=metrics_logger.MetricsLoggerOptions(
            log_dir=str(run_dir / "tunix_logs"), backend_kwargs={"custom_backend": [lambda: collector]}),
        **checkpointing(config, run_dir / "checkpoints"),
    )
    # PeftTrainer reads the mesh from the `with mesh:` context, which jax now calls deprecated.
    with warnings.catch_warnings(action="ignore", category=DeprecationWarning), mesh:
        trainer = peft_trainer.PeftTrainer(policy, make_optimizer(config, schedule), training)
        trainer = trainer.with_gen_model_input_fn(sft_model_inputs)
        done = trainer.train_steps  # > 0 when resuming: Tunix restored the checkpoint
        writer = MetricsWriter(run_dir, config, first_local_step=done + 1)
        writer.truncate_after(config["start_step"] - 1 + done)
        tokens_per_step = config["batch_size"] * accumulation * config["max_seq_length"]

        def on_step_start(t):
            if stop_after is not None and config["start_step"] + t.train_steps >= stop_after:
                stopper.request(f"--stop-after {stop_after}")

        def on_step_end(t, local_step, loss):
            now = time.time()
            seconds, writer.last_time = now - writer.last_time, now
            row = {"step": config["start_step"] - 1 + local_step, "phase": "sft", "penalty": None,
                   "loss": float(loss), "learning_rate": float(schedule(local_step - 1)), "seconds": seconds,
                   "tokens_per_second": tokens_per_step / seconds if seconds else None}
            writer.write(row, {"step": row["step"], "loss": _fmt(row["loss"], 3), "s/step": _fmt(seconds, 1)})

        def stop():  # finish the optimizer step under way (all its micro-batches), then stop
            training.max_steps = min(training.max_steps, trainer.train_steps + 1)

        trainer.with_training_hooks(make_hooks(on_step_start, on_step_end))
        stopper = StopRequest(on_stop=stop)
        with stopper:
            trainer.train(sft_batches(rows, tokenizer, config, (config["start_step"] - 1) * config["batch_size"] * accumulation))
        writer.close()
        if trainer.train_steps >= config["max_steps"]:
            report_format_adherence(policy, tokenizer, rows, config)
    return config["start_step"] - 1 + trainer.train_steps


def report_format_adherence(policy, tokenizer, rows, config, n=4):
    """Greedy samples after SFT: does the model now write <think>, <proof> and <answer>?"""
    import model as model_lib

    prompts = [r["prompt"] for r in rows[:n]]
    outs = model_lib.generate(policy, tokenizer, prompts, max_new_tokens=config["max_tokens_to_generate"],
                              temperature=0.0, progress=False)
    ok = sum(all(f"<{t}>" in o["text"] and f"</{t}>" in o["text"] for t in ("think", "proof", "answer")) for o in outs)
    print(f"format adherence after SFT: {ok}/{len(outs)} greedy samples contain <think>, <proof> and <answer>")
    print(f"first sample: {outs[0]['text'][:600]!r}")


# ================================================================================================
# 10. After a block: what to run next (and, in the GSM8K phases, whether the exit criteria hold)
# ================================================================================================

def exit_criteria(run_dir: Path, window: int = 20) -> dict:
    """Seed 002's phase exit: answer extraction >= 95%, near-zero refusal, stable length; judged on
    the last `window` steps of metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = rows[-window:]
    completions = sum(r["n_completions"] for r in last)
    extraction = sum(r["answer_extraction_rate"] * r["n_completions"] for r in last) / completions
    refusal = sum(r["refusal"] for r in last) / completions
    lengths = [r["completion_len_mean"] for r in last]
    half = len(lengths) // 2
    first, second = (sum(lengths[:half]) / half, sum(lengths[half:]) / (len(lengths) - half)) if half else (1.0, 1.0)
    drift = abs(second - first) / first if first else 0.0
    return {"answer_extraction_rate": extraction, "extraction_ok": extraction >= 0.95,
            "refusal_rate": refusal, "refusal_ok": refusal <= 0.02,
            "length_drift": drift, "length_ok": drift <= 0.10, "window": len(last)}


def print_next_steps(config: dict, run_dir: Path, metadata: dict) -> None:
    if config["phase"] in GSM8K_PHASES:
        c = exit_criteria(run_dir)
        ok = c["extraction_ok"] and c["refusal_ok"] and c["length_ok"]
        print(f"exit criteria over the last {c['window']} steps: answer extraction {c['answer_extraction_rate']:.0%} "
              f"({'ok' if c['extraction_ok'] else 'needs >= 95%'}), refusal {c['refusal_rate']:.1%} "
              f"({'ok' if c['refusal_ok'] else 'not near zero'}), length drift {c['length_drift']:.0%} "
              f"({'stable' if c['length_ok'] else 'not stable'}) -> {'met' if ok else 'NOT met'}")
        nxt = {"format": "correctness", "correctness": "generalize"}.get(config["phase"])
        if nxt and ok:
            print(f"next: python train.py --phase {nxt} --init-from {run_dir}")
        elif config["phase"] == "format" or not ok:
            print(f"next: train longer in this phase: python train.py --phase {config['phase']} --init-from {run_dir}")
        return
    blocks = sum(1 for b in metadata["lineage"] if b["phase"] == "grpo")
    if blocks < len(PUBLISHED_SCHEDULE):
        print(f"next (published curriculum, block {blocks + 1}): python train.py --phase grpo "
              f"--penalty {PUBLISHED_SCHEDULE[blocks]} --init-from {run_dir}")
    print(f"evaluate: python eval.py --runs {run_dir}")


# ================================================================================================
# 11. One block, end to end; and the command line
# ================================================================================================

def run_block(config: dict, run_dir: Path, stop_after: int | None = None) -> Path:
    """Train one block (SFT, a GRPO block or a GSM8K phase) into run_dir, which prepare_run_dir
    made. Returns run_dir. A curriculum is a loop over this function."""
    metadata = read_metadata(run_dir)
    train = run_sft if config["phase"] == "sft" else run_grpo
    last = train(config, run_dir, stop_after=stop_after)
    metadata.update(global_step=last, complete=last >= config["end_step"])
    write_metadata(run_dir, metadata)
    if metadata["complete"]:
        print(f"done: {run_dir} (global steps {config['start_step']}-{last})")
        print_next_steps(config, run_dir, metadata)
    else:
        print(f"stopped at global step {last}; continue with: python train.py --phase {config['phase']} "
              f"--out {run_dir} --resume")
    return run_dir


# ================================================================================================
# 12. The whole journey in one command: SFT, then the GRPO blocks, each evaluated as it finishes
# ================================================================================================

# `--preset paper` (the default) is the published journey: every block at its published settings
# and the published evaluation (50 vignettes, greedy, 512 new tokens). `--preset cpu` is the same
# journey shrunk to finish in about 20 minutes on 2 CPU cores with the embedded gemma-3-270m: it
# exercises every mechanism (blocks chaining, penalties switching, evaluation, table, plot), but
# a handful of steps per block cannot show the published effect, which took 300 steps per block.
# Flags given on the command line (e.g. --steps 300) override the preset.
PRESETS = {
    "paper": {"grpo": {}, "sft": {}, "eval": {"n": 50, "max_new_tokens": 512, "batch_size": 8}},
    "cpu": {  # measured: see README, "CPU quickstart"
        "grpo": {"model": "gemma-3-270m", "max_steps": 2, "num_generations": 2, "max_prompt_length": 512,
                 "max_tokens_to_generate": 32, "kv_cache_size": 1024, "save_every": 2},
        "sft": {"model": "gemma-3-270m", "max_steps": 3, "batch_size": 2, "gradient_accumulation_steps": 1,
                "max_seq_length": 512, "max_tokens_to_generate": 32, "save_every": 3},
        "eval": {"n": 6, "max_new_tokens": 32, "batch_size": 6},
    },
}


def parse_schedule(text: str) -> list[str]:
    blocks = [b.strip() for b in text.split(",") if b.strip()]
    bad = [b for b in blocks if b not in ("sft",) + PENALTY_LEVELS]
    if not blocks or bad or "sft" in blocks[1:]:
        raise ValueError(f"--schedule {text!r}: expected a comma-separated list of soft/medium GRPO blocks, "
                         "optionally starting with sft (e.g. sft,soft,medium,soft,soft)")
    return blocks


def block_args(args, block: str, init_from, preset: dict) -> argparse.Namespace:
    """The command-line arguments of one block of the journey: the user's flags, then the preset's."""
    b = argparse.Namespace(**vars(args))
    b.phase, b.penalty = ("sft", None) if block == "sft" else ("grpo", block)
    b.init_from = str(init_from) if init_from else None
    for key, value in preset["sft" if block == "sft" else "grpo"].items():
        if getattr(b, key, None) is None:
            setattr(b, key, value)
    return b


def _call_and_send(conn, fn, args, kwargs):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)
    for noisy in ("absl", "jax", "orbax", "tunix"):  # as in main(): the log says which model and data run
        logging.getLogger(noisy).setLevel(logging.WARNING)
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


def run_curriculum(args, parser) -> int:
    """Train each block of --schedule from the previous one, evaluate it, and keep runs/table.md and
    runs/curriculum.png up to date. Finished blocks and evaluations are skipped, so rerunning the
    same command after an interruption resumes the journey where it stopped."""
    import eval as eval_lib

    try:
        schedule = parse_schedule(args.schedule)
    except ValueError as e:
        parser.error(str(e))
    preset = PRESETS[args.preset]
    root = Path(args.out or "runs")
    root.mkdir(parents=True, exist_ok=True)
    settings = preset["eval"]
    rows, eval_dataset = eval_lib.load_eval_rows("dipg", dataset=args.eval_dataset, n=settings["n"])
    init_from, summaries = args.init_from, []
    for i, block in enumerate(schedule, 1):
        b = block_args(args, block, init_from, preset)
        init_meta = load_init_run(b.init_from) if b.init_from else None
        config = resolve_config(b, parser, init_meta)
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
                run_dir, _ = prepare_run_dir(run_dir, config, init_meta)
            in_child_process(run_block, config, run_dir, stop_after=args.stop_after)
            if not read_metadata(run_dir).get("complete"):
                print(f"stopped inside {run_dir}; run the same command again to resume the journey")
                return 1
        summaries.append(in_child_process(eval_lib.evaluate_run, str(run_dir), rows, dataset_id=eval_dataset,
                                          max_new_tokens=settings["max_new_tokens"],
                                          batch_size=settings["batch_size"], out_dir=root / "eval" / run_dir.name))
        table = eval_lib.write_table(summaries, root / "table.md")
        # The published curve is drawn behind ours only on the published step scale.
        eval_lib.plot_curriculum(summaries, root / "curriculum.png",
                                 published=eval_lib.PUBLISHED if args.preset == "paper" else None)
        init_from = run_dir
    print(f"\n{table}\nwrote {root / 'table.md'} and {root / 'curriculum.png'}")
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)
    for noisy in ("absl", "jax", "orbax", "tunix"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    if args.phase == "curriculum":
        return run_curriculum(args, parser)
    if args.resume:
        if not args.out:
            parser.error("--resume needs --out RUN_DIR (the run to continue)")
        run_dir, metadata = prepare_run_dir(args.out, {}, resume=True)
        config = metadata["config"]
        if config["phase"] != args.phase:
            parser.error(f"--resume: {run_dir} is a {config['phase']} run, not --phase {args.phase}")
        log.info("resuming %s with its saved configuration", run_dir)
    else:
        init_meta = load_init_run(args.init_from) if args.init_from else None
        config = resolve_config(args, parser, init_meta)
        check_phase_rules(config, init_meta, args.force)
        if args.print_config:
            print(json.dumps(config))
            return 0
        config["sample_every"] = args.sample_every
        run_dir, metadata = prepare_run_dir(args.out, config, init_meta, overwrite=args.overwrite)
    log.info("%s block: global steps %d-%d into %s; model %s; data %s", config["phase"], config["start_step"],
             config["end_step"], run_dir, config["model"], dataset_id(config))
    try:
        run_block(config, run_dir, stop_after=args.stop_after)
    except SystemExit:
        # A fresh run that failed before its first checkpoint (e.g. weights unavailable) leaves
        # nothing behind, so the same command can simply be run again.
        if not args.resume and not any((run_dir / "checkpoints").rglob("commit_success.txt")):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
