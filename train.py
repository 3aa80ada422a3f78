"""Training: SFT, then GRPO blocks with a penalty-annealing curriculum, on Gemma 3 with Tunix (README sections 4, 6, 7).

    python train.py --phase sft                                           # -> runs/sft
    python train.py --phase grpo --penalty soft --init-from runs/sft      # -> runs/grpo_soft_600
    python train.py --phase curriculum --preset cpu                       # the whole journey, each block evaluated

Top to bottom: 1. the published settings (../shared/REFERENCE.md section 3), 2. the command line over them, 3. one
block (sft.py, grpo.py), 4. the journey. Run directories, metrics, signals and resume: runs.py, which you can skip.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from math import inf
from pathlib import Path

import data
import grpo
import gsm8k
import report
import rewards
import runs
import sft

log = logging.getLogger("train")

# ==== 1. Configuration: the published settings. Every one is a flag (--max-steps, --beta, ...). ====

COMMON = dict(  # settings of every block, SFT and GRPO alike
    model="gemma-3-1b-it",
    lora_rank=64, lora_alpha=64.0,   # on modules matching model.LORA_PATTERN
    # The adapters' dtype: "base" = the base weights' (what qwix makes; published: bfloat16), or "float32" (README).
    lora_dtype="base",
    adam_b1=0.9, adam_b2=0.999,      # optax's defaults, which the published optax.adamw calls used
    # The order of the training rows: grain's shuffle with the published seed (data.prompt_order).
    shuffle_seed=42,
    save_every=100, keep_checkpoints=2,
    # Not published, memory only: log-probs of this many token positions at a time (grpo_loss.py), never
    # Tunix 0.1.7's full [batch, length, 262,144] float32 logits; 0 = Tunix's own computation.
    logps_chunk_size=256,
    # Not published, memory only: the backward pass recomputes each decoder layer (Tunix's RematConfig.DECODER, in
    # grpo_loss.py): gemma-3-1b-it's GRPO loss buffers 33.3 -> 6.1 GiB (BENCHMARKS.md). "none": keep every activation.
    remat="decoder",
)

# One GRPO block of the published run: REFERENCE.md section 3 (the author's report, raw logs and
# scripts/train_grpo_tpu.py at the "result" commit, run with Tunix 0.1.3).
GRPO = dict(
    max_steps=300,             # one block; the blocks chain to 600, 900, 1200
    # optax.warmup_cosine_decay_schedule(init 1e-8, peak 3e-6, warmup 10% of the span, decay over the
    # span, end 10% of the peak), after clip_by_global_norm(0.1), in optax.adamw(weight_decay=0.1).
    learning_rate=3e-6, lr_init=1e-8, warmup_ratio=0.1, lr_end_ratio=0.1, weight_decay=0.1, max_grad_norm=0.1,
    # How a block continues the previous one, as the raw logs show it: "published" = one checkpoint directory with
    # MAX_STEPS raised by 300 per block, so the schedule's span is the cumulative steps (block 2: warmup 60, decay 600)
    # while its count restarts at 0 (Tunix 0.1.3 saved no optimizer state), and the prompt order continues.
    # "restart": every block a fresh run (its own 300-step schedule, prompts from the first again).
    chaining="published",
    batch_size=1,              # prompts per step (Tunix mini_batch_size = train_micro_batch_size = 1)
    num_generations=4,         # G
    num_iterations=1,          # mu
    beta=0.08,                 # KL coefficient
    epsilon=0.2,               # clip range
    # The loss of Tunix 0.1.3, which ran the published blocks: k3 = exp(ref - logp) - (ref - logp) - 1, averaged over
    # every completion token (Tunix 0.1.7's defaults: "kl", which never pulls towards the reference, sequence-mean).
    kl_loss_mode="low_var_kl", loss_agg_mode="token-mean",
    max_prompt_length=1024, max_tokens_to_generate=512,
    kv_cache_size=2048,        # rollout KV cache (evaluation: eval.py)
    temperature=1.0, top_p=1.0, top_k=50,
    # The published RolloutConfig set no eos_tokens: Tunix stopped at <eos> only, so a completion ran on past
    # <end_of_turn> and the reward parsed all of it. "<eos>,<end_of_turn>": stop at the end of the turn.
    stop_tokens=["<eos>"],
)

# The published SFT. The sources disagree (REFERENCE section 3): the report says 300 steps at a constant 2e-5;
# the notebook's cell runs 600 steps, warmup 25 then cosine to 10%, but the checkpoint the GRPO blocks loaded is
# named `manual_final_step_50`: not that cell as written. We follow the report (--sft-schedule notebook: the cell).
SFT = dict(
    max_steps=300, learning_rate=2e-5, sft_schedule="constant", weight_decay=0.01, max_grad_norm=1.0,
    batch_size=2,                    # micro batch
    gradient_accumulation_steps=8,   # -> 16 sequences per optimizer step
    max_seq_length=1024,
    max_tokens_to_generate=512,      # of the greedy samples that check the format at the end (0: none)
)
# Seed 002 (../shared/seeds/002_*.txt): the format phase trains on "a random 20-30% slice" of GSM8K; every phase
# ends when its "Phase Completion Criteria" hold over the last exit_window steps (0: run to --steps): ">= 95%
# <answer> extraction", "near-zero refusal" (<= 2%: ours), "stable output length" (halves within 10%: ours).
GSM8K = {"slice_start": 0.0, "slice_end": 0.25, "exit_window": 20, "exit_extraction": 0.95, "exit_refusal": 0.02,
         "exit_length_drift": 0.10}
CHOICES = {"kl_loss_mode": ("low_var_kl", "kl", "mse_kl"), "chaining": ("published", "restart"),
           "sft_schedule": ("constant", "notebook"), "remat": ("none", "block", "decoder"),
           "lora_dtype": ("base", "float32"), "loss_agg_mode": ("token-mean", "sequence-mean-token-mean",
           "sequence-mean-token-scale", "seq-mean-token-sum", "sequence-mean-token-sum-norm")}  # Tunix 0.1.7's
# What each setting may be: resolve_config refuses anything else, --print-config too (NaN fails every rule).
AT_LEAST_1, POSITIVE, NON_NEGATIVE = (">= 1", lambda v: v >= 1), ("> 0", lambda v: 0 < v < inf), (">= 0", lambda v: 0 <= v < inf)
RANGES = {**dict.fromkeys(("lora_rank", "save_every", "keep_checkpoints", "max_steps", "batch_size", "num_iterations", "top_k",
                           "max_prompt_length", "kv_cache_size", "gradient_accumulation_steps", "max_seq_length", "n_prompts"),
                          AT_LEAST_1),
          **dict.fromkeys(("lora_alpha", "learning_rate", "max_grad_norm", "epsilon", "temperature"), POSITIVE),
          **dict.fromkeys(("lr_init", "weight_decay", "beta", "logps_chunk_size", "max_tokens_to_generate", "sample_every"),
                          NON_NEGATIVE),
          **dict.fromkeys(("warmup_ratio", "lr_end_ratio", "slice_start", "slice_end"), ("in [0, 1]", lambda v: 0 <= v <= 1)),
          **dict.fromkeys(("adam_b1", "adam_b2"), ("in [0, 1)", lambda v: 0 <= v < 1)), "top_p": ("in (0, 1]", lambda v: 0 < v <= 1),
          "num_generations": (">= 2: GRPO compares completions within a group", lambda v: v >= 2)}
flag = lambda key: "--steps" if key == "max_steps" else "--" + key.replace("_", "-")  # noqa: E731

# --phase curriculum --preset: the whole journey at a size (flags win), evaluating the base model, then each block.
# Every preset keeps the published adapter precision ("base"): bfloat16 adapters barely move lora_a at
# 3e-6, yet the policy moved as far as with float32 ones, through lora_b (README "Adapter precision").
PRESETS = {
    # The published journey: gemma-3-1b-it, published steps and settings, evaluated as published.
    "paper": {"schedule": "sft,soft,medium,soft,soft", "grpo": {}, "sft": {},
              "eval": {"protocol": "published", "n": 50, "max_new_tokens": 512, "batch_size": 8}},
    # The same journey on the embedded 270M, sized for one accelerator (bf16 by --dtype auto).
    "gpu": {"schedule": "sft,soft,medium,soft,soft", "grpo": {"model": "gemma-3-270m", "lora_dtype": "base"},
            "sft": {"model": "gemma-3-270m", "lora_dtype": "base"},
            "eval": {"protocol": "published", "n": 50, "max_new_tokens": 512, "batch_size": 25}},
    # 2 CPU cores, ~20 minutes, ~12 GB: base vs SFT shows SFT teaching the format; one short soft block shows GRPO
    # groups whose rewards differ. Why each value differs from the published one (measured here): README "The whole
    # journey"; in short, 12 SFT steps at 2e-4 are the fewest that ground a proof, 2 GRPO steps (G=4, as published) fit
    # the time, 256 tokens hold a whole answer, 6 vignettes need the same rows in every column, XLA:CPU drops remat's
    # barriers (no memory saved).
    "cpu": {"schedule": "sft,soft",
            "sft": {"model": "gemma-3-270m", "max_steps": 12, "learning_rate": 2e-4, "batch_size": 1,
                    "gradient_accumulation_steps": 2, "max_seq_length": 768, "max_tokens_to_generate": 0,
                    "save_every": 12, "remat": "none"},
            "grpo": {"model": "gemma-3-270m", "max_steps": 2, "max_prompt_length": 768,
                     "max_tokens_to_generate": 160, "kv_cache_size": 1024, "save_every": 2,
                     "remat": "none"},
            "eval": {"protocol": "clean", "n": 6, "max_new_tokens": 256, "batch_size": 6}},
}
PUBLISHED_SCHEDULE = ("soft", "medium", "soft", "soft")   # the penalty level of GRPO block 1, 2, 3, 4
# --curriculum gsm8k: seed 002's phases as GRPO blocks, gated by exit criteria. The seed fixes model, phases, data and
# rewards; steps and GRPO settings are the DIPG run's. Rollouts stop at the end of the turn (the gate allows nothing after).
GSM8K_PRESETS = {
    "paper": {"schedule": ",".join(gsm8k.PHASES), "grpo": {"stop_tokens": ["<eos>", "<end_of_turn>"]},
              "eval": {"protocol": "clean", "n": 100, "max_new_tokens": 512, "batch_size": 25}},
    # 2 CPU cores, <= 20 minutes: phase 1 on the base 270M (README "The GSM8K curriculum": why these values).
    "cpu": {"schedule": "format",
            "grpo": {"model": "gemma-3-270m", "max_steps": 12, "num_generations": 4, "learning_rate": 3e-5,
                     "temperature": 0.7, "max_prompt_length": 384, "max_tokens_to_generate": 128, "kv_cache_size": 640, "save_every": 4,
                     "remat": "none", "stop_tokens": ["<eos>", "<end_of_turn>"], "exit_window": 8},
            "eval": {"protocol": "clean", "n": 20, "max_new_tokens": 128, "batch_size": 20}},
}

# ==== 2. The command line: every setting above is a flag; left unset, it takes the phase's default. ====

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="SFT and GRPO blocks of the DIPG penalty-annealing curriculum "
                                            "(and seed 002's GSM8K phases) with Tunix.")
    p.add_argument("--phase", required=True, choices=("sft", "grpo", *gsm8k.PHASES, "curriculum"),
                   help="one block, or 'curriculum': the whole journey of --schedule, evaluated after each block")
    p.add_argument("--penalty", choices=tuple(rewards.PENALTIES), help="DIPG penalty level of a GRPO block (default soft)")
    p.add_argument("--model", help="gemma-3-1b-it (published), gemma-3-270m (embedded, offline) or tiny (tests)")
    p.add_argument("--model-path", help="local Hugging Face-format directory with the model's weights")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="auto: bfloat16 on GPU/TPU (as the published TPU run), float32 on CPU")
    p.add_argument("--mesh", default="fsdp=1,tp=1", help="device mesh over Tunix's axes (default %(default)s)")
    p.add_argument("--dataset", default="builtin", help="builtin (default), hub, a hub id or a local .jsonl/.json/.parquet")
    p.add_argument("--system-prompt", metavar="FILE", help="the instructions at the top of every prompt, training "
                                                           "and evaluation (default: ours, data.SYSTEM_PROMPT)")
    p.add_argument("--n-prompts", type=int, help="use only the first N rows of the dataset")
    p.add_argument("--seed", type=int, default=0, help="LoRA init and the builtin data (default %(default)s)")
    p.add_argument("--sample-every", type=int, default=25, help="show one completion every N steps (0: never)")
    p.add_argument("--wandb", metavar="PROJECT", help="also log metrics and samples to this Weights & Biases project "
                                                      "(pip install wandb; WANDB_MODE=offline: local files only)")
    for key, value in {**COMMON, **GRPO, **SFT, **GSM8K}.items():
        if key == "model":
            continue
        defaults = " / ".join(f"{name} {d[key]}" for name, d in (("GRPO", GRPO), ("SFT", SFT), ("all", COMMON))
                              if key in d) or f"GSM8K phases {GSM8K[key]}"
        flags = ["--" + key.replace("_", "-")] + (["--steps"] if key == "max_steps" else [])
        kind = (lambda text: text.split(",")) if isinstance(value, list) else type(value)
        p.add_argument(*flags, dest=key, type=kind, choices=CHOICES.get(key), help=f"default: {defaults}")
    j = p.add_argument_group("run directory, devices and the journey")
    j.add_argument("--out", help="run directory (default runs/<phase>[_<penalty>]_<end step>); curriculum: its root")
    j.add_argument("--init-from", metavar="RUN_DIR", help="start from this run's weights and continue its global steps")
    j.add_argument("--resume", action="store_true", help="continue the interrupted run in --out at its last checkpoint")
    j.add_argument("--overwrite", action="store_true", help="replace the run of train.py in --out, once this one's data and model have loaded")
    j.add_argument("--force", action="store_true", help="start a phase that changes both dataset and rewards")
    j.add_argument("--print-config", action="store_true", help="print the resolved configuration as JSON and exit")
    j.add_argument("--check-device", action="store_true",
                   help="print the backend, devices, dtype and mesh this run would use, and exit")
    j.add_argument("--allow-cpu", action="store_true",
                   help="run an accelerator configuration (--preset gpu/paper, --dtype bfloat16) on the CPU anyway")
    j.add_argument("--debug", action="store_true", help="show the traceback of an error about input or the disk")
    j.add_argument("--stop-after", type=int, metavar="GLOBAL_STEP", help="debug: behave as if Ctrl-C came during this step")
    j.add_argument("--curriculum", choices=("dipg", "gsm8k"), default="dipg",
                   help="curriculum: dipg (SFT + penalty-annealed GRPO blocks) or gsm8k (seed 002's phases)")
    j.add_argument("--schedule", help="curriculum: blocks in order (default: the preset's; published: sft,"
                                      + ",".join(PUBLISHED_SCHEDULE) + "; gsm8k: " + ",".join(gsm8k.PHASES) + ")")
    j.add_argument("--preset", choices=tuple(PRESETS), default="paper",
                   help="curriculum: paper = the published journey (gemma-3-1b-it); gpu = the same on the embedded "
                        "270M for one accelerator; cpu = base vs SFT + one short GRPO block on 2 CPU cores (~20 min); "
                        "--curriculum gsm8k: paper (the seed's model) or cpu (phase 1 on the 270M)")
    j.add_argument("--eval-dataset", help="curriculum: evaluation vignettes (default: the builtin eval split)")
    j.add_argument("--eval-protocol", help="curriculum: published, clean, or both as 'published,clean' (default: "
                                           "the preset's; eval.py's PROTOCOLS say what each is)")
    return p.parse_args(argv), p


def phase_defaults(phase: str) -> dict:
    if phase == "sft":
        return {**COMMON, **SFT}
    gsm = {k: v for k, v in GSM8K.items() if phase == "format" or (phase in gsm8k.PHASES and k.startswith("exit"))}
    return {**COMMON, **GRPO, **gsm}


def dataset_id(phase: str, dataset: str) -> str:
    """Which data a block trains on (format's slice is GSM8K's: seed 002 changes only the rewards there)."""
    kind = {"sft": "dipg/train", "grpo": "dipg/train", "generalize": "mixed(gsm8k,code,qa)"}.get(phase, "gsm8k/train")
    return f"{dataset}:{kind}"


def reward_set(config: dict) -> str:
    """What the block optimises, as compared by the phase rule."""
    if config["phase"] in ("sft", "grpo"):
        return "sft_format" if config["phase"] == "sft" else f"dipg_{config['penalty']}"
    return "gsm8k_" + ("format" if config["phase"] == "format" else "correctness")  # generalize keeps phase 2's


def lr_schedule(config: dict, steps_before: int) -> dict:
    """optax.warmup_cosine_decay_schedule's arguments and the count it starts at (0: a fresh optimizer per block)."""
    steps, peak = config["max_steps"], config["learning_rate"]
    if config["phase"] == "sft":
        if config["sft_schedule"] == "notebook":
            return {"init": 0.0, "peak": peak, "warmup_steps": min(25, steps - 1), "decay_steps": steps,
                    "end": 0.1 * peak, "start_count": 0}
        return {"init": peak, "peak": peak, "warmup_steps": 0, "decay_steps": steps, "end": peak, "start_count": 0}
    span = steps_before + steps if config["chaining"] == "published" else steps
    return {"init": config["lr_init"], "peak": peak, "warmup_steps": int(config["warmup_ratio"] * span),
            "decay_steps": span, "end": config["lr_end_ratio"] * peak, "start_count": 0}


