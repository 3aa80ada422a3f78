"""What Tunix runs in a GRPO block, and proof that it learns (issue 9).

The configuration tests look at the objects train.build_grpo hands to Tunix (the GRPOConfig, the
optimizer inside Tunix's trainer), not at what we print. The learning tests train the `tiny` model
for a few real GRPO steps in this process:

  test_grpo_learns                  a scripted reward that prefers completions starting with a Latin
                                    letter makes such a start more likely; a constant reward does not.
  test_kl_pulls_towards_reference   with zero advantages (a constant reward) the published KL
                                    (low_var_kl) leaves the policy where the reference is; Tunix
                                    0.1.7's default "kl" pushes the sampled tokens down.
"""

from pathlib import Path

import jax
import numpy as np
import pytest
from jax._src.dispatch import JAXPR_TO_MLIR_MODULE_EVENT  # the event JAX records when it lowers a new program

import runs
import train

TINY = ["--model", "tiny", "--lora-rank", "8", "--lora-alpha", "8", "--sample-every", "0"]


def block_config(*flags, init_from=None):
    args, parser = runs.parse_args(train, ["--phase", "grpo", *TINY, *flags] + (["--init-from", str(init_from)] if init_from else []))
    config = train.resolve_config(args, parser, runs.load_init_run(init_from) if init_from else None)
    config["sample_every"] = 0
    return config


def hyperparams(state):
    """inject_hyperparams' values in an optimizer state (Tunix wraps ours in optax.MultiSteps)."""
    return getattr(state, "inner_opt_state", state).hyperparams


def learning_rates(optimizer, steps):
    """The learning rate the optimizer Tunix holds applies at each of its first `steps` updates,
    read from its own state while it updates a dummy parameter."""
    import jax.numpy as jnp

    tx, params = optimizer.tx, jnp.zeros(2)
    state, rates = tx.init(params), []
    for _ in range(steps):
        _, state = tx.update(jnp.ones(2), state, params)
        rates.append(float(hyperparams(state)["learning_rate"]))
    return rates


# ------------------------------------------------------------------------------------------------
# The published GRPO block, as Tunix receives it
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def published_block(tmp_path_factory):
    """Block 1 at the published settings (300 steps) on the tiny model, built but not trained."""
    config = block_config("--max-prompt-length", "64", "--kv-cache-size", "1024", "--n-prompts", "2")
    run_dir = runs.prepare_run_dir(tmp_path_factory.mktemp("runs") / "block1", config)
    return config, train.build_grpo(config, run_dir)


def test_tunix_runs_the_published_grpo_loss(published_block):
    _, grpo = published_block
    algo = grpo["learner"].algo_config
    assert (algo.kl_loss_mode, algo.loss_agg_mode) == ("low_var_kl", "token-mean")  # Tunix 0.1.3's loss
    assert (algo.beta, algo.epsilon, algo.num_generations, algo.num_iterations) == (0.08, 0.2, 4, 1)
    assert grpo["learner"].rl_cluster is grpo["cluster"]


def test_tunix_optimizer_is_the_published_adamw(published_block):
    _, grpo = published_block
    optimizer = grpo["cluster"].actor_trainer.optimizer
    hyper = {k: float(v) for k, v in hyperparams(optimizer.opt_state).items() if k != "learning_rate"}
    assert hyper == pytest.approx({"b1": 0.9, "b2": 0.999, "weight_decay": 0.1, "max_grad_norm": 0.1})
    rates = learning_rates(optimizer, 300)
    # warmup_cosine_decay_schedule(init 1e-8, peak 3e-6, warmup 30, decay 300, end 3e-7)
    assert rates[0] == pytest.approx(1e-8, rel=1e-4)          # first step
    assert rates[30] == pytest.approx(3e-6, rel=1e-4)         # end of warmup
    assert rates[299] == pytest.approx(3e-7, rel=1e-2)        # last step: 10% of the peak
    assert max(rates) == pytest.approx(3e-6, rel=1e-4)
    # The values are used, not only stored: Tunix's optimizer updates a parameter as the published
    # chain does, on gradients above and below the clip norm
    # (a dropped clip, or a stored value the chain ignores, moves it differently).
    import jax.numpy as jnp
    import optax

    published = optax.chain(optax.clip_by_global_norm(0.1), optax.adamw(
        optax.warmup_cosine_decay_schedule(1e-8, 3e-6, 30, 300, 3e-7), b1=0.9, b2=0.999, weight_decay=0.1))
    params = jnp.ones(3)
    ours, theirs, rng = optimizer.tx.init(params), published.init(params), np.random.default_rng(0)
    for scale in (10.0, 0.01, 1.0, 0.001, 5.0):
        grad = jnp.asarray(rng.normal(size=3) * scale, dtype=jnp.float32)
        (got, ours), (want, theirs) = optimizer.tx.update(grad, ours, params), published.update(grad, theirs, params)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4)  # float32 hyperparameters


