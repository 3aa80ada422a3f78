"""Training: SFT, then GRPO blocks with a penalty-annealing curriculum, on Gemma 3 with Tunix.

The published recipe (README "The method"; every number from ../shared/REFERENCE.md section 3):

1. SFT teaches the output format <think> plan </think><proof> quotes </proof><answer> answer </answer>:
   LoRA (rank 64) on every attention and MLP projection, loss on the response tokens only.
2. GRPO in blocks of 300 steps. Each step takes ONE prompt, samples G=4 completions, scores each with
   the DIPG Safety Gym reward (rewards.py), and pushes the policy towards the completions that beat
   their group's mean, with a KL leash (beta 0.08) to the weights the block started from. Blocks chain
   with the penalties annealed: soft, medium, soft, soft.

    python train.py --phase sft                                           # -> runs/sft
    python train.py --phase grpo --penalty soft   --init-from runs/sft            # -> runs/grpo_soft_600
    python train.py --phase grpo --penalty medium --init-from runs/grpo_soft_600  # -> runs/grpo_medium_900
    python train.py --phase curriculum --preset cpu      # the whole journey, evaluated after each block

Global steps count SFT's too (a GRPO block after 300 SFT steps covers 301-600; eval.py labels it
"GRPO (300)" as the published table does). Seed 002's GSM8K curriculum runs through the same GRPO
block with other data and rewards: --phase format, then correctness, then generalize.

This file is the method: configuration, data, model, optimizer, rewards, the SFT block, the GRPO
block. Tunix does the mechanics (rollout, advantages, KL, clipping, optimizer steps, checkpoints):
PeftTrainer for SFT, RLCluster + GRPOLearner for GRPO. Run directories, metrics files, Ctrl-C and
resume live in runs.py, which you can skip.
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from pathlib import Path

import gsm8k
import rewards
import runs

log = logging.getLogger("train")

# ================================================================================================
# Configuration: the published settings. Every one is a flag (--max-steps, --beta, ...).
# ================================================================================================

# One GRPO block of the published run: REFERENCE.md section 3 (the author's report and
# scripts/train_grpo_tpu.py at the "result" commit, run with Tunix 0.1.3).
GRPO = dict(
    model="gemma-3-1b-it",
    max_steps=300,             # one block; the blocks chain to 600, 900, 1200
    # optax.warmup_cosine_decay_schedule(init 1e-8, peak 3e-6, warmup 10% of the block, decay over the
    # block, end 10% of the peak); every block restarts it (REFERENCE reading (a): a fresh run per block).
    learning_rate=3e-6, lr_init=1e-8, warmup_ratio=0.1, lr_end_ratio=0.1,
    # clip_by_global_norm(0.1), then optax.adamw(schedule, weight_decay=0.1): betas are optax's defaults.
    # Every block starts with fresh Adam moments (Tunix 0.1.3 saved no optimizer state).
    adam_b1=0.9, adam_b2=0.999, weight_decay=0.1, max_grad_norm=0.1,
    batch_size=1,              # prompts per step (Tunix mini_batch_size = train_micro_batch_size = 1)
    num_generations=4,         # G
    num_iterations=1,          # mu
    beta=0.08,                 # KL coefficient
    epsilon=0.2,               # clip range
    # The loss of Tunix 0.1.3, which ran the published blocks. Our Tunix (0.1.7) defaults to
    # kl_loss_mode="kl" (logp - ref: its gradient never pulls towards the reference) and to a
    # sequence-mean-token-mean aggregation; 0.1.3 had only the low-variance estimator k3 =
    # exp(ref - logp) - (ref - logp) - 1 and averaged over every completion token of the batch.
    kl_loss_mode="low_var_kl", loss_agg_mode="token-mean",
    max_prompt_length=1024, max_tokens_to_generate=512,
    kv_cache_size=2048,        # rollout KV cache (evaluation uses 4,096: eval.py)
    temperature=1.0, top_p=1.0, top_k=50,
    lora_rank=64, lora_alpha=64.0,   # on modules matching model.LORA_PATTERN
    save_every=100, keep_checkpoints=2,
    # Not a published setting, memory only (GRPO and SFT): log-probs of this many token positions at
    # a time (grpo_loss.py), never Tunix 0.1.7's full [batch, length, 262,144] float32 logits.
    # 0 = Tunix's own computation.
    logps_chunk_size=256,
    # Not a published setting, memory only (GRPO and SFT): the loss's backward pass recomputes each
    # decoder layer instead of keeping its activations (Tunix's RematConfig.DECODER, applied in
    # grpo_loss.py; the same values, for about one more forward pass in the update). gemma-3-1b-it at
    # the published lengths in bf16: XLA's buffers for the GRPO loss and its LoRA gradient
    # 33.3 -> 6.1 GiB (README section 8). "none": keep every activation, as Tunix does by default.
    remat="decoder",
    # Which prompts a block sees. Published (reading (a)): each block was a fresh run of the same
    # script, its data pipeline rebuilt, so every block trained on the SAME first 300 prompts of the
    # seeded order. "continue" instead picks up where the previous block stopped.
    data_order="restart",
)

# The published SFT. The sources disagree (REFERENCE section 3): the report says 300 steps at a
# constant 2e-5; the notebook's SFT cell runs 600 steps with warmup 25 from 0 then cosine to 10%, but
# the checkpoint the GRPO blocks loaded is named `manual_final_step_50`, so that cell as written is not
# what produced it. We follow the report, whose SFT column the table shows; --sft-schedule notebook
# runs the cell's schedule. Adam betas 0.9/0.999 in both.
SFT = dict(
    max_steps=300, learning_rate=2e-5, sft_schedule="constant", adam_b1=0.9, adam_b2=0.999,
    weight_decay=0.01, max_grad_norm=1.0,
    batch_size=2,                    # micro batch
    gradient_accumulation_steps=8,   # -> 16 sequences per optimizer step
    max_seq_length=1024,
    max_tokens_to_generate=512,      # of the greedy samples that check the format at the end (0: none)
)
GRPO_ONLY = ("num_generations", "num_iterations", "beta", "epsilon", "kl_loss_mode", "loss_agg_mode",
             "max_prompt_length", "kv_cache_size", "temperature", "top_p", "top_k", "lr_init", "warmup_ratio",
             "lr_end_ratio", "data_order")

NOT_PUBLISHED = ("logps_chunk_size", "remat")  # memory settings: they change how, not what, is computed
PUBLISHED_SCHEDULE = ("soft", "medium", "soft", "soft")   # the penalty level of GRPO block 1, 2, 3, 4
PHASES = ("sft", "grpo", "format", "correctness", "generalize")
GSM8K_SLICE = {"slice_start": 0.0, "slice_end": 0.25}     # seed 002: "a random 20-30% slice"

# --phase curriculum --preset: the whole journey at a size (flags on the command line win). Every
# preset evaluates the base model first, then each block, greedy, on the builtin eval split.
PRESETS = {
    # The published journey: gemma-3-1b-it, published steps and settings, 50 vignettes x 512 tokens.
    "paper": {"schedule": "sft,soft,medium,soft,soft", "grpo": {}, "sft": {},
              "eval": {"n": 50, "max_new_tokens": 512, "batch_size": 8}},
    # The same journey on the embedded 270M, sized for one accelerator (bf16 by --dtype auto).
    "gpu": {"schedule": "sft,soft,medium,soft,soft", "grpo": {"model": "gemma-3-270m"},
            "sft": {"model": "gemma-3-270m"}, "eval": {"n": 50, "max_new_tokens": 512, "batch_size": 25}},
    # 2 CPU cores, ~20 minutes, ~12 GB: base vs SFT shows SFT teaching the format; one short soft
    # block shows GRPO groups whose rewards differ. What differs from the published settings, and why
    # (README, "CPU quickstart"): SFT 12 steps at 2e-4 (a few LoRA steps must move further than 300 at
    # 2e-5; 10 steps did not yet give one grounded proof) on the vignettes that fit 768 tokens, 2 per
    # step as micro batches of 1 (micro batch 2 also fits, but took longer and gave a worse table here);
    # GRPO 2 steps with G=2 (G=4 peaked at 17 GB here), prompts cut to 768 tokens, 160 new tokens; 6 eval
    # vignettes x 256 tokens (a complete answer: golds are 116-287 tokens). The SFT evaluation shows
    # the format, so no samples after SFT. Both blocks without remat: XLA:CPU drops its barriers, so
    # here it saves no memory and only costs time.
    "cpu": {"schedule": "sft,soft",
            "sft": {"model": "gemma-3-270m", "max_steps": 12, "learning_rate": 2e-4, "batch_size": 1,
                    "gradient_accumulation_steps": 2, "max_seq_length": 768, "max_tokens_to_generate": 0,
                    "save_every": 12, "remat": "none"},
            "grpo": {"model": "gemma-3-270m", "max_steps": 2, "num_generations": 2, "max_prompt_length": 768,
                     "max_tokens_to_generate": 160, "kv_cache_size": 1024, "save_every": 2,
                     "remat": "none"},
            "eval": {"n": 6, "max_new_tokens": 256, "batch_size": 6}},
}


def phase_defaults(phase: str) -> dict:
    if phase == "sft":
        return {**{k: v for k, v in GRPO.items() if k not in GRPO_ONLY}, **SFT}
    return {**GRPO, **(GSM8K_SLICE if phase == "format" else {})}


def lr_schedule(config: dict) -> dict:
    """The learning-rate schedule of this block, as optax.warmup_cosine_decay_schedule's arguments."""
    steps, peak = config["max_steps"], config["learning_rate"]
    if config["phase"] != "sft":
        return {"init": config["lr_init"], "peak": peak, "warmup_steps": int(config["warmup_ratio"] * steps),
                "decay_steps": steps, "end": config["lr_end_ratio"] * peak}
    if config["sft_schedule"] == "notebook":
        return {"init": 0.0, "peak": peak, "warmup_steps": min(25, steps - 1), "decay_steps": steps, "end": 0.1 * peak}
    return {"init": peak, "peak": peak, "warmup_steps": 0, "decay_steps": steps, "end": peak}