def resolve_config(args, parser, init_meta: dict | None = None) -> dict:
    """One block's flat configuration: flags over its phase's defaults, keeping init_meta's model and LoRA shape."""
    phase = args.phase
    if args.penalty and phase != "grpo":
        parser.error(f"--penalty applies to --phase grpo only (got --phase {phase})")
    defaults = phase_defaults(phase)
    if init_meta is not None:
        for key in ("model", "lora_rank", "lora_alpha", "lora_dtype"):
            asked = getattr(args, key)
            if asked is not None and asked != init_meta.get(key, defaults[key]):
                parser.error(f"--{key.replace('_', '-')} {asked} differs from the init run's {init_meta.get(key)} "
                             f"({args.init_from}); its LoRA weights belong to that run. Drop the flag.")
            defaults[key] = init_meta.get(key, defaults[key])
    config = {"phase": phase, "penalty": (args.penalty or "soft") if phase == "grpo" else None}
    config.update({k: v if getattr(args, k, None) is None else getattr(args, k) for k, v in defaults.items()})
    config.update(model_path=args.model_path or (init_meta or {}).get("model_path"), dtype=resolve_dtype(args.dtype),
                  mesh=args.mesh, dataset=args.dataset, system_prompt=args.system_prompt, n_prompts=args.n_prompts,
                  seed=args.seed, wandb=args.wandb, sample_every=args.sample_every,
                  init_from=str(Path(args.init_from).resolve()) if args.init_from else None,
                  start_step=(init_meta["global_step"] + 1) if init_meta else 1)
    for key, (rule, ok) in RANGES.items():
        if config.get(key) is not None and not ok(config[key]):
            parser.error(f"{flag(key)} must be {rule} (got {config[key]})")
    config["end_step"] = config["start_step"] + config["max_steps"] - 1
    # Chaining: the blocks of this lineage that trained this phase on these rows before this one.
    earlier = [b for b in (init_meta or {}).get("lineage", [])
               if b["phase"] == phase and b.get("dataset") == dataset_id(phase, args.dataset)]
    steps_before = sum(b["end_step"] - b["start_step"] + 1 for b in earlier)
    config["lr_schedule"] = lr_schedule(config, steps_before)
    published = phase == "sft" or config["chaining"] == "published"
    config["data_start_position"] = steps_before * config["batch_size"] if published and phase != "sft" else 0
    if phase == "grpo":  # the rewards by their published names, so --print-config shows the whole block
        config.update(dataclasses.asdict(rewards.PENALTIES[config["penalty"]]))
    elif phase != "sft":
        config["reward_functions"] = [f.__name__ for f in gsm8k.PHASE_REWARDS[phase]]
    runs.check_wandb(config)
    try:  # then what no single setting says
        runs.parse_mesh(config["mesh"])
        data.load_system_prompt(config["system_prompt"])
    except ValueError as e:
        parser.error(str(e))
    if config["logps_chunk_size"] == 0 and config["remat"] != "none":
        parser.error(f"--remat {config['remat']} is applied in our chunked loss, which --logps-chunk-size 0 "
                     "replaces with Tunix's own: add --remat none")
    if phase != "sft":
        if not 0 < config["max_tokens_to_generate"] < config["kv_cache_size"] - config["max_prompt_length"]:
            parser.error(f"--max-tokens-to-generate {config['max_tokens_to_generate']} must be >= 1 and --kv-cache-size "
                         f"{config['kv_cache_size']} must exceed --max-prompt-length + --max-tokens-to-generate = "
                         f"{config['max_prompt_length'] + config['max_tokens_to_generate']}")
        unknown = [t for t in config["stop_tokens"] if t not in ("<eos>", "<end_of_turn>")]
        if unknown or not config["stop_tokens"]:
            parser.error(f"--stop-tokens {','.join(config['stop_tokens'])}: use <eos> or <eos>,<end_of_turn>")
    if phase == "format" and not config["slice_start"] < config["slice_end"]:
        parser.error("--slice-start/--slice-end: need 0 <= start < end <= 1")
    return config


