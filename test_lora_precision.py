"""Adapter precision (--lora-dtype; README section 4, "Adapter precision"), on the tiny model in bfloat16.

The published adapters were bfloat16 (qwix makes them in the base weights' dtype). bfloat16 keeps 8
significant bits, so one optimizer step of size s can change an entry w only if s is at least about
half its spacing: entries with |w| > 2^9 s cannot move, entries with |w| < 2^8 s always do. Adam's
steps are about the learning rate, so at the published 3e-6 nearly all of a he-uniform lora_a is
frozen. float32 adapters (the optimizer's master weights) move everywhere while the model still
computes in bfloat16 (model.LoraKeepsComputeDtype). These tests state that behaviour, so a change of
dtype handling (adapters no longer cast, the compute promoted to float32, a checkpoint restored into
the wrong dtype, an optimizer that rounds differently) fails here.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import grpo
import model as M
import train
from test_model import forward_logits, save_checkpoint

RANK = 64  # the published rank: lora_a of the tiny model is [64, 64] or [128, 64]


@pytest.fixture(scope="module")
def tiny_bf16():
    return M.load("tiny", dtype="bfloat16")


def adapters(model, kind="") -> dict:
    leaves = jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.LoRAParam))
    return {jax.tree_util.keystr(p): x for p, x in leaves if kind in jax.tree_util.keystr(p)}


def test_float32_adapters_keep_the_compute_dtype(tiny_bf16):
    """float32 adapters over bfloat16 weights: the adapters and their gradients are float32, every
    layer still hands bfloat16 on (qwix alone would promote the whole model to float32 from the
    first adapted projection on), and at initialisation the model computes exactly what it did."""
    base, tokenizer, _ = tiny_bf16
    ids = [[tokenizer.bos_id()] + tokenizer.encode("The capital of France is")]
    models = {d: M.apply_lora(base, rank=RANK, alpha=float(RANK), dtype=d) for d in ("base", "float32")}
    assert {str(x.dtype) for x in adapters(models["base"]).values()} == {"bfloat16"}
    assert {str(x.dtype) for x in adapters(models["float32"]).values()} == {"float32"}
    logits = {d: forward_logits(m, ids) for d, m in models.items()}
    assert logits["float32"].dtype == logits["base"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(logits["float32"], np.float32), np.asarray(logits["base"], np.float32))

    loss = lambda m: forward_logits(m, ids).astype(jnp.float32).std()
    grads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(models["float32"])
    lora_b = [g for path, g in jax.tree_util.tree_leaves_with_path(grads) if "lora_b" in jax.tree_util.keystr(path)]
    assert {str(g.dtype) for g in jax.tree.leaves(grads)} == {"float32"}
    assert all(np.isfinite(np.asarray(g)).all() for g in lora_b) and any(np.abs(np.asarray(g)).max() > 0 for g in lora_b)


def test_bfloat16_adapters_take_the_published_adamw_steps():
    """Our optimizer (grpo.make_optimizer: inject_hyperparams around clip + AdamW) on bfloat16
    values, against the published optax.chain(clip_by_global_norm(0.1), adamw(schedule, wd 0.1)):
    the same values after every step, up to a bfloat16 rounding (ours holds the learning rate in
    the parameters' dtype). inject_hyperparams used to cast b2 = 0.999 to bfloat16 (1.0), and every
    adapter was NaN after one step."""
    import optax

    config = train.phase_defaults("grpo")
    config["lr_schedule"] = {"init": 1e-8, "peak": 3e-6, "warmup_steps": 2, "decay_steps": 10, "end": 3e-7}
    ours, _ = grpo.make_optimizer(config)
    published = optax.chain(optax.clip_by_global_norm(0.1), optax.adamw(
        optax.warmup_cosine_decay_schedule(1e-8, 3e-6, 2, 10, 3e-7), weight_decay=0.1))
    rng = np.random.default_rng(0)
    params = {"lora_a": jnp.asarray(rng.uniform(-0.07, 0.07, (64, 8)), jnp.bfloat16), "lora_b": jnp.zeros((8, 64), jnp.bfloat16)}
    p_ours, p_pub, s_ours, s_pub = params, params, ours.init(params), published.init(params)
    for scale in (1.0, 0.01, 1.0, 0.001, 5.0, 1.0):
        grads = {k: jnp.asarray(rng.normal(size=x.shape) * scale, jnp.bfloat16) for k, x in params.items()}
        u, s_ours = ours.update(grads, s_ours, p_ours)
        p_ours = optax.apply_updates(p_ours, u)
        u, s_pub = published.update(grads, s_pub, p_pub)
        p_pub = optax.apply_updates(p_pub, u)
        for k in params:
            assert p_ours[k].dtype == jnp.bfloat16 and np.isfinite(np.asarray(p_ours[k], np.float32)).all(), k
            np.testing.assert_allclose(np.asarray(p_ours[k], np.float32), np.asarray(p_pub[k], np.float32),
                                       rtol=2 ** -7, atol=0.01 * 3e-6)  # a bfloat16 spacing; 1% of a step
    assert (np.asarray(p_ours["lora_b"], np.float32) != 0).all()  # it did move


def one_update(base, lora_dtype: str, step: float, seed: int = 0):
    """One AdamW update of every adapter, as Tunix's trainer makes it: train.make_optimizer (the
    published clip and AdamW, a constant learning rate `step`) wrapped in nnx.Optimizer over the
    LoRA params (tunix.sft.peft_trainer), on gradients of random sign. Adam's first step is
    step * g / (|g| + eps) + step * weight_decay * w: about `step` for every entry.
    Returns (before, after, dtype after) of the lora_a and lora_b entries, as float32."""
    policy = M.apply_lora(base, rank=RANK, alpha=float(RANK), dtype=lora_dtype, seed=seed)
    before = {k: np.asarray(v, np.float32) for k, v in adapters(policy).items()}
    constant = {"init": step, "peak": step, "warmup_steps": 0, "decay_steps": 1, "end": step}
    chain, _ = grpo.make_optimizer(dict(train.phase_defaults("grpo"), lr_schedule=constant))
    optimizer = nnx.Optimizer(policy, chain, wrt=nnx.LoRAParam)
    state = nnx.state(policy, nnx.LoRAParam)
    keys = iter(jax.random.split(jax.random.key(seed + 1), len(jax.tree.leaves(state))))
    grads = jax.tree.map(lambda x: jax.random.rademacher(next(keys), x.shape).astype(x.dtype), state)
    optimizer.update(policy, grads)
    after = adapters(policy)
    dtypes = {str(x.dtype) for x in after.values()}
    out = {}
    for kind in ("lora_a", "lora_b"):
        keys_ = [k for k in before if kind in k]
        out[kind] = (np.concatenate([before[k].ravel() for k in keys_]),
                     np.concatenate([np.asarray(after[k], np.float32).ravel() for k in keys_]))
    return out, dtypes


@pytest.mark.parametrize("step", [3e-6, 2e-5, 2e-4])
def test_which_adapter_entries_one_step_can_move(tiny_bf16, step):
    base = tiny_bf16[0]
    bf16, bf16_dtypes = one_update(base, "base", step)
    fp32, fp32_dtypes = one_update(base, "float32", step)
    assert bf16_dtypes == {"bfloat16"} and fp32_dtypes == {"float32"}  # the optimizer keeps each dtype

    # float32: every entry moves by about the step (weight decay adds at most 0.1 * |w| * step).
    for kind in ("lora_a", "lora_b"):
        before, after = fp32[kind]
        np.testing.assert_allclose(np.abs(after - before), step, rtol=0.05)

    # bfloat16 lora_a: the step is below half the spacing of large entries, above it for small ones.
    before, after = bf16["lora_a"]
    moved, size = after != before, np.abs(before)
    frozen, free = size > 2 ** 9 * step * 1.1, size < 2 ** 8 * step * 0.9
    assert frozen.any() and free.any()  # both kinds exist at this step size
    assert not moved[frozen].any(), f"{moved[frozen].sum()} entries moved by less than half their bf16 spacing"
    assert moved[free].all(), f"{(~moved[free]).sum()} entries did not move by more than half their bf16 spacing"
    if step == 3e-6:  # the published rate: about 0.5% of lora_a moves (qwix's he-uniform of the tiny model)
        assert moved.mean() < 0.01, moved.mean()
    # bfloat16 lora_b starts at zero, where bfloat16 is finest: every entry takes its first step.
    before, after = bf16["lora_b"]
    assert (before == 0).all()
    np.testing.assert_allclose(np.abs(after), step, rtol=0.05)


def test_load_run_rebuilds_the_adapters_of_the_run(tmp_path):
    """A run with float32 adapters over a bfloat16 base is evaluated with float32 adapters, not
    rounded to bfloat16 on their way back, over the run's own base model (tiny: that of its seed);
    a run from before --lora-dtype existed gets "base"."""
    base = M.load("tiny", dtype="bfloat16", seed=1)[0]
    policy = M.apply_lora(base, rank=4, alpha=4.0, dtype="float32")
    state = nnx.state(policy, nnx.LoRAParam)
    nnx.update(policy, jax.tree.map(lambda x: x + 1e-4 / 3, state))  # values bfloat16 cannot hold
    saved = {k: np.asarray(v) for k, v in adapters(policy).items()}
    meta = {"phase": "grpo", "model": "tiny", "lora_rank": 4, "lora_alpha": 4.0, "global_step": 1, "config": {"seed": 1}}
    save_checkpoint(tmp_path / "fp32", 1, policy, dict(meta, lora_dtype="float32"))
    save_checkpoint(tmp_path / "old", 1, policy, meta)

    restored, _, _ = M.load_run(tmp_path / "fp32", dtype="bfloat16")
    got = {k: np.asarray(v) for k, v in adapters(restored).items()}
    assert {str(v.dtype) for v in got.values()} == {"float32"}
    for k, value in saved.items():
        np.testing.assert_array_equal(got[k], value)
    ids = [[2, 651, 5279, 563]]
    np.testing.assert_array_equal(np.asarray(forward_logits(restored, ids), np.float32),
                                  np.asarray(forward_logits(policy, ids), np.float32))
    old, _, _ = M.load_run(tmp_path / "old", dtype="bfloat16")
    assert {str(v.dtype) for v in adapters(old).values()} == {"bfloat16"}