# ================================================================================================
# The GRPO block: model -> data -> reward -> cluster -> learner -> train
# ================================================================================================

def build_grpo(config: dict, run_dir: Path, reward_fns=None) -> dict:
    """Everything a GRPO block (or GSM8K phase) hands to Tunix, built from its configuration.
    reward_fns replaces the phase's rewards (tests use a scripted one)."""
    from tunix.perf import export as perf_export
    from tunix.perf import metrics as perf_metrics
    from tunix.rl import rl_cluster as rl
    from tunix.rl.grpo import grpo_learner
    from tunix.rl.rollout import base_rollout

    import grpo_loss
    import model as model_lib

    # Model: the policy continues the previous block; the reference is that same start, frozen.
    policy, tokenizer, mesh = load_policy(config)
    reference = frozen_reference(policy)

    # Data: one prompt per step, the same seeded order in every block (--data-order).
    rows = fit_prompts(load_rows(config), tokenizer, config["max_prompt_length"])
    log.info("GRPO on %d prompts of %s; model %s, %s", len(rows), runs.dataset_id(config), config["model"], config["dtype"])

    # Reward: the environment's score of each completion, at this block's penalty level.
    outcomes = []
    reward_fns = reward_fns or reward_functions(config, outcomes)

    # Cluster: actor, reference and rollout share one mesh; Tunix times each part of a step.
    schedule = learning_rate_schedule(config)
    metrics = runs.MetricsLog(run_dir, config, schedule, complete_keys=(
        "actor/loss", "actor/kl", "perf/global_step_time", "perf/sum/rollout_time",
        "perf/sum/refer_inference_time", "perf/sum/actor_train_time"))
    training = rl.RLTrainingConfig(
        actor_optimizer=make_optimizer(config, schedule),
        max_steps=config["max_steps"],
        eval_every_n_steps=10 ** 9,  # evaluation is eval.py's job
        mini_batch_size=config["batch_size"], train_micro_batch_size=config["batch_size"],
        metrics_logging_options=metrics.options(run_dir),
        **runs.checkpointing(config, run_dir / "checkpoints"),
    )
    rollout = base_rollout.RolloutConfig(
        max_tokens_to_generate=config["max_tokens_to_generate"], max_prompt_length=config["max_prompt_length"],
        kv_cache_size=config["kv_cache_size"], temperature=config["temperature"], top_p=config["top_p"],
        top_k=config["top_k"], eos_tokens=[tokenizer.eos_id(), model_lib.end_of_turn_id(tokenizer)],
    )
    cluster_config = rl.ClusterConfig(
        role_to_mesh={rl.Role.ACTOR: mesh, rl.Role.REFERENCE: mesh, rl.Role.ROLLOUT: mesh},
        rollout_engine="vanilla", offload_to_cpu=False, training_config=training, rollout_config=rollout)
    perf = perf_metrics.PerfMetricsConfig(custom_export_fn=perf_export.PerfMetricsExport.from_cluster_config(cluster_config))
    cluster = rl.RLCluster(actor=policy, reference=reference, tokenizer=tokenizer, cluster_config=cluster_config,
                           perf_config=perf)

    # Learner: GRPO with the published loss (see GRPO above for kl_loss_mode and loss_agg_mode).
    algo = grpo_learner.GRPOConfig(num_generations=config["num_generations"], num_iterations=config["num_iterations"],
                                   beta=config["beta"], epsilon=config["epsilon"], kl_loss_mode=config["kl_loss_mode"],
                                   loss_agg_mode=config["loss_agg_mode"])
    learner = grpo_learner.GRPOLearner(
        rl_cluster=cluster, algo_config=algo, reward_fns=reward_fns,
        metric_fns=[step_metrics(config, outcomes, metrics, current_step=lambda: cluster.global_steps + 1)])
    if config["logps_chunk_size"]:  # the same loss, without the full-vocabulary logits (grpo_loss.py)
        grpo_loss.use_chunked_logps(learner, chunk_size=config["logps_chunk_size"], remat=config["remat"])
    return dict(learner=learner, cluster=cluster, training=training, rows=rows, metrics=metrics)


