"""The GRPO block: model -> data -> reward -> cluster -> learner -> train, with Tunix (README section 4).

Each step samples G completions of ONE prompt, scores them with the DIPG Safety Gym reward at the block's penalty
level, and moves the LoRA policy towards those beating the group mean, KL-leashed to the block's starting weights.
Tunix does the mechanics; grpo_loss.py the log-probs. Settings: train.py's GRPO dict; seed 002's GSM8K phases use
this block too (gsm8k.py). Pieces in `build`'s order; sft.py shares the policy and the optimizer.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import data
import gsm8k
import rewards as rewards_lib
import runs

log = logging.getLogger("train")

# ---- The pieces: policy, reference, rows, optimizer, rewards ----

def load_policy(config: dict):
    """(policy with LoRA, tokenizer, mesh). From --init-from: that run's LoRA weights restored."""
    import model as model_lib

    axes = runs.mesh_axes(config["mesh"])
    whole_batch_on_every_process()
    try:
        mesh = model_lib.make_mesh(axes["fsdp"], axes["tp"])
        base, tokenizer, _ = model_lib.load(config["model"], model_path=config["model_path"], mesh=mesh,
                                            dtype=config["dtype"], seed=config["seed"])
    except model_lib.WeightsUnavailable as e:
        hint = " -- on this machine, run the embedded model instead: --model gemma-3-270m" if config["model"] != "gemma-3-270m" else ""
        sys.exit(f"error: {e}{hint}")
    except (ValueError, FileNotFoundError) as e:  # e.g. --model-path holds another model, a mesh too big
        sys.exit(f"error: --model {config['model']} --mesh {config['mesh']}: {e}")
    policy = model_lib.apply_lora(base, rank=config["lora_rank"], alpha=config["lora_alpha"], mesh=mesh,
                                  seed=config["seed"], dtype=config["lora_dtype"])
    if config["init_from"]:
        run_dir = Path(config["init_from"])
        try:
            step, _ = model_lib.restore_checkpoint(run_dir, policy, checkpoint_dir=runs.read_metadata(run_dir)["checkpoint_dir"])
        except (FileNotFoundError, ValueError) as e:
            sys.exit(f"error: --init-from {run_dir}: {e}")
        log.info("restored the LoRA weights of %s (its checkpoint %d)", run_dir, step)
    return policy, tokenizer, mesh


def whole_batch_on_every_process() -> None:
    """Several processes: Tunix's shard_input takes each process's batch as its part of the global batch (each row
    counted once per process). Here each holds the whole batch (runs.check_inputs_agree) and places its devices' rows."""
    import jax
    from jax.interpreters import pxla
    from jax.sharding import PartitionSpec
    from tunix.sft import sharding_utils

    def place(x, axis):
        mesh = pxla.thread_resources.env.physical_mesh
        def one(a):  # split as Tunix splits one process's batch
            if not hasattr(a, "shape") or isinstance(a, jax.Array) and not a.is_fully_addressable:
                return a
            a = jax.device_get(a)
            return jax.make_array_from_callback(a.shape, sharding_utils.get_sharding(a, mesh, PartitionSpec(*axis)),
                                                lambda index: a[index])
        return x if mesh.empty else jax.tree.map(one, x)

    if jax.process_count() > 1:
        sharding_utils.shard_input = place


def frozen_reference(policy):
    """The KL anchor: the policy as it is now, frozen; nnx.merge shares the SAME backbone arrays (no copy) plus a
    copy of the small LoRA arrays. Each block anchors to the weights it started from."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, lora, backbone = nnx.split(policy, nnx.LoRAParam, ...)
    return nnx.merge(graphdef, jax.tree.map(jnp.copy, lora), backbone)


def load_rows(config: dict) -> list[dict]:
    """The block's training rows, read and checked before the model loads: DIPG vignettes (data.py; GRPO:
    {"prompts", "answer": what the reward needs}, SFT: {"prompt", "completion"}), or seed 002's GSM8K phases."""
    if config["phase"] in ("sft", "grpo"):
        return data.training_examples(config["phase"], config["dataset"], config["n_prompts"], config["seed"],
                                      config["system_prompt"])
    return gsm8k.training_rows(config["phase"], config["dataset"], config["seed"], config["n_prompts"],
                               config.get("slice_start", 0.0), config.get("slice_end", 1.0))