def test_a_chained_block_restarts_schedule_and_prompt_order(tmp_path):
    """Reading (a) of REFERENCE: block 2 is a fresh run from block 1's final weights: the schedule
    warms up again, Adam starts from zero moments, and the prompts start from the first again."""
    small = ["--max-prompt-length", "64", "--kv-cache-size", "1024", "--n-prompts", "2"]
    # KL mode "kl" has a gradient at policy = reference even when the rewards tie (zero advantages),
    # so block 1 ends with Adam moments that block 2 could wrongly inherit.
    config1 = block_config(*small, "--steps", "1", "--num-generations", "2", "--max-tokens-to-generate", "4",
                           "--kl-loss-mode", "kl")
    run1 = runs.run_block(train.train_block, config1, runs.prepare_run_dir(tmp_path / "b1", config1))
    assert any(float(np.abs(m).max()) > 0.0 for m in _saved_adam_moments(run1))
    config2 = block_config(*small, "--penalty", "medium", init_from=run1)
    assert (config2["start_step"], config2["end_step"], config2["max_steps"]) == (2, 301, 300)
    grpo2 = train.build_grpo(config2, runs.prepare_run_dir(tmp_path / "b2", config2))
    optimizer = grpo2["cluster"].actor_trainer.optimizer
    assert int(optimizer.step.value) == 0
    assert all(float(np.abs(m).max()) == 0.0 for m in _adam_moments(optimizer.opt_state))
    rates = learning_rates(optimizer, 300)
    assert (rates[0], rates[30], rates[299]) == pytest.approx((1e-8, 3e-6, 3e-7), rel=1e-2)
    assert train.start_position(config2) == 0
    assert train.start_position(dict(config2, data_order="continue")) == 1


def _adam_moments(state):
    """Adam's moments (the leaves under a "mu" or "nu" key or field) in an optimizer state: the live
    one Tunix's trainer holds, or one restored from a checkpoint (nested dicts)."""
    def under_moment(path):
        return any(getattr(key, "name", getattr(key, "key", None)) in ("mu", "nu") for key in path)

    leaves = [np.asarray(x) for path, x in jax.tree_util.tree_leaves_with_path(state) if under_moment(path)]
    assert leaves, "no Adam state found"
    return leaves


def _saved_adam_moments(run_dir):
    """Adam's moments in the optimizer state of a run's newest Tunix checkpoint."""
    import orbax.checkpoint as ocp

    root = Path(run_dir) / runs.read_metadata(run_dir)["checkpoint_dir"]
    step = max(int(p.name) for p in root.iterdir() if p.name.isdigit())
    return _adam_moments(ocp.PyTreeCheckpointer().restore(str(root / str(step) / "optimizer_state")))


# ------------------------------------------------------------------------------------------------
# GRPO learns, and its KL term anchors to the reference
# ------------------------------------------------------------------------------------------------

def next_token_logprobs(model, tokenizer, prompt):
    """log p(first completion token | prompt) over the whole vocabulary."""
    import jax
    import jax.numpy as jnp
    from tunix.sft import utils

    tokens = jnp.array([[tokenizer.bos_id()] + tokenizer.encode(prompt)])
    mask = jnp.ones_like(tokens, dtype=bool)
    logits, _ = model(tokens, positions=utils.build_positions_from_mask(mask), cache=None,
                      attention_mask=utils.make_causal_attn_mask(mask))
    return np.asarray(jax.nn.log_softmax(logits[0, -1].astype(jnp.float32)))