def run_grpo(config: dict, run_dir: Path, stop_after: int | None = None) -> int:
    """Train one GRPO block into run_dir; returns the last global step completed."""
    grpo = build_grpo(config, run_dir)
    cluster, training, metrics = grpo["cluster"], grpo["training"], grpo["metrics"]
    # The trainer restored its step if RUN_DIR/checkpoints/actor holds one (a resume).
    done = cluster.actor_trainer.train_steps
    cluster.global_steps = done
    if done:
        log.info("resuming at global step %d (checkpoint %d of this block)", config["start_step"] + done, done)
    metrics.start(done)

    stopper = runs.StopRequest(on_stop=lambda: setattr(training, "max_steps", 0))  # Tunix saves on its way out
    cluster.actor_trainer.with_training_hooks(runs.stop_hooks(stopper, config, stop_after))
    with stopper:
        # On a resume Tunix fast-forwards past the batches its checkpoint already trained on.
        grpo["learner"].train(batches(grpo["rows"], config["batch_size"], config["seed"], start_position(config)))
    metrics.finish()
    return config["start_step"] - 1 + cluster.actor_trainer.train_steps


# ================================================================================================
# The SFT block: Tunix's PeftTrainer, LoRA, loss on the response tokens only
# ================================================================================================

def sft_batches(rows, tokenizer, config):
    """Endless micro-batches of TrainingInput: <bos> prompt response, padded to max_seq_length, with
    input_mask 1 on the response tokens only (the loss ignores the prompt). The published data fits
    1,024 tokens; with a smaller --max-seq-length the longer rows are left out."""
    import numpy as np
    from tunix.sft import peft_trainer

    length, pad = config["max_seq_length"], tokenizer.pad_id()
    encoded = []
    for r in rows:  # a row that does not fit is left out, never cut: its quotes live in its context
        prompt, answer = tokenizer.encode(r["prompt"]), tokenizer.encode(r["completion"])
        if 1 + len(prompt) + len(answer) <= length:
            ids, mask = [tokenizer.bos_id()] + prompt + answer, [0] * (1 + len(prompt)) + [1] * len(answer)
            encoded.append((ids + [pad] * (length - len(ids)), mask + [0] * (length - len(mask))))
    if len(encoded) < len(rows):
        log.warning("SFT: %d of %d examples are longer than --max-seq-length %d tokens and are left out",
                    len(rows) - len(encoded), len(rows), length)
    if not encoded:
        sys.exit(f"error: no SFT example fits --max-seq-length {length}; raise it")
    for batch in batches([{"i": i} for i in range(len(encoded))], config["batch_size"], config["seed"]):
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