def make_optimizer(config: dict):
    """clip_by_global_norm, then AdamW, on the block's schedule (config["lr_schedule"]). inject_hyperparams
    keeps the values in the optimizer state, so what Tunix runs can be read back (and Tunix logs the rate)."""
    import optax

    s = config["lr_schedule"]
    schedule = optax.warmup_cosine_decay_schedule(init_value=s["init"], peak_value=s["peak"], end_value=s["end"],
                                                  warmup_steps=s["warmup_steps"], decay_steps=s["decay_steps"])

    def clipped_adamw(learning_rate, b1, b2, weight_decay, max_grad_norm):
        return optax.chain(optax.clip_by_global_norm(max_grad_norm),
                           optax.adamw(learning_rate, b1=b1, b2=b2, weight_decay=weight_decay))

    # Adam's betas stay Python numbers, as in the published optax.adamw call: inject_hyperparams would cast them to
    # bfloat16, where b2 = 0.999 is 1.0 and adapters go NaN after one step (test_lora_precision.py).
    optimizer = optax.inject_hyperparams(clipped_adamw, static_args=("b1", "b2"))(
        learning_rate=schedule, b1=config["adam_b1"], b2=config["adam_b2"], weight_decay=config["weight_decay"],
        max_grad_norm=config["max_grad_norm"])
    return optimizer, schedule


def reward_functions(config: dict) -> list:
    """Plain functions fn(prompts, completions, answer) -> rewards; Tunix sums them per completion.
    DIPG: the environment's reward at the block's penalty level. GSM8K: the phase's list."""
    if config["phase"] == "grpo":
        return [rewards_lib.make_dipg_reward(config["penalty"])]
    return list(gsm8k.PHASE_REWARDS[config["phase"]])


def step_metrics(config: dict, metrics_log, current_step):
    """A Tunix metric function: what a step's completions did (DIPG: each outcome counted by rescoring, ~1 ms),
    logged with the step's rewards to metrics.jsonl and TensorBoard."""
    import numpy as np

    def metrics(prompts, completions, rewards, answer=None, **_):
        step = current_step()
        scores = np.asarray(rewards, dtype=float).reshape(-1, config["num_generations"])
        out = {"step/reward_std": float(np.std(scores, ddof=1)) if scores.size > 1 else 0.0,
               # a group whose rewards all tie has zero advantage: it teaches nothing
               "step/groups_with_spread": float(np.mean(scores.std(axis=1) > 0)),
               "step/n_completions": len(completions)}
        if config["phase"] == "grpo":
            scored = rewards_lib.score_batch(completions, answer, config["penalty"])
            out.update({f"step/{name}": sum(s["outcome"] == name for s in scored) for name in rewards_lib.OUTCOME_LABELS})
            out["step/abstention"] = sum(s["abstained"] for s in scored)
            out["step/refusal"] = sum(s["refusal"] for s in scored)
        kpis = {} if config["phase"] == "grpo" else gsm8k.step_counts(completions, answer)  # exit criteria read these
        out.update({f"step/{k}": v for k, v in kpis.items()})
        # Which rows the step trained on, and now and then a sample.
        metrics_log.extras[step] = {"examples": list(dict.fromkeys(data.example_id(a) for a in answer)), **kpis}
        if config["sample_every"] and (config["start_step"] - 1 + step) % config["sample_every"] == 0:
            metrics_log.text(f"completion (reward {scores.flat[0]:.2f})", str(completions[0]), step)
        return {k: (v, np.mean) for k, v in out.items()}

    return metrics


# ---- The block ----

