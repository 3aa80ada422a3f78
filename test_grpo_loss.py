"""Tests for grpo_loss.py on the real `tiny` Gemma 3 (full 262,144-token vocabulary) with qwix LoRA
and real Tunix objects.

* chunked per-token log-probs == Tunix 0.1.7's full-logits ``common.compute_per_token_logps``, for
  chunk sizes that divide B*T, that do not, and that exceed it; left-padded prompts, right-padded
  completions; on the LoRA policy (with non-zero adapters, so LoRA must be applied) and on the base;
  with the loss's mask, only the chunks holding counted positions run the vocabulary projection;
* loss and LoRA gradients == the published formula (Tunix 0.1.3's grpo_loss_fn) written out here
  on full-logits log-probs, with and without old-policy log-probs (ratio != 1, clipping active);
* the GRPOConfig decides: kl_loss_mode and loss_agg_mode change the loss;
* remat: the same loss and gradients, the policy's own modules untouched, and (in a child process
  that compiles as GPU/TPU compilers do) fewer activations kept for the backward pass;
* ``use_chunked_logps`` installs into a real RLCluster + GRPOLearner;
* the SFT loss built from the same pieces (sft.sft_loss) == Tunix's PeftTrainer default loss,
  values and LoRA gradients, and sft.sft_trainer hands it to a real PeftTrainer.
"""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from tunix.models.gemma3 import model as gemma3_lib
from tunix.rl import common
from tunix.rl import rl_cluster as rl
from tunix.rl.grpo import grpo_learner
from tunix.rl.rollout import base_rollout

import grpo
import grpo_loss as G
import model as M
import sft
import train

B, P, T = 3, 9, 7  # generations, prompt length (left-padded), completion length (right-padded)


@pytest.fixture(scope="module")
def tiny():
    """(base model, LoRA policy with random non-zero adapters, pad id)."""
    base, tokenizer, _ = M.load("tiny")
    policy = M.apply_lora(base, rank=4, alpha=4.0)
    # qwix starts lora_b at zero (the LoRA model == the base); make the adapters matter.
    lora = nnx.state(policy, nnx.LoRAParam)
    keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(lora))))
    nnx.update(policy, jax.tree.map(lambda x: 0.3 * jax.random.normal(next(keys), x.shape, x.dtype), lora))
    return base, policy, tokenizer.pad_id()


@pytest.fixture(scope="module")
def batch(tiny):
    """Left-padded prompts (row 0: 4 pads, row 1: 1), right-padded completions (row 0 ends after
    5 tokens, row 2 after 3), advantages, and reference log-probs near the policy's."""
    _, policy, pad = tiny
    rng = np.random.default_rng(0)
    prompt = rng.integers(5, 50_000, (B, P))
    prompt[0, :4] = pad
    prompt[1, :1] = pad
    completion = rng.integers(5, 50_000, (B, T))
    completion[0, 5:] = pad
    completion[2, 3:] = pad
    prompt, completion = jnp.asarray(prompt, jnp.int32), jnp.asarray(completion, jnp.int32)
    full = tunix_logps(policy, prompt, completion, pad)
    return dict(
        prompt_ids=prompt, prompt_mask=prompt != pad, completion_ids=completion,
        completion_mask=(completion != pad).astype(jnp.int32),
        advantages=jnp.asarray([1.3, -0.4, -0.9], jnp.float32),
        ref_per_token_logps=full + jnp.asarray(rng.normal(0, 0.3, (B, T)), jnp.float32),
        # old-policy log-probs off by ~0.5 nats: many ratios beyond 1 +- epsilon, so clipping acts
        old_per_token_logps=full + jnp.asarray(rng.normal(0, 0.5, (B, T)), jnp.float32),
    )