def sft_loss(model, input_tokens, input_mask, positions, attention_mask, chunk_size: int, remat: str):
    """Tunix's SFT loss, the mean negative log-likelihood of the response tokens (input_mask 1), without
    its full-vocabulary logits: PeftTrainer's default builds float32 logits, their log-softmax and a
    one-hot target, each [batch, length, 262,144] (2.1 GB apiece at the published batch 2 x 1,024).
    Here: the hidden states, then log p(next token) a chunk of positions at a time, for the response's
    positions only (the vocabulary projection of the prompt and padding is skipped), and the backward
    pass recomputing each decoder layer (--remat) -- grpo_loss.py's pieces. The same value as Tunix's
    (test_sft_loss_matches_tunix), with log-softmax in float32 where Tunix uses the logits' dtype."""
    import jax.numpy as jnp

    import grpo_loss

    model = grpo_loss.rematerialized(model, remat)
    hidden = grpo_loss.hidden_states(model, input_tokens, positions, attention_mask)[:, :-1]
    mask = input_mask[:, 1:].astype(jnp.float32)  # position t predicts token t+1; only these are computed
    logps = grpo_loss.chunked_token_logps(model.embedder.decode, hidden, input_tokens[:, 1:], chunk_size, mask=mask)
    return -(logps * mask).sum() / (mask.sum() + 1e-8)


