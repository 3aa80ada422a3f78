"""The GRPO loss without full-vocabulary logits: completion-token log-probs, a chunk at a time.

Tunix 0.1.7 builds float32 logits [G, prompt + completion, 262,144] (6.4 GB per copy at the published sizes;
REFERENCE.md section 7, README section 8), yet a completion position needs one number. So the model's own
``__call__`` (qwix LoRA applies) sows its final-normed hidden states, and completion positions are unembedded
``chunk_size`` at a time (``lax.map``, the backward pass written out), skipping chunks with no counted position.
``use_chunked_logps`` installs this into a Tunix ``GRPOLearner``; sft.py's loss reuses the pieces.

The loss is the PUBLISHED one (Tunix 0.1.3's ``grpo_loss_fn``: "low_var_kl", "token-mean") via 0.1.7's
``GRPOConfig``. Differences, none mattering at the published settings: float32 log-softmax, logits / a rollout
temperature != 1 (as 0.1.7; here the old-policy pass too); log-ratio clamped to +-20 before exp (as 0.1.7; acts
only beyond e^20, where 0.1.3 gave NaN); no entropy (GRPOLearner never logs it); aux holds only kl, kl_loss,
pg_loss, pg_clipfrac, ppo_kl. Refused: loss_algo "gspo-token", dual-clip epsilon_c, another policy_loss_fn;
a per-token ``sampler_is_weights`` is applied as 0.1.7 applies it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx
from tunix.models.gemma3 import model as gemma3_lib
from tunix.rl import common

DEFAULT_CHUNK_SIZE = 256  # token positions whose float32 logits exist at once: 256 x 262,144 x 4 B = 256 MiB
LOG_RATIO_CLAMP = 20.0  # on the log importance ratio before exp, as Tunix 0.1.7


# ---- Per-token log-probs of the completion, chunked ------------------------------------------

def hidden_states(model, tokens, positions, attention_mask, shared_prompt=None) -> jax.Array:
    """Final-normed hidden states [B, L, D] via the model's own ``__call__`` (LoRA applies; XLA drops the
    logits). ``shared_prompt`` (prompt length, group): see model.py's ``_shared_prompt_call``."""
    forward = nnx.capture(model, nnx.Intermediate)
    _, intermediates = forward(tokens, positions=positions, cache=None, attention_mask=attention_mask,
                               output_hidden_states=True, **({"shared_prompt": shared_prompt} if shared_prompt else {}))
    (hidden,) = intermediates["all_hidden_states"]  # sown once, after final_norm
    return hidden


def completion_hidden_states(model, prompt_ids, completion_ids, pad_id: int, group: int = 1) -> jax.Array:
    """Hidden states [B, T, D] predicting completion tokens (Tunix's logits ``[:, -T-1:-1]``; inputs
    by ``common.process_ids``). group > 1: each run of `group` rows shares its prompt, computed once."""
    tokens, positions, attention_mask, _ = common.process_ids(prompt_ids, completion_ids, pad_id, pad_id)
    shared = (prompt_ids.shape[1], group) if group > 1 else None
    return hidden_states(model, tokens, positions, attention_mask, shared)[:, -completion_ids.shape[1] - 1:-1, :]