def tunix_logps(model, prompt, completion, pad, temperature=1.0):
    """Tunix 0.1.7's own log-probs: one full forward pass, float32 [B, L, V] logits."""
    graphdef, state = nnx.split(model)
    return common.compute_per_token_logps(graphdef, state, prompt, completion, pad, pad, stop_gradient=False,
                                          temperature=temperature)


def config(**kw):
    c = grpo_learner.GRPOConfig(num_generations=B, beta=0.08, epsilon=0.2,
                                **{"kl_loss_mode": "low_var_kl", "loss_agg_mode": "token-mean", **kw})
    c.temperature = 1.0  # GRPOLearner sets this from the rollout config
    return c


def example(batch, old=True):
    return grpo_learner.TrainExample(**{**batch, "old_per_token_logps": batch["old_per_token_logps"] if old else None})


# ---------------------------------------------------------------- log-probs

@pytest.mark.parametrize("chunk_size", [1, 4, 5, B * T, 64])  # 5 does not divide B*T = 21; 64 > B*T
def test_chunked_logps_equal_tunix_full_logits(tiny, batch, chunk_size):
    base, policy, pad = tiny
    for model in (policy, base):
        expected = tunix_logps(model, batch["prompt_ids"], batch["completion_ids"], pad)
        got = G.per_token_logps(model, batch["prompt_ids"], batch["completion_ids"], pad, chunk_size)
        assert got.shape == (B, T) and got.dtype == jnp.float32
        np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-5)


def test_positions_outside_the_mask_are_not_computed(tiny, batch, monkeypatch):
    """With a mask (the loss's), only chunks holding counted positions run the vocabulary projection, forward and
    backward: 15 counted of 21 positions, chunks of 4 -> 4 of 6 chunks. Counted positions equal Tunix's."""
    _, policy, pad = tiny
    mask = np.asarray(batch["completion_mask"])
    hidden = G.completion_hidden_states(policy, batch["prompt_ids"], batch["completion_ids"], pad)
    runs, projection = [], G._logits

    def counted(h, table, temperature):  # the real projection, counting the chunks that execute it
        jax.debug.callback(lambda: runs.append(1))
        return projection(h, table, temperature)

    monkeypatch.setattr(G, "_logits", counted)
    logps = lambda h: G.chunked_token_logps(G.unembedding(policy), h, batch["completion_ids"], 4, mask=mask)
    got, pullback = jax.vjp(logps, hidden)
    jax.effects_barrier()
    assert mask.sum() == 15 and len(runs) == 4
    expected = np.asarray(tunix_logps(policy, batch["prompt_ids"], batch["completion_ids"], pad))
    np.testing.assert_allclose(np.asarray(got)[mask == 1], expected[mask == 1], atol=2e-5, rtol=1e-5)
    assert (np.asarray(got)[mask == 0] == 0).sum() == 5  # the 6th uncounted position shares the 4th chunk
    (grad,) = pullback(jnp.ones_like(got))
    jax.effects_barrier()
    assert len(runs) == 8 and np.isfinite(np.asarray(grad)).all()


def test_lora_is_applied(tiny, batch):
    """The hidden states come through the model's qwix-intercepted __call__: adapters count."""
    base, policy, pad = tiny
    args = (batch["prompt_ids"], batch["completion_ids"], pad)
    assert float(jnp.max(jnp.abs(G.per_token_logps(policy, *args) - G.per_token_logps(base, *args)))) > 1e-2


def test_temperature_divides_logits_as_tunix_does(tiny, batch):
    _, policy, pad = tiny
    expected = tunix_logps(policy, batch["prompt_ids"], batch["completion_ids"], pad, temperature=0.7)
    got = G.per_token_logps(policy, batch["prompt_ids"], batch["completion_ids"], pad, 8, temperature=0.7)
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-5)
    # and so does the written-out backward pass: the same LoRA gradients as autodiff through Tunix's full logits
    ids, weights = (batch["prompt_ids"], batch["completion_ids"], pad), jnp.linspace(-1, 2, got.size).reshape(got.shape)
    grads = [nnx.grad(lambda m: (f(m) * weights).sum(), argnums=nnx.DiffState(0, nnx.LoRAParam))(policy) for f in (
        lambda m: G.per_token_logps(m, *ids, 8, temperature=0.7), lambda m: tunix_logps(m, *ids, temperature=0.7))]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), *grads)