def run_metadata(config: dict, run_dir: Path, init_meta: dict | None) -> dict:
    """RUN_DIR/metadata.json: what the block is, what it continues, and (runs.py) how far it got."""
    this_block = {"run_dir": str(Path(run_dir).resolve()), "phase": config["phase"], "penalty": config["penalty"],
                  "start_step": config["start_step"], "end_step": config["end_step"],
                  "dataset": dataset_id(config["phase"], config["dataset"])}
    return {
        **{k: config[k] for k in ("phase", "penalty", "model", "model_path", "lora_rank", "lora_alpha", "lora_dtype",
                                  "start_step", "end_step", "max_steps")},
        "global_step": config["start_step"] - 1, "dataset": this_block["dataset"], "reward_set": reward_set(config),
        # Tunix's RLCluster writes the actor's checkpoints one level down, under "actor".
        "checkpoint_dir": "checkpoints" if config["phase"] == "sft" else "checkpoints/actor",
        "config": config, "complete": False,
        "lineage": (init_meta["lineage"] if init_meta else []) + [this_block],
    }


def default_out(config: dict) -> Path:
    name = config["phase"] if config["phase"] == "sft" else "_".join(
        filter(None, [config["phase"], config["penalty"], str(config["end_step"])]))
    return Path("runs") / name