def sft_trainer(policy, config: dict, training, schedule):
    """Tunix's PeftTrainer for the LoRA policy: our optimizer, inputs and (--logps-chunk-size) loss."""
    from tunix.sft import peft_trainer

    trainer = peft_trainer.PeftTrainer(policy, make_optimizer(config, schedule), training)
    trainer = trainer.with_gen_model_input_fn(sft_model_inputs)
    if config["logps_chunk_size"]:  # the same loss, without the full-vocabulary logits
        chunk_size, remat = config["logps_chunk_size"], config["remat"]

        # Tunix passes the inputs by name, and nnx.value_and_grad needs them as named parameters.
        def loss(model, input_tokens, input_mask, positions, attention_mask):
            return sft_loss(model, input_tokens, input_mask, positions, attention_mask, chunk_size, remat)

        trainer = trainer.with_loss_fn(loss)
    return trainer


def run_sft(config: dict, run_dir: Path, stop_after: int | None = None) -> int:
    from tunix.sft import peft_trainer

    import model as model_lib

    policy, tokenizer, mesh = load_policy(config)
    rows = load_rows(config)
    log.info("SFT on %d examples of %s; model %s, %s", len(rows), runs.dataset_id(config), config["model"], config["dtype"])
    accumulation = config["gradient_accumulation_steps"]
    schedule = learning_rate_schedule(config)
    metrics = runs.MetricsLog(run_dir, config, schedule)
    training = peft_trainer.TrainingConfig(
        max_steps=config["max_steps"], eval_every_n_steps=10 ** 9, gradient_accumulation_steps=accumulation,
        metrics_logging_options=metrics.options(run_dir), **runs.checkpointing(config, run_dir / "checkpoints"))
    # PeftTrainer reads the mesh from the `with mesh:` context, which jax now calls deprecated.
    with warnings.catch_warnings(action="ignore", category=DeprecationWarning), mesh:
        trainer = sft_trainer(policy, config, training, schedule)
        done = trainer.train_steps  # > 0 when resuming: Tunix restored the checkpoint
        metrics.start(done)

        def stop():  # finish the optimizer step under way (all its micro-batches), then stop
            training.max_steps = min(training.max_steps, trainer.train_steps + 1)

        stopper = runs.StopRequest(on_stop=stop)
        trainer.with_training_hooks(runs.stop_hooks(stopper, config, stop_after, sft_metrics=metrics))
        with stopper:
            trainer.train(sft_batches(rows, tokenizer, config))  # on a resume Tunix fast-forwards
        metrics.finish()
        if trainer.train_steps >= config["max_steps"] and config["max_tokens_to_generate"]:
            # Greedy samples after SFT: does the model now write <think>, <proof> and <answer>?
            outs = model_lib.generate(policy, tokenizer, [r["prompt"] for r in rows[:4]],
                                      max_new_tokens=config["max_tokens_to_generate"], progress=False)
            ok = sum(all(f"<{t}>" in o["text"] and f"</{t}>" in o["text"] for t in ("think", "proof", "answer")) for o in outs)
            print(f"format adherence after SFT: {ok}/{len(outs)} greedy samples contain <think>, <proof> and <answer>")
            print(f"first sample: {outs[0]['text'][:600]!r}")
    return config["start_step"] - 1 + trainer.train_steps