# ---------------------------------------------------------------- the loss

def published_loss(model, ex, pad, beta=0.08, epsilon=0.2, kl_mode="low_var_kl"):
    """Tunix 0.1.3's grpo_loss_fn, written from its formula on full-logits log-probs:
    per token -min(r A, clip(r, 1-eps, 1+eps) A) + beta * KL, token mean over the whole batch."""
    logps = tunix_logps(model, ex.prompt_ids, ex.completion_ids, pad)
    old = jax.lax.stop_gradient(logps) if ex.old_per_token_logps is None else ex.old_per_token_logps
    ratio = jnp.exp(logps - old)
    adv = ex.advantages[:, None]
    per_token = -jnp.minimum(ratio * adv, jnp.clip(ratio, 1 - epsilon, 1 + epsilon) * adv)
    d = ex.ref_per_token_logps - logps
    kl = jnp.exp(d) - d - 1 if kl_mode == "low_var_kl" else logps - ex.ref_per_token_logps
    mask = ex.completion_mask
    return ((per_token + beta * kl) * mask).sum() / mask.sum(), (kl * mask).sum() / mask.sum()


def lora_value_and_grad(fn, model):
    return nnx.value_and_grad(fn, argnums=nnx.DiffState(0, nnx.LoRAParam), has_aux=True)(model)


@pytest.mark.parametrize("old", [False, True], ids=["one-iteration", "old-logps"])
def test_loss_and_gradients_equal_the_published_formula(tiny, batch, old):
    _, policy, pad = tiny
    ex = example(batch, old)
    (loss, aux), grads = lora_value_and_grad(lambda m: G.grpo_loss(m, ex, config(), pad, chunk_size=5), policy)
    (want, want_kl), want_grads = lora_value_and_grad(lambda m: published_loss(m, ex, pad), policy)
    np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(aux["kl"], want_kl, rtol=1e-5, atol=1e-6)
    if old:
        assert 0 < float(aux["pg_clipfrac"]) < 1  # the clipped branch is exercised
    leaves, want_leaves = jax.tree.leaves(grads), jax.tree.leaves(want_grads)
    assert len(leaves) == len(want_leaves) > 0
    assert max(float(jnp.max(jnp.abs(g))) for g in leaves) > 1e-4  # gradients are not trivially zero
    for g, w in zip(leaves, want_leaves):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


def test_config_decides_kl_estimator_and_aggregation(tiny, batch):
    _, policy, pad = tiny
    ex = example(batch)
    low_var, _ = G.grpo_loss(policy, ex, config(), pad, 8)
    plain_kl, _ = G.grpo_loss(policy, ex, config(kl_loss_mode="kl"), pad, 8)
    want, _ = published_loss(policy, ex, pad, kl_mode="kl")
    np.testing.assert_allclose(plain_kl, want, rtol=1e-5, atol=1e-6)
    assert abs(float(low_var) - float(plain_kl)) > 1e-3
    per_sequence, _ = G.grpo_loss(policy, ex, config(loss_agg_mode="sequence-mean-token-mean"), pad, 8)
    assert abs(float(per_sequence) - float(low_var)) > 1e-4


# ---------------------------------------------------------------- rematerialization