def resolve_dtype(dtype: str) -> str:
    """--dtype auto: bfloat16 on accelerators (as the published TPU run), float32 on CPU (bf16 is slow there)."""
    if dtype != "auto":
        return dtype
    import jax

    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


# JAX for each machine, pinned to requirements.txt's (resolved together with it; README "Set up").
INSTALL = {"NVIDIA GPU, CUDA 12": "pip install -r requirements.txt 'jax[cuda12]==0.10.2'",
           "CUDA 13": "pip install -r requirements.txt 'jax[cuda13]==0.10.2'",
           "TPU": "pip install -r requirements.txt 'jax[tpu]==0.10.2'"}


def check_device(config: dict, accelerator_preset: str | None, allow_cpu: bool) -> None:
    """No silent fall-back: an accelerator configuration on a JAX that sees only a CPU is refused in one line."""
    import jax

    if jax.default_backend() == "cpu" and (accelerator_preset or config["dtype"] == "bfloat16") and not allow_cpu:
        what = f"--preset {accelerator_preset}" if accelerator_preset else "--dtype bfloat16"
        sys.exit(f"error: {what} is meant for a GPU or TPU, but JAX sees only a CPU. Install JAX for yours ("
                 + "; ".join(f"{machine}: {line}" for machine, line in INSTALL.items())
                 + ") and check with --check-device, or add --allow-cpu to run it on the CPU anyway (slowly)")