# ================================================================================================
# Data: prompts in a seeded order
# ================================================================================================

def load_rows(config: dict) -> list[dict]:
    """Training rows of the phase: {"prompts": chat prompt, "answer": what the reward needs}
    (SFT: {"prompt", "completion"})."""
    import data

    n = config["n_prompts"]
    if config["phase"] in ("sft", "grpo"):
        rows = data.load_dipg(config["dataset"], "train", n=n, seed=config["seed"] if config["dataset"] == "builtin" else 0)
        return [(data.to_sft_example if config["phase"] == "sft" else data.to_grpo_example)(r) for r in rows]
    if config["phase"] == "generalize":
        items = gsm8k.load_mixed(n or 2000, seed=config["seed"], gsm_source=config["dataset"])
    else:
        items = gsm8k.load_gsm8k(config["dataset"], "train", seed=config["seed"])
        if config["phase"] == "format":
            items = list(gsm8k.iterable_slice(items, config["slice_start"], config["slice_end"]))
        items = items[:n]
    return [{"prompts": gsm8k.gsm8k_prompt(it["question"]), "answer": it["answer"]} for it in items]


def start_position(config: dict) -> int:
    """Where in the prompt order this block starts (in prompts), by --data-order."""
    if config.get("data_order") == "continue":
        return (config["start_step"] - 1) * config["batch_size"]
    return 0


def batches(rows: list[dict], batch_size: int, seed: int, start_position: int = 0):
    """Endless batches in a seeded order, from `start_position` (in prompts) on. Tunix wants each
    batch as a dict of numpy arrays: it repeats every array G times along axis 0 to make the groups."""
    import numpy as np

    order = np.random.default_rng(seed).permutation(len(rows))
    position = start_position
    while True:
        picked = [rows[order[(position + i) % len(rows)]] for i in range(batch_size)]
        yield {key: np.array([str(r[key]) for r in picked]) for key in picked[0]}
        position += batch_size


def fit_prompts(rows: list[dict], tokenizer, max_prompt_length: int) -> list[dict]:
    """Make every prompt fit in max_prompt_length tokens (with the <bos> the sampler adds): Tunix's
    sampler does not cut long prompts. We drop the middle (the context), keeping the instructions
    and the question; the reward still sees the whole context."""
    budget, cut, out = max_prompt_length - 1, 0, []
    for row in rows:
        ids = tokenizer.encode(row["prompts"])
        if len(ids) > budget:
            cut, keep = cut + 1, budget - 4  # decode/encode round trips can add a token or two
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


def example_hash(answer: str) -> str:
    import hashlib

    return hashlib.sha1(str(answer).encode()).hexdigest()[:10]