@pytest.mark.parametrize("remat", ["decoder", "block"])
def test_remat_changes_neither_loss_nor_gradients(tiny, batch, remat):
    """The rematerialized loss works on the policy's own arrays: same loss, same LoRA gradients.
    The policy's modules keep remat off (Tunix's sampler runs them and cannot decode through it)."""
    _, policy, pad = tiny
    ex = example(batch, old=True)
    (loss, aux), grads = lora_value_and_grad(lambda m: G.grpo_loss(m, ex, config(), pad, 5, remat=remat), policy)
    (want, want_aux), want_grads = lora_value_and_grad(lambda m: G.grpo_loss(m, ex, config(), pad, 5), policy)
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    np.testing.assert_allclose(aux["kl"], want_aux["kl"], rtol=1e-6)
    leaves, want_leaves = jax.tree.leaves(grads), jax.tree.leaves(want_grads)
    assert len(leaves) == len(want_leaves) > 0 and max(float(jnp.max(jnp.abs(g))) for g in leaves) > 1e-4
    for g, w in zip(leaves, want_leaves):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)
    assert {m.config.remat_config for _, m in policy.iter_modules() if hasattr(m, "config")} == {gemma3_lib.RematConfig.NONE}


def test_remat_keeps_fewer_activations_for_the_backward_pass(tmp_path):
    """What remat is for: XLA's planned buffers for the tiny model's loss and LoRA gradient at the
    published lengths, by bench_grpo.py --loss-memory. JAX marks the recomputation with optimization
    barriers; GPU and TPU compilers keep them until after scheduling, XLA:CPU drops them before (so
    in-process on CPU remat changes nothing); the bench compiles in a child process that keeps them."""
    out = subprocess.run([sys.executable, "bench_grpo.py", "--model", "tiny", "--loss-memory", "--out", tmp_path / "m.json"],
                         cwd=Path(__file__).parent, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    plan = json.loads((tmp_path / "m.json").read_text())
    assert "cse_barrier_expander" in plan["xla_flags"]
    # Measured (2026-12-07, the prompt's layers once per group): 0.86 GiB -> 0.64 (decoder), 0.65 (block): the
    # completions' float32 attention weights [4, 2, 512, 1,536] and the rest, no longer kept.
    for remat in ("decoder", "block"):
        assert plan[f"remat={remat}"]["temp_gib"] < 0.8 * plan["remat=none"]["temp_gib"], plan


# ---------------------------------------------------------------- installed into Tunix

@pytest.mark.parametrize("remat", ["decoder", "none"])
def test_use_chunked_logps_installs_into_a_grpo_learner(tiny, batch, tmp_path, remat):
    base, policy, pad = tiny
    _, tokenizer, _ = M.load("tiny")  # the tokenizer only; the models are the fixture's
    mesh = M.make_mesh(1, 1)
    training = rl.RLTrainingConfig(actor_optimizer=optax.sgd(1e-3), max_steps=1, mini_batch_size=1,
                                   train_micro_batch_size=1, eval_every_n_steps=10 ** 9)
    rollout = base_rollout.RolloutConfig(max_tokens_to_generate=T, max_prompt_length=P, kv_cache_size=32)
    cluster = rl.RLCluster(
        actor=policy, reference=base, tokenizer=tokenizer,
        cluster_config=rl.ClusterConfig(role_to_mesh={r: mesh for r in (rl.Role.ACTOR, rl.Role.REFERENCE, rl.Role.ROLLOUT)},
                                        rollout_engine="vanilla", offload_to_cpu=False, training_config=training,
                                        rollout_config=rollout))
    learner = grpo_learner.GRPOLearner(rl_cluster=cluster, algo_config=config(), reward_fns=lambda prompts, completions, **_: [0.0] * len(prompts))
    G.use_chunked_logps(learner, chunk_size=4, remat=remat)

    # GRPO's rows: G completions of one prompt (row 1's), which the passes below run once.
    batch = {**batch, "prompt_ids": jnp.repeat(batch["prompt_ids"][1:2], B, axis=0)}
    batch["prompt_mask"] = batch["prompt_ids"] != pad
    # The reference pass, called as RLCluster calls it (at the rollout temperature, RolloutConfig's
    # default 0.9 here), gives Tunix's numbers for the reference model.
    ids = batch["prompt_ids"], batch["completion_ids"]
    ref = cluster.get_ref_per_token_logps(*ids, pad, pad)
    np.testing.assert_allclose(ref, tunix_logps(base, *ids, pad, temperature=0.9), atol=2e-5)
    # The old-policy pass (num_iterations > 1) too, for the rollout's model (the policy), at the same
    # temperature as the policy loss (Tunix 0.1.7's own old-policy pass ignores the temperature).
    old = cluster.get_old_per_token_logps(*ids)
    np.testing.assert_allclose(old, tunix_logps(policy, *ids, pad, temperature=0.9), atol=2e-5)
    # The trainer's loss is ours, fed the way GRPOLearner feeds it.
    learner.algo_config.temperature = 1.0  # the published rollout temperature, which published_loss assumes
    ex = example(batch)
    inputs = cluster.actor_trainer.gen_model_input_fn(ex)
    loss, aux = cluster.actor_trainer.loss_fn(policy, **inputs)
    want, _ = published_loss(policy, ex, pad)
    np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6)
    assert set(aux) >= {"kl", "pg_clipfrac"}  # what GRPOLearner logs