def describe_device(config: dict) -> dict:
    """What --check-device prints: where and how this run would compute."""
    import jax

    axes = runs.mesh_axes(config["mesh"])
    return {"backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
            "device_kind": jax.devices()[0].device_kind, "process_count": jax.process_count(),
            "dtype": config["dtype"], "lora_dtype": config["lora_dtype"], "mesh": axes,
            "mesh_fits": axes["fsdp"] * axes["tp"] <= jax.device_count(), "jax": jax.__version__}


# ==== 3. One block: SFT (sft.py) or GRPO (grpo.py), from its configuration ====

def train_block(config: dict, run_dir, stop_after: int | None = None, new_run: dict | None = None) -> dict:
    """Train one block into run_dir, record how far it got, say what next (a failed new_run leaves nothing)."""
    run_dir = Path(run_dir)
    try:
        last = (sft if config["phase"] == "sft" else grpo).run(config, run_dir, stop_after, new_run)
    except BaseException:
        if new_run is not None:
            runs.remove_if_empty_run(run_dir)
        raise
    met = bool(config.get("exit_window")) and gsm8k.exit_criteria(runs.read_rows(run_dir), config)["met"]
    metadata = runs.finish_run_dir(run_dir, last, ended_early=met)
    if not runs.is_main_process():
        return metadata
    if not metadata["complete"]:
        print(f"stopped at global step {last}; continue with: python train.py --phase {config['phase']} "
              f"--out {run_dir} --resume")
    elif config["phase"] in gsm8k.PHASES:  # seed 002's exit criteria, then the next phase
        gsm8k.print_next_steps(config, run_dir)
    else:
        print(f"done: {run_dir} (global steps {config['start_step']}-{last})")
        blocks = sum(1 for b in metadata["lineage"] if b["phase"] == "grpo")
        if blocks < len(PUBLISHED_SCHEDULE):
            print(f"next (published curriculum, block {blocks + 1}): python train.py --phase grpo "
                  f"--penalty {PUBLISHED_SCHEDULE[blocks]} --init-from {run_dir}")
        print(f"evaluate: python eval.py --runs {run_dir}")
    return metadata