def build(config: dict, run_dir: Path, reward_fns=None, new_run: dict | None = None) -> dict:
    """Everything a GRPO block (or GSM8K phase) hands to Tunix, built from its configuration.
    reward_fns replaces the phase's rewards (tests use a scripted one); new_run: runs.prepare_run_dir's metadata."""
    from tunix.perf import export as perf_export
    from tunix.perf import metrics as perf_metrics
    from tunix.rl import rl_cluster as rl
    from tunix.rl.grpo import grpo_learner
    from tunix.rl.rollout import base_rollout

    import grpo_loss
    import model as model_lib

    # Data, then model: the policy continues the previous block; the reference is that same start, frozen.
    rows = load_rows(config)
    policy, tokenizer, mesh = load_policy(config)
    reference = frozen_reference(policy)
    policy.prompt_group = config["num_generations"]  # the rollout prefills each prompt once (model._gemma3_call)
    if new_run is not None:  # every check passed: the run directory is (re)written
        runs.prepare_run_dir(run_dir, new_run)

    # One prompt per step, in the published order, from where the earlier blocks stopped.
    rows = data.fit_prompts(rows, tokenizer, config["max_prompt_length"])
    log.info("GRPO on %d prompts of %s from position %d; model %s, %s", len(rows), config["dataset"],
             config["data_start_position"], config["model"], config["dtype"])

    # Reward: the environment's score of each completion, at this block's penalty level.
    reward_fns = reward_fns or reward_functions(config)

    # Cluster: actor, reference and rollout share one mesh; Tunix times each part of a step.
    optimizer, schedule = make_optimizer(config)
    metrics = runs.MetricsLog(run_dir, config, schedule)
    training = rl.RLTrainingConfig(
        actor_optimizer=optimizer, max_steps=config["max_steps"],
        eval_every_n_steps=10 ** 9,  # evaluation is eval.py's job
        mini_batch_size=config["batch_size"], train_micro_batch_size=config["batch_size"],
        metrics_logging_options=metrics.options(run_dir),
        **runs.checkpointing(config, run_dir / "checkpoints"),
    )
    rollout = base_rollout.RolloutConfig(
        max_tokens_to_generate=config["max_tokens_to_generate"], max_prompt_length=config["max_prompt_length"],
        kv_cache_size=config["kv_cache_size"], temperature=config["temperature"], top_p=config["top_p"],
        top_k=config["top_k"], eos_tokens=[model_lib.token_id(tokenizer, t) for t in config["stop_tokens"]],
    )
    cluster_config = rl.ClusterConfig(
        role_to_mesh={rl.Role.ACTOR: mesh, rl.Role.REFERENCE: mesh, rl.Role.ROLLOUT: mesh},
        rollout_engine="vanilla", offload_to_cpu=False, training_config=training, rollout_config=rollout)
    perf = perf_metrics.PerfMetricsConfig(custom_export_fn=perf_export.PerfMetricsExport.from_cluster_config(cluster_config))
    with runs.restoring(run_dir / "checkpoints" / "actor"):  # a resume: Tunix restores the latest checkpoint
        cluster = rl.RLCluster(actor=policy, reference=reference, tokenizer=tokenizer, cluster_config=cluster_config,
                               perf_config=perf)

    # Tunix 0.1.7 copies the whole actor ("pinned_host") at every weight sync for agentic learners' old log-probs;
    # GRPOLearner never reads it, and on CPU it is a second copy of every weight (1.07 GB at 270M fp32): dropped.
    def sync_weights(sync=cluster.sync_weights):
        sync()
        cluster._anchor_policy_state = None
    grpo_loss._override(cluster, "sync_weights", sync_weights)
    cluster._anchor_policy_state = None

    # Learner: GRPO with the published loss (see GRPO above for kl_loss_mode and loss_agg_mode).
    algo = grpo_learner.GRPOConfig(num_generations=config["num_generations"], num_iterations=config["num_iterations"],
                                   beta=config["beta"], epsilon=config["epsilon"], kl_loss_mode=config["kl_loss_mode"],
                                   loss_agg_mode=config["loss_agg_mode"])
    learner = grpo_learner.GRPOLearner(
        rl_cluster=cluster, algo_config=algo, reward_fns=reward_fns,
        metric_fns=[step_metrics(config, metrics, current_step=lambda: cluster.global_steps + 1)])
    if config["logps_chunk_size"]:  # the same loss, without the full-vocabulary logits (grpo_loss.py)
        grpo_loss.use_chunked_logps(learner, chunk_size=config["logps_chunk_size"], remat=config["remat"])
    runs.rows_before_checkpoints(metrics, cluster.actor_trainer, cluster)  # a killed run keeps every step's row
    batches = data.prompt_order(rows, config["batch_size"], config["shuffle_seed"], config["data_start_position"])
    runs.check_inputs_agree(config, [batches[i] for i in range(config["max_steps"])], config["start_step"])
    return dict(learner=learner, cluster=cluster, training=training, rows=rows, batches=batches, metrics=metrics)


def run(config: dict, run_dir: Path, stop_after: int | None = None, new_run: dict | None = None) -> int:
    """Train one GRPO block into run_dir; returns the last global step completed."""
    block = build(config, run_dir, new_run=new_run)
    cluster, training, metrics = block["cluster"], block["training"], block["metrics"]
    # The trainer restored its step if RUN_DIR/checkpoints/actor holds one (a resume).
    done = cluster.actor_trainer.train_steps
    cluster.global_steps = done
    if done:
        log.info("resuming at global step %d (checkpoint %d of this block)", config["start_step"] + done, done)
    metrics.start(done)

    stopper = runs.StopRequest(on_stop=lambda: setattr(training, "max_steps", 0))  # Tunix saves on its way out
    # A GSM8K phase ends as soon as its exit criteria hold over the window (seed 002), its steps so far included.
    criteria_met = config.get("exit_window") and (lambda: gsm8k.exit_criteria(
        metrics.kept + [metrics.extras[s] for s in sorted(metrics.extras)], config)["met"])
    cluster.actor_trainer.with_training_hooks(runs.stop_hooks(stopper, config, stop_after, until=criteria_met or None))
    with stopper:
        block["learner"].train(block["batches"])  # on a resume Tunix fast-forwards past the batches done
    metrics.finish()
    return config["start_step"] - 1 + cluster.actor_trainer.train_steps