def test_unsupported_options_are_refused():
    with pytest.raises(ValueError, match="remat must be one of none, block, decoder, got 'layer'"):
        G.use_chunked_logps(None, remat="layer")
    with pytest.raises(ValueError, match="loss_algo='gspo-token'"):
        G.check_supported(config(loss_algo="gspo-token"))


# ---------------------------------------------------------------- the SFT loss

@pytest.fixture(scope="module")
def sft_inputs(tiny):
    """Two SFT rows as data.sft_token_rows lays them out: <bos> prompt response, right-padded, loss mask
    on the response only (row 0: prompt 6, response 9, 5 pads; row 1: prompt 3, response 17)."""
    from tunix.sft import peft_trainer

    _, _, pad = tiny
    rng = np.random.default_rng(2)
    tokens = rng.integers(5, 50_000, (2, 20)).astype(np.int32)
    tokens[0, 15:] = pad
    mask = np.zeros((2, 20), np.int32)
    mask[0, 6:15] = 1
    mask[1, 3:] = 1
    return sft.sft_model_inputs(peft_trainer.TrainingInput(input_tokens=tokens, input_mask=mask))


@pytest.mark.parametrize("remat", ["none", "decoder"])
def test_sft_loss_matches_tunix(tiny, sft_inputs, remat):
    """sft.sft_loss == PeftTrainer's own default loss (full float32 logits, one-hot targets): the
    value and the LoRA gradients, with a chunk size that does not divide the 2 x 19 positions."""
    from tunix.sft import peft_trainer

    _, policy, _ = tiny
    ours = lambda m: (sft.sft_loss(m, **sft_inputs, chunk_size=5, remat=remat), None)
    tunix = lambda m: (peft_trainer._default_loss_fn(m, **sft_inputs), None)
    (loss, _), grads = lora_value_and_grad(ours, policy)
    (want, _), want_grads = lora_value_and_grad(tunix, policy)
    assert float(want) > 1.0  # a real NLL over a 262,144-token vocabulary, not a degenerate zero
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    leaves, want_leaves = jax.tree.leaves(grads), jax.tree.leaves(want_grads)
    assert len(leaves) == len(want_leaves) > 0 and max(float(jnp.max(jnp.abs(g))) for g in leaves) > 1e-4
    for g, w in zip(leaves, want_leaves):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