def start_block(args, parser, run_dir: Path | None = None):
    """A new block's checked (config, run_dir, metadata.json to write); nothing written yet."""
    init_meta = runs.load_init_run(args.init_from) if args.init_from else None
    config = resolve_config(args, parser, init_meta)
    if init_meta is not None:
        gsm8k.check_phase_rule(init_meta, {"dataset": dataset_id(config["phase"], config["dataset"]),
                                           "reward_set": reward_set(config)}, args.force)
    if args.print_config:
        return config, None, None
    check_device(config, None, args.allow_cpu)
    run_dir = Path(run_dir or args.out or default_out(config))
    runs.check_run_dir(run_dir, args.overwrite)
    return config, run_dir, run_metadata(config, run_dir, init_meta)


def resumed_config(saved: dict, args, parser, run_dir) -> dict:
    """--resume: the saved configuration; a differing flag is refused, but a larger --steps extends the block."""
    given = {k: str(Path(v).resolve()) if k == "init_from" else v for k, v in vars(args).items()
             if k in saved and v is not None and v != parser.get_default(k)}
    given = {k: v for k, v in given.items() if v != saved[k]}
    refused = [k for k in given if k != "sample_every" and not (k == "max_steps" and given[k] > saved[k])]
    if refused:
        parser.error(f"--resume continues {run_dir} with its saved settings, and " + ", ".join(
            f"{flag(k)} {given[k]} (saved: {saved[k]})" for k in refused) + " differ: drop them, or start again (--overwrite)")
    if "max_steps" in given:
        given["end_step"] = saved["start_step"] + given["max_steps"] - 1
        log.info("--steps %d: the block now ends at global step %d (learning-rate schedule as saved)",
                 given["max_steps"], given["end_step"])
    return {**saved, **given}