def chunked_token_logps(table, hidden, targets, chunk_size: int = DEFAULT_CHUNK_SIZE,
                        temperature: float = 1.0, mask=None) -> jax.Array:
    """log softmax(hidden @ table.T / temperature)[target] -> [B, T] float32, ``chunk_size`` positions at a time
    (``table``: ``unembedding``'s). ``mask``: counted positions, sorted first; chunks with none skip the projection
    (``lax.cond``), read 0."""
    batch, length, width = hidden.shape
    n = batch * length
    n_chunks = -(-n // chunk_size)
    pad = n_chunks * chunk_size - n
    flat_hidden, flat_targets = hidden.reshape(n, width), jnp.asarray(targets).reshape(n)
    counted = jnp.ones(n, bool) if mask is None else jnp.asarray(mask).reshape(n).astype(bool)
    order = jnp.argsort(~counted, stable=True)  # counted positions first, each group in its own order
    flat_hidden = jnp.pad(flat_hidden[order], ((0, pad), (0, 0))).reshape(n_chunks, chunk_size, width)
    flat_targets = jnp.pad(flat_targets[order], (0, pad)).reshape(n_chunks, chunk_size)
    needed = jnp.pad(counted[order], (0, pad)).reshape(n_chunks, chunk_size).any(axis=1)
    logps = _chunks_logps(flat_hidden, flat_targets, needed, table, temperature)
    return jnp.zeros(n, jnp.float32).at[order].set(logps.reshape(-1)[:n]).reshape(batch, length)


def _logits(h, table, temperature: float) -> jax.Array:
    """[chunk, V] float32, the only vocabulary-sized array: Embedder.decode's product, / temperature by Tunix's rule
    (T=0, greedy, and T=1 leave logits alone)."""
    logits = jnp.einsum("nd,vd->nv", h, table).astype(jnp.float32)
    return logits / temperature if temperature not in (0.0, 1.0) else logits


def _each_needed_chunk(fn, needed, *chunks, skipped):
    """fn over the chunks (``lax.map``), ``skipped``'s zeros where a chunk holds no counted position."""
    return jax.lax.map(lambda a: jax.lax.cond(a[0], fn, lambda *x: jnp.zeros_like(skipped(*x)), *a[1:]), (needed, *chunks))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _chunks_logps(h, t, needed, table, temperature):
    """[chunks, size] log-probs of the targets. The backward pass is written out (below): JAX's own keeps the
    table as a residual of the cond, copied (and zero-filled for skipped chunks): 1.3 GiB at 270M fp32."""
    def logps(h, t):
        z = _logits(h, table, temperature)
        return jnp.take_along_axis(z, t[:, None], axis=-1)[:, 0] - jax.nn.logsumexp(z, axis=-1)
    return _each_needed_chunk(logps, needed, h, t, skipped=lambda h, t: t.astype(jnp.float32))


def _chunks_logps_fwd(h, t, needed, table, temperature):
    if table.perturbed:  # LoRA never trains the embedding; a change that does must not get a zero gradient
        raise NotImplementedError("grpo_loss's chunked log-probs give no gradient to the unembedding table")
    h, t, needed, table = h.value, t.value, needed.value, table.value
    return _chunks_logps(h, t, needed, table, temperature), (h, t, needed, table)


def _chunks_logps_bwd(temperature, residuals, g):
    """d logp[t] / d logits = (onehot(t) - softmax) / temperature from each chunk's logits, then through the table."""
    h, t, needed, table = residuals
    scale = 1.0 / temperature if temperature not in (0.0, 1.0) else 1.0

    def grad_h(h, t, g):
        z = _logits(h, table, temperature)  # one elementwise pass below: no second [chunk, V] float32 buffer
        dz = (jax.nn.one_hot(t, z.shape[-1], dtype=z.dtype) - jax.nn.softmax(z, axis=-1)) * (g * scale)[:, None]
        return jnp.einsum("nv,vd->nd", dz.astype(table.dtype), table).astype(h.dtype)
    return _each_needed_chunk(grad_h, needed, h, t, g, skipped=lambda h, t, g: h), None, None, None


_chunks_logps.defvjp(_chunks_logps_fwd, _chunks_logps_bwd, symbolic_zeros=True)


def unembedding(model):
    """The [V, D] table the chunk loop projects onto. Tunix shards it (tp, fsdp): a split D would all-reduce
    [chunk, V / tp] logits per chunk (256 MiB under fsdp=8), so it is re-laid out ONCE, fsdp moved onto V: a chunk
    exchanges per-position numbers (test_mesh.py). A whole table per device: 604 MB."""
    param = model.embedder.input_embedding
    mesh, table = jax.typeof(param[...]).sharding.mesh, param[...]  # mesh: abstract; empty without one
    names = param.sharding_names or (None, None)  # as Tunix declared them: (vocabulary axes, D axes)
    vocab_axes, model_axes = (() if n is None else (n,) if isinstance(n, str) else tuple(n) for n in names)
    if any(mesh.shape.get(axis, 1) > 1 for axis in model_axes):  # the vocabulary axes first: each device's new
        layout = jax.sharding.PartitionSpec(vocab_axes + model_axes, None)  # rows lie in its old slice
        table = jax.lax.with_sharding_constraint(table, jax.sharding.NamedSharding(mesh, layout))
    return table


def per_token_logps(model, prompt_ids, completion_ids, pad_id: int, chunk_size: int = DEFAULT_CHUNK_SIZE,
                    temperature: float = 1.0, mask=None, group: int = 1) -> jax.Array:
    """Tunix's ``compute_per_token_logps``, chunked: [B, T] float32 (pads meaningless; outside ``mask``: unset)."""
    hidden = completion_hidden_states(model, prompt_ids, completion_ids, pad_id, group)
    return chunked_token_logps(unembedding(model), hidden, completion_ids, chunk_size, temperature, mask)


@functools.partial(jax.jit, static_argnames=("pad_id", "chunk_size", "temperature", "group"))
def _logps_no_grad(graphdef, state, prompt_ids, completion_ids, pad_id, chunk_size, temperature, group):
    """Compiled, gradient-free ``per_token_logps`` for the reference and old-policy passes."""
    model = nnx.merge(graphdef, state)
    return jax.lax.stop_gradient(per_token_logps(model, prompt_ids, completion_ids, pad_id, chunk_size, temperature,
                                                 group=group))


def rematerialized(model, remat: str):
    """The same model, its backward pass recomputing activations (Tunix's ``RematConfig``; "none": ``model``),
    as new modules over the SAME arrays: Tunix's sampler cannot decode through remat (flax's TraceContextError)."""
    if remat == "none":
        return model
    view = nnx.merge(*nnx.split(model))
    config = dataclasses.replace(view.config, remat_config=gemma3_lib.RematConfig[remat.upper()])
    for _, module in view.iter_modules():
        if isinstance(getattr(module, "config", None), gemma3_lib.ModelConfig):
            module.config = config
        if hasattr(module, "remat_config"):
            module.remat_config = config.remat_config
    return view


# ---- The policy loss -------------------------------------------------------------------------

def grpo_loss(model, train_example, algo_config, pad_id: int, chunk_size: int = DEFAULT_CHUNK_SIZE,
              remat: str = "none", group: int = 1):
    """The published GRPO loss (Tunix 0.1.3's ``grpo_loss_fn``) on chunked log-probs -> (loss, aux)."""
    model = rematerialized(model, remat)
    mask = train_example.completion_mask
    logps = per_token_logps(model, train_example.prompt_ids, train_example.completion_ids, pad_id, chunk_size,
                            algo_config.temperature, mask=mask, group=group)
    if train_example.old_per_token_logps is None:  # one iteration per batch: the ratio is exactly 1
        old_logps = jax.lax.stop_gradient(logps)
    else:
        old_logps = train_example.old_per_token_logps.astype(jnp.float32)
    log_ratio = logps - old_logps
    ppo_kl = (-log_ratio * mask).sum() / jnp.clip(mask.sum(), min=1)
    ratio = jnp.exp(jnp.clip(log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))

    advantages = train_example.advantages.astype(jnp.float32)
    advantages = advantages if advantages.ndim == 2 else advantages[:, None]
    epsilon_high = getattr(algo_config, "epsilon_high", None) or algo_config.epsilon
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1 - algo_config.epsilon, 1 + epsilon_high)
    per_token_loss = jnp.maximum(unclipped, clipped)  # = -min(r A, clip(r) A)
    if getattr(train_example, "sampler_is_weights", None) is not None:
        per_token_loss = per_token_loss * train_example.sampler_is_weights.astype(jnp.float32)

    loss = common.aggregate_loss(per_token_loss, mask, algo_config.loss_agg_mode)
    aux = {"pg_loss": loss, "ppo_kl": ppo_kl, "kl": 0.0, "kl_loss": 0.0,
           "pg_clipfrac": (jnp.greater(clipped, unclipped) * mask).sum() / jnp.clip(mask.sum(), min=1)}
    if train_example.ref_per_token_logps is not None:
        kl = common.compute_kl_divergence(logps, train_example.ref_per_token_logps, algo_config.kl_loss_mode,
                                          clamp_value=getattr(algo_config, "kl_clamp_value", None))
        aux["kl"] = (kl * mask).sum() / jnp.clip(mask.sum(), min=1)
        # Every aggregation mode is linear, so beta * agg(kl) + agg(pg) = agg(pg + beta * kl): 0.1.3's form.
        aux["kl_loss"] = common.aggregate_loss(kl, mask, algo_config.loss_agg_mode)
        loss = loss + algo_config.beta * aux["kl_loss"]
    return loss, aux