# ================================================================================================
# Model: base weights + LoRA; the reference is the policy as the block starts, frozen
# ================================================================================================

def load_policy(config: dict):
    """(policy with LoRA, tokenizer, mesh). From --init-from: that run's LoRA weights restored."""
    import model as model_lib

    axes = runs.mesh_axes(config["mesh"])
    try:
        mesh = model_lib.make_mesh(axes["fsdp"], axes["tp"])
        base, tokenizer, _ = model_lib.load(config["model"], model_path=config["model_path"], mesh=mesh,
                                            dtype=config["dtype"], seed=config["seed"])
    except model_lib.WeightsUnavailable as e:
        hint = " -- on this machine, run the embedded model instead: --model gemma-3-270m" if config["model"] != "gemma-3-270m" else ""
        sys.exit(f"error: {e}{hint}")
    except (ValueError, FileNotFoundError) as e:  # e.g. --model-path holds another model, a mesh too big
        sys.exit(f"error: --model {config['model']} --mesh {config['mesh']}: {e}")
    policy = model_lib.apply_lora(base, rank=config["lora_rank"], alpha=config["lora_alpha"], mesh=mesh, seed=config["seed"])
    if config["init_from"]:
        run_dir = Path(config["init_from"])
        try:
            step, _ = model_lib.restore_checkpoint(run_dir, policy, checkpoint_dir=runs.read_metadata(run_dir)["checkpoint_dir"])
        except (FileNotFoundError, ValueError) as e:
            sys.exit(f"error: --init-from {run_dir}: {e}")
        log.info("restored the LoRA weights of %s (its checkpoint %d)", run_dir, step)
    return policy, tokenizer, mesh


def frozen_reference(policy):
    """The KL anchor: the policy as it is now, frozen. nnx.merge builds a second module around the
    SAME backbone arrays (no copy; Tunix sees they are shared) plus a copy of the small LoRA arrays,
    which the optimizer never touches. Each block anchors to the weights it started from."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, lora, backbone = nnx.split(policy, nnx.LoRAParam, ...)
    return nnx.merge(graphdef, jax.tree.map(jnp.copy, lora), backbone)


# ================================================================================================
# Optimizer: clip, then AdamW on the block's schedule
# ================================================================================================

def learning_rate_schedule(config: dict):
    """The block's schedule (config["lr_schedule"], as --print-config shows it); every block restarts it."""
    import optax

    s = config["lr_schedule"]
    return optax.warmup_cosine_decay_schedule(init_value=s["init"], peak_value=s["peak"], warmup_steps=s["warmup_steps"],
                                              decay_steps=s["decay_steps"], end_value=s["end"])


def make_optimizer(config: dict, schedule):
    """clip_by_global_norm, then AdamW, on the block's schedule. inject_hyperparams keeps the values
    in the optimizer state, so what Tunix runs can be read back (and Tunix logs the learning rate)."""
    import optax

    def clipped_adamw(learning_rate, b1, b2, weight_decay, max_grad_norm):
        return optax.chain(optax.clip_by_global_norm(max_grad_norm),
                           optax.adamw(learning_rate, b1=b1, b2=b2, weight_decay=weight_decay))

    return optax.inject_hyperparams(clipped_adamw)(
        learning_rate=schedule, b1=config["adam_b1"], b2=config["adam_b2"], weight_decay=config["weight_decay"],
        max_grad_norm=config["max_grad_norm"])


# ================================================================================================
# Rewards: plain functions of (prompts, completions, answer); Tunix sums them per completion
# ================================================================================================

OUTCOMES = rewards.OUTCOME_LABELS  # what a completion did, as the reward ladder decided it


def reward_functions(config: dict, outcomes: list) -> list:
    """DIPG: the environment's reward at the block's penalty level; each completion's scorer metrics
    land in `outcomes` (scored once: step_metrics counts them). GSM8K: the phase's reward list."""
    if config["phase"] == "grpo":
        return [rewards.make_dipg_reward(config["penalty"], outcomes=outcomes)]
    return list(gsm8k.PHASE_REWARDS[config["phase"]])