# ==== 4. The journey: every block of --schedule from the previous one, each evaluated (eval.py) ====

def run_journey(args, parser) -> int:
    """Train and evaluate each block of the schedule from the previous one; the same command resumes the journey."""
    import eval as evaluation

    dipg = args.curriculum == "dipg"
    presets, kinds = (PRESETS, ("sft", *rewards.PENALTIES)) if dipg else (GSM8K_PRESETS, gsm8k.PHASES)
    if args.preset not in presets:
        parser.error(f"--preset {args.preset}: --curriculum {args.curriculum} has {', '.join(presets)}")
    preset = presets[args.preset]
    schedule = [b.strip() for b in (args.schedule or preset["schedule"]).split(",") if b.strip()]
    if not schedule or "sft" in schedule[1:] or any(b not in kinds for b in schedule):
        parser.error(f"--schedule {args.schedule!r}: expected a comma-separated list of " + (
            f"GRPO penalty levels ({', '.join(rewards.PENALTIES)}), optionally starting with sft (e.g. "
            "sft,soft,medium,soft,soft)" if dipg else f"GSM8K phases ({', '.join(gsm8k.PHASES)})"))
    protocols = (args.eval_protocol or preset["eval"]["protocol"]).split(",")
    if any(p not in evaluation.PROTOCOLS for p in protocols):
        parser.error(f"--eval-protocol {args.eval_protocol}: choose from {', '.join(evaluation.PROTOCOLS)}")
    root = Path(args.out or "runs")

    def block_args(block: str, init_from):  # the user's flags, then the preset's, then the published defaults
        b = argparse.Namespace(**vars(args))
        b.phase, b.penalty = (block, None) if block in ("sft", *gsm8k.PHASES) else ("grpo", block)
        b.init_from = str(init_from) if init_from else None
        for key, value in preset["sft" if b.phase == "sft" else "grpo"].items():
            if getattr(b, key, None) is None:
                setattr(b, key, value)
        return b

    if args.print_config:  # every block's configuration, one JSON object per line; nothing runs
        init_from, init_meta = args.init_from, runs.load_init_run(args.init_from) if args.init_from else None
        for block in schedule:
            config = resolve_config(block_args(block, init_from), parser, init_meta)
            print(json.dumps(config))
            # what the next block will find in this one's metadata.json once it has run
            init_from = root / default_out(config).name
            init_meta = dict(run_metadata(config, init_from, init_meta), global_step=config["end_step"], complete=True)
        return 0
    check_device(resolve_config(block_args(schedule[0], args.init_from), parser,
                                runs.load_init_run(args.init_from) if args.init_from else None),
                 args.preset if args.preset in ("gpu", "paper") else None, args.allow_cpu)
    root.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in preset["eval"].items() if k != "protocol"}
    published = report.PUBLISHED if args.preset == "paper" and dipg else None
    columns = {p: [] for p in protocols}  # each protocol's evaluation directories so far, one table column each
    references = {p: evaluation.reference_summaries(evaluation.load_eval_rows(
        "dipg", args.eval_dataset, settings["n"], protocol=p, system_prompt=args.system_prompt)[0]) if dipg else []
        for p in protocols}

    def evaluate(run, **kwargs):  # under every protocol (the first: OUT/eval/, table.md; another: *_<protocol>)
        for p in protocols:
            tag = "" if p == protocols[0] else f"_{p}"
            out_dir = root / f"eval{tag}" / evaluation.result_dir_name(run)
            runs.in_child_process(one_line, evaluation.evaluate_run, run, task=args.curriculum, protocol=p,
                                  out_dir=out_dir, dataset=args.eval_dataset, system_prompt=args.system_prompt,
                                  **settings, **kwargs)
            columns[p].append(out_dir)
            if runs.is_main_process():  # several processes evaluate together; one writes
                evaluation.write_report(columns[p], root, tag, references[p], published, task=args.curriculum,
                                        criteria=None if dipg else config)

    init_from, trained = args.init_from, False
    for i, block in enumerate(schedule, 1):
        b = block_args(block, init_from)
        config = resolve_config(b, parser, runs.load_init_run(b.init_from) if b.init_from else None)
        if i == 1:  # the model before any training: the table's first column
            evaluate("base", model_name=config["model"], model_path=config["model_path"])
        run_dir = root / default_out(config).name
        existing = runs.read_metadata(run_dir)
        # A block trained with other settings than this command's (or from a block trained again) is not reused.
        changed = existing and ([k for k in config if existing["config"].get(k) != config[k] and k != "sample_every"]
                                or trained and ["the block before it, trained again"])
        print(f"\n=== block {i}/{len(schedule)}: {block} -> {run_dir} (global steps {config['start_step']}-{config['end_step']})")
        if changed and not args.overwrite:
            sys.exit(f"error: {run_dir} was trained with other settings than this command's ({', '.join(changed)}); "
                     "pass --overwrite to train it again with these, or choose another --out")
        if existing and not changed and existing.get("complete"):
            print(f"already trained ({run_dir}/metadata.json says complete); skipping")
        else:
            new_run = None
            if existing and not changed:  # interrupted earlier: continue it
                runs.check_resumable(run_dir, existing)
            else:
                b.out, b.overwrite = str(run_dir), args.overwrite
                config, _, new_run = start_block(b, parser, run_dir)
            if not runs.in_child_process(one_line, train_block, config, run_dir, stop_after=args.stop_after,
                                         new_run=new_run)["complete"]:
                print(f"stopped inside {run_dir}; run the same command again to resume the journey")
                return 1
            trained = True
        evaluate(str(run_dir), overwrite=trained)
        if block in gsm8k.PHASES and i < len(schedule) and not args.force:  # seed 002: advance once behaviour is stable
            if not gsm8k.exit_criteria(runs.read_rows(run_dir), config)["met"]:
                print(f"{block}'s exit criteria did not hold: the next phase waits (more --steps, or --force)")
                return 1
        init_from = run_dir
    for tag in [""] + [f"_{p}" for p in protocols[1:]] if runs.is_main_process() else []:
        print(f"\n{(root / f'table{tag}.md').read_text()}\nwrote {root / f'table{tag}.md'} and {root / f'curriculum{tag}.png'}")
    return 0