# ---- Installing it into a Tunix GRPOLearner --------------------------------------------------

def check_supported(algo_config) -> None:
    """Refuse the GRPOConfig options this loss does not implement (rather than ignore them)."""
    unsupported = []
    if getattr(algo_config, "policy_loss_fn", "grpo") != "grpo":
        unsupported.append(f"policy_loss_fn={algo_config.policy_loss_fn!r}")
    if getattr(algo_config, "loss_algo", "grpo") != "grpo":
        unsupported.append(f"loss_algo={algo_config.loss_algo!r}")
    if getattr(algo_config, "epsilon_c", None) is not None:
        unsupported.append(f"epsilon_c={algo_config.epsilon_c!r} (dual clip)")
    if unsupported:
        raise ValueError(f"the chunked GRPO loss implements the published GRPO loss only; "
                         f"unsupported: {', '.join(unsupported)}")


def use_chunked_logps(learner, chunk_size: int = DEFAULT_CHUNK_SIZE, remat: str = "none") -> None:
    """Make a Tunix ``GRPOLearner`` compute all log-probs chunked (before ``learner.train``): the loss by
    ``with_loss_fn``, the reference/old-policy log-probs (no hook in Tunix 0.1.7) by ``_override``."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if remat.upper() not in gemma3_lib.RematConfig.__members__:  # fail now, not at the first update
        raise ValueError(f"remat must be one of {', '.join(m.lower() for m in gemma3_lib.RematConfig.__members__)}, "
                         f"got {remat!r}")
    config = learner.algo_config
    check_supported(config)
    cluster = learner.rl_cluster
    pad_id = cluster.rollout.pad_id()

    # GRPOLearner closes over its config for the same reason: jax transforms reject partials with kwargs.
    cluster.actor_trainer.with_loss_fn(
        lambda model, train_example, algo_config: grpo_loss(model, train_example, config, pad_id, chunk_size, remat,
                                                            config.num_generations),
        has_aux=True)

    worker = cluster.inference_worker

    def reference_logps(prompt_tokens, completion_tokens, pad_id, eos_id, temperature=1.0):
        graphdef, state = nnx.split(worker.get_model("reference"))
        return _logps_no_grad(graphdef, state, prompt_tokens, completion_tokens, pad_id, chunk_size, temperature,
                              config.num_generations)

    def old_policy_logps(prompt_tokens, completion_tokens):
        graphdef, state = nnx.split(cluster.rollout.model())
        return _logps_no_grad(graphdef, state, prompt_tokens, completion_tokens, pad_id, chunk_size, config.temperature,
                              config.num_generations)

    _override(worker, "get_ref_per_token_logps", reference_logps)
    _override(cluster.rollout, "get_per_token_logps", old_policy_logps)


def _override(instance, name: str, replacement) -> None:
    """Replace one method of one object, not its class: RLCluster calls ``instance.name(...)`` and 0.1.7 has no
    setting for it (later Tunix: ``compute_logps_chunk_size``). Refuses if the method is gone (Tunix changed)."""
    if not callable(getattr(instance, name, None)):
        raise AttributeError(f"{type(instance).__name__}.{name} not found: this Tunix version computes "
                             "log-probs elsewhere; grpo_loss.py needs updating")
    setattr(instance, name, replacement)