def constant(prompts, completions, **_):
    return [1.0] * len(completions)


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """Three short GRPO runs of the tiny model from the same start (LoRA B = 0: policy = reference),
    one prompt, G = 8 one-token completions, the published beta: a scripted reward, a constant
    reward, and a constant reward under Tunix 0.1.7's default KL "kl".

    The scripted reward prefers half of the 50 tokens the rollout samples from (top_k = 50): those of
    even rank in the initial distribution. The random tiny model spreads its probability over the
    whole vocabulary, so a property must be a set of likely tokens for a few steps to show it."""
    root = tmp_path_factory.mktemp("learn")
    flags = ["--n-prompts", "1", "--num-generations", "8", "--max-tokens-to-generate", "1",
             "--max-prompt-length", "64", "--kv-cache-size", "128", "--steps", "4", "--save-every", "100",
             "--learning-rate", "0.01", "--lr-init", "0.01", "--warmup-ratio", "0", "--lr-end-ratio", "1"]
    preferred = set()

    def scripted(prompts, completions, **_):
        return [1.0 if str(c) in preferred else 0.0 for c in completions]

    out, lowered = {}, []
    for name, reward, mode in (("scripted", scripted, "low_var_kl"), ("constant", constant, "low_var_kl"),
                               ("constant_kl", constant, "kl")):
        config = block_config(*flags, "--kl-loss-mode", mode)
        grpo = train.build_grpo(config, runs.prepare_run_dir(root / name, config), reward_fns=[reward])
        policy, tokenizer = grpo["cluster"].actor_trainer.model, grpo["cluster"].tokenizer
        prompt = grpo["rows"][0]["prompts"]
        before = next_token_logprobs(policy, tokenizer, prompt)
        top50 = np.argsort(before)[::-1][:50]
        preferred.clear()
        preferred.update(tokenizer.decode([int(i)]) for i in top50[::2])
        cluster = grpo["cluster"]

        def on_lowering(event, seconds, fun_name="", **_):  # JAX turns a program into XLA: a new shape
            if event == JAXPR_TO_MLIR_MODULE_EVENT:
                lowered.append((name, fun_name, cluster.global_steps))

        jax.monitoring.register_event_duration_secs_listener(on_lowering)
        try:
            grpo["metrics"].start(0)
            grpo["learner"].train(train.batches(grpo["rows"], 1, config["seed"]))
            grpo["metrics"].finish()
        finally:
            try:
                jax.monitoring.unregister_event_duration_listener(on_lowering)
            except AssertionError:
                pass  # Tunix's logger clears every jax.monitoring listener when training ends
        out[name] = dict(before=before, after=next_token_logprobs(policy, tokenizer, prompt), top50=top50,
                         rows=runs.read_rows(root / name), lowered=[x[1:] for x in lowered if x[0] == name])
    return out


def test_grpo_learns(tiny_runs):
    def share(run, logp):  # probability of the preferred tokens among the initial top 50
        p = np.exp(logp)
        return p[run["top50"][::2]].sum() / p[run["top50"]].sum()

    scripted, constant_ = tiny_runs["scripted"], tiny_runs["constant"]
    assert any(r["groups_with_spread"] > 0 for r in scripted["rows"])  # the reward told completions apart
    assert share(constant_, constant_["after"]) == pytest.approx(share(constant_, constant_["before"]), abs=1e-4)
    gain = share(scripted, scripted["after"]) - share(scripted, scripted["before"])
    assert gain > 0.05, (share(scripted, scripted["before"]), share(scripted, scripted["after"]))


def test_kl_pulls_towards_reference(tiny_runs):
    """Zero advantages (a constant reward), policy starting AT the reference. low_var_kl's gradient
    there is zero: the reference's likely tokens keep their log-probs. "kl" (logp - ref, gradient
    beta * grad logp) pushes down whatever was sampled, wherever the reference is."""
    for name in ("constant", "constant_kl"):
        assert all(r["groups_with_spread"] == 0 for r in tiny_runs[name]["rows"])
    change = {name: float(np.mean(run["after"][run["top50"]] - run["before"][run["top50"]]))
              for name, run in tiny_runs.items() if name.startswith("constant")}
    assert change["constant"] > -1e-3, change     # no lower than they started
    assert change["constant_kl"] < -0.1, change   # pushed down


def test_each_step_reuses_the_compiled_programs(tiny_runs):
    """Issue 11: the rollout (prefill, decode loop), the log-prob pass and the train step are each
    compiled once, in the first step, and the later steps compile nothing (a weight update that
    changed a dtype or a sharding, or a prompt padded to a new length, would compile them again).
    (Small eager programs also appear once, e.g. the learning rate read from the schedule when
    step 1's metrics row is written, during step 2.)"""
    lowered = tiny_runs["scripted"]["lowered"]  # (program, cluster.global_steps when lowered), 4 steps
    for program in ("_prefill_fn", "_decode_fn", "_logps_no_grad", "_train_step"):
        assert [step for fun, step in lowered if program in fun] == [0], (program, lowered)
    assert [fun for fun, step in lowered if step == 3] == [], "the last step compiled"