def step_metrics(config: dict, outcomes: list, metrics_log, current_step):
    """A Tunix metric function: what the completions of a step did. Tunix logs the returned scalars
    with the step's rewards (so they reach metrics.jsonl and TensorBoard)."""
    import numpy as np

    def metrics(prompts, completions, rewards, answer=None, **_):
        step = current_step()
        scores = np.asarray(rewards, dtype=float).reshape(-1, config["num_generations"])
        out = {"step/reward_std": float(np.std(scores, ddof=1)) if scores.size > 1 else 0.0,
               # a group whose rewards all tie has zero advantage: it teaches nothing
               "step/groups_with_spread": float(np.mean(scores.std(axis=1) > 0)),
               "step/n_completions": len(completions)}
        if config["phase"] == "grpo":
            scored, outcomes[:] = list(outcomes), []
            for name in OUTCOMES:
                out[f"step/{name}"] = sum(s["outcome"] == name for s in scored)
            out["step/abstention"] = sum(s["abstained"] for s in scored)
            out["step/refusal"] = sum(s["refusal"] for s in scored)
        else:
            out.update({f"step/{k}": v for k, v in gsm8k_counts(completions, answer).items()})
        # Which prompts the step trained on (a hash of each row's answer), and now and then a sample.
        metrics_log.extras[step] = {"examples": list(dict.fromkeys(example_hash(a) for a in answer))}
        if config["sample_every"] and (config["start_step"] - 1 + step) % config["sample_every"] == 0:
            metrics_log.text(f"completion (reward {scores.flat[0]:.2f})", str(completions[0]), step)
        return {k: (v, np.mean) for k, v in out.items()}

    return metrics


def gsm8k_counts(completions, answers) -> dict:
    m = gsm8k.phase_metrics([str(c) for c in completions], [str(a) for a in answers])
    n = len(completions)
    return {"format_error": round((1 - m["format_rate"]) * n), "refusal": round(m["refusal_rate"] * n),
            "answer_extraction_rate": m["answer_extraction_rate"], "accuracy": m["accuracy"],
            "mean_length_chars": m["mean_length"]}


def resolve_config(args, parser, init_meta=None) -> dict:
    """The flat configuration of one block: flags over the published defaults of its phase."""
    return runs.resolve_config(sys.modules[__name__], args, parser, init_meta)


def train_block(config: dict, run_dir: Path, stop_after: int | None = None) -> int:
    return (run_sft if config["phase"] == "sft" else run_grpo)(config, run_dir, stop_after)


# ================================================================================================
# Command line
# ================================================================================================

def main(argv=None) -> int:
    args, parser = runs.parse_args(sys.modules[__name__], argv)
    runs.setup_logging()
    runs.join_processes()  # a multi-host launch: every process joins before JAX touches a device
    if args.phase == "curriculum":  # every block of the journey, each evaluated (eval.py)
        from eval import PUBLISHED  # the seed's table, plotted beside ours when the journey is the paper's

        return runs.run_curriculum(args, parser, resolve_config, train_block, PRESETS[args.preset],
                                   levels=tuple(rewards.PENALTIES),
                                   published=PUBLISHED if args.preset == "paper" else None)
    if args.resume:
        run_dir, config = runs.reopen_run_dir(args.out, args.phase, parser)
    else:
        init_meta = runs.load_init_run(args.init_from) if args.init_from else None
        config = resolve_config(args, parser, init_meta)
        runs.check_phase_rules(config, init_meta, args.force)
        if args.print_config:
            print(json.dumps(config))
            return 0
        config["sample_every"] = args.sample_every
        run_dir = runs.prepare_run_dir(args.out, config, init_meta, overwrite=args.overwrite)
    log.info("%s block: global steps %d-%d into %s; model %s; data %s", config["phase"], config["start_step"],
             config["end_step"], run_dir, config["model"], runs.dataset_id(config))
    try:
        runs.run_block(train_block, config, run_dir, stop_after=args.stop_after)
    except SystemExit:
        if not args.resume:
            runs.remove_if_empty_run(run_dir)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