# ==== The command line ====

def one_line(fn, *args, **kwargs):
    """fn's result; bad input data and unreadable or full disks stop it in one line (--debug: with the traceback)."""
    try:
        return fn(*args, **kwargs)
    except (data.DataError, OSError) as e:
        if os.environ.get("TRAIN_DEBUG"):
            raise
        sys.exit(f"error: {e}" if isinstance(e, data.DataError) else f"error: {e.filename or 'a file'}: "
                 f"{e.strerror or e}; check the path, its permissions and the free disk space (--debug: traceback)")
    except KeyboardInterrupt:  # Ctrl-C before training began: nothing to save
        sys.exit(130)


def main(argv=None) -> int:
    args, parser = parse_args(argv)
    if args.debug:
        os.environ["TRAIN_DEBUG"] = "1"  # the journey's children too
    if args.phase == "curriculum":  # the journey only coordinates: JAX must leave the GPU's memory to its children
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    runs.setup_logging()
    runs.join_processes()  # a multi-host launch: every process joins before JAX touches a device
    return one_line(command, args, parser)


def command(args, parser) -> int:
    if args.phase == "curriculum" and not args.check_device:
        return run_journey(args, parser)
    new_run = None
    if args.resume:
        run_dir, saved = runs.reopen_run_dir(args.out, args.phase, parser)
        config = resumed_config(saved, args, parser, run_dir)
    else:  # --print-config and --check-device show a block's configuration (curriculum: a GRPO block's)
        show = args.print_config or args.check_device
        phase = "grpo" if args.phase == "curriculum" else args.phase
        config, run_dir, new_run = start_block(argparse.Namespace(**{**vars(args), "print_config": show, "phase": phase}),
                                               parser)
    if args.print_config or args.check_device:  # what would run (a resumed run: its saved configuration)
        print(json.dumps(describe_device(config) if args.check_device else config))
        return 0
    if args.resume:
        check_device(config, None, args.allow_cpu)
        if config != saved:  # a larger --steps: the block now ends later
            meta = runs.read_metadata(run_dir)
            runs.finish_run_dir(run_dir, meta["global_step"], config=config, max_steps=config["max_steps"],
                                end_step=config["end_step"], lineage=meta["lineage"][:-1] + [
                                    {**meta["lineage"][-1], "end_step": config["end_step"]}])
    log.info("%s block: global steps %d-%d into %s; model %s; data %s", config["phase"], config["start_step"],
             config["end_step"], run_dir, config["model"], dataset_id(config["phase"], config["dataset"]))
    metadata = train_block(config, run_dir, stop_after=args.stop_after, new_run=new_run)
    signum = runs.StopRequest.signum  # Ctrl-C: 130, SIGTERM: 143, as a shell reports a process they ended
    return 128 + signum if signum and not metadata["complete"] else 0


if __name__ == "__main__":
    sys.exit(main())