def test_sft_trainer_holds_the_chunked_loss(tiny, sft_inputs):
    """The PeftTrainer sft.py builds holds our loss (--logps-chunk-size > 0) or Tunix's own (0); ours
    gives Tunix's value on the inputs Tunix's input function makes, and Tunix trains a step with it."""
    from tunix.sft import peft_trainer

    _, policy, _ = tiny
    config = train.phase_defaults("sft")
    config.update(lr_schedule={"init": 1e-3, "peak": 1e-3, "warmup_steps": 0, "decay_steps": 1, "end": 1e-3},
                  max_grad_norm=1e9)
    optimizer, _ = grpo.make_optimizer(config)
    training = peft_trainer.TrainingConfig(max_steps=1, eval_every_n_steps=10 ** 9)
    fresh = M.apply_lora(M.load("tiny")[0], rank=4, alpha=4.0)  # trained below, so not the fixture's
    before = jax.tree.map(jnp.copy, nnx.state(fresh, nnx.LoRAParam))
    with M.make_mesh(1, 1):
        plain = sft.sft_trainer(policy, {**config, "logps_chunk_size": 0, "remat": "none"}, training, optimizer)
        chunked = sft.sft_trainer(fresh, config, training, optimizer)
        assert plain.loss_fn is peft_trainer._default_loss_fn
        assert config["logps_chunk_size"] > 0 and chunked.loss_fn is not peft_trainer._default_loss_fn
        np.testing.assert_allclose(chunked.loss_fn(policy, **sft_inputs), peft_trainer._default_loss_fn(policy, **sft_inputs),
                                   rtol=1e-5)
        chunked.with_gen_model_input_fn(lambda x: x).train(iter([sft_inputs]))
    assert chunked.train_steps == 1
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), nnx.state(fresh, nnx.LoRAParam), before)
    assert max(jax.tree.leaves(moved)) > 1e-4  # the step updated the LoRA weights


# ---------------------------------------------------------------- one prompt, G completions

@pytest.mark.parametrize("remat", ["none", "decoder"])
def test_a_shared_prompt_runs_once_with_the_same_logps_loss_and_gradients(tiny, remat):
    """GRPO's G completions share their prompt: group=G runs each prompt once (model.py's _shared_prompt_call).
    Two groups of 3 rows, prompts of 24 (6 and 2 left pads) + 7: longer than tiny's sliding window (16), so
    the window decides which prompt keys a completion sees. The same log-probs as Tunix's full forward pass,
    the same loss and LoRA gradients as group=1."""
    _, policy, pad = tiny
    rng = np.random.default_rng(3)
    prompts = rng.integers(5, 50_000, (2, 24))
    prompts[0, :6], prompts[1, :2] = pad, pad
    prompt = jnp.asarray(np.repeat(prompts, B, axis=0), jnp.int32)
    completion = rng.integers(5, 50_000, (2 * B, T))
    completion[0, 5:], completion[4, 2:] = pad, pad
    completion = jnp.asarray(completion, jnp.int32)
    full = tunix_logps(policy, prompt, completion, pad)
    np.testing.assert_allclose(G.per_token_logps(policy, prompt, completion, pad, 8, group=B), full, atol=2e-5, rtol=1e-5)
    ex = grpo_learner.TrainExample(
        prompt_ids=prompt, prompt_mask=prompt != pad, completion_ids=completion,
        completion_mask=(completion != pad).astype(jnp.int32), advantages=jnp.asarray(rng.normal(size=2 * B), jnp.float32),
        ref_per_token_logps=full + jnp.asarray(rng.normal(0, 0.3, full.shape), jnp.float32), old_per_token_logps=None)
    (loss, aux), grads = lora_value_and_grad(lambda m: G.grpo_loss(m, ex, config(), pad, 5, remat, group=B), policy)
    (want, want_aux), want_grads = lora_value_and_grad(lambda m: G.grpo_loss(m, ex, config(), pad, 5, remat), policy)
    np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(aux["kl"], want_aux["kl"], rtol=1e-5, atol=1e-6)
    leaves, want_leaves = jax.tree.leaves(grads), jax.tree.leaves(want_grads)
    assert len(leaves) == len(want_leaves) > 0 and max(float(jnp.max(jnp.abs(g))) for g in leaves) > 1e-4
    for g, w in zip(leaves, want_leaves):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)
