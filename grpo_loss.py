"""The GRPO loss without full-vocabulary logits: log-probs of completion tokens, a chunk at a time.

Why: Tunix 0.1.7 computes every per-token log-prob from the model's full output, float32 logits of
shape [G, prompt + completion, 262,144] -- 6.4 GB per copy at the published G=4 and 1,024 + 512
tokens, and the policy loss keeps several (log-softmax, the entropy's softmax, their gradients).
On one H100 the published block in float32 asked XLA for a 40.71 GiB buffer (REFERENCE.md section 7).
Only the completion positions matter, and each needs ONE number: log p(token). So we

1. run the model's own ``__call__`` (the qwix-LoRA interception lives there, so the LoRA policy and
   the frozen reference both work) with ``output_hidden_states=True``: the final-normed hidden
   states are sown as an ``nnx.Intermediate``; the logits it also returns are never used, so XLA
   drops that [B, L, V] matmul from the compiled program;
2. keep the hidden states of the positions that predict completion tokens, flatten them to
   [B * T, D], and for ``chunk_size`` positions at a time compute logits with the model's own
   unembedding (``embedder.decode``; on a mesh its table laid out once so that no chunk moves
   logits between devices: ``unembedding``), log-softmax in float32 and pick the token's log-prob.
   ``lax.map`` runs the chunks one after another and ``jax.checkpoint`` makes the backward pass
   recompute a chunk's logits instead of storing them: at most a few [chunk_size, V] float32
   arrays are alive at any time (chunk_size 256 -> 256 MiB each). Given the loss's mask, chunks
   holding no counted position (a completion's padding) skip the projection altogether.

``use_chunked_logps(learner, chunk_size, remat)`` installs this into a Tunix ``GRPOLearner`` for the
three places Tunix 0.1.7 computes log-probs: the policy loss (``actor_trainer.with_loss_fn``, the
hook GRPOLearner itself uses), the reference pass, and the old-policy pass (num_iterations > 1).
The SFT block's loss (``sft.sft_loss``) is built from the same pieces.

The model's own activations are the other large term: without rematerialization the backward pass
keeps every decoder layer's (float32 attention weights of [G, heads, 1,536, 1,536], the MLP's
[G, 1,536, 6,912] for the 1B, ...). ``remat="decoder"`` makes the policy loss recompute each layer
in the backward pass instead (Tunix's ``RematConfig``; see ``rematerialized``).

The loss is the PUBLISHED one, Tunix 0.1.3's ``grpo_loss_fn``, configured through the Tunix 0.1.7
``GRPOConfig`` fields: per token ``-min(r A, clip(r, 1-eps, 1+eps) A) + beta * KL`` with
``KL = compute_kl_divergence(logp, ref_logp, algo_config.kl_loss_mode)`` ("low_var_kl" is 0.1.3's
``exp(ref - logp) - (ref - logp) - 1``), aggregated by ``common.aggregate_loss(...,
algo_config.loss_agg_mode)`` ("token-mean" is 0.1.3's ``sum(loss * mask) / sum(mask)``).
Where it differs from 0.1.3 or 0.1.7 (none of it matters at the published settings):

* log-softmax is float32 (as 0.1.7; 0.1.3 used the logits' dtype, i.e. bfloat16 in a bf16 run);
* logits are divided by the rollout temperature when it is not 1 (as 0.1.7; 0.1.3 never did;
  published temperature is 1.0) -- here the old-policy pass does too, which 0.1.7's does not;
* the log-ratio is clamped to +-20 before exp (as 0.1.7; 0.1.3 had no clamp). With
  num_iterations = 1 (published) the ratio is exactly 1 and the clamp never acts; with more
  iterations it only acts at ratios beyond e^20 = 5e8, where 0.1.3's exp overflows to inf/NaN
  in the advantage-negative branch. Kept: it can only turn a NaN step into a finite one;
* no entropy: 0.1.7 computes the mean token entropy over the full logits and returns it in aux,
  but GRPOLearner never logs it (it logs kl and pg_clipfrac) and 0.1.3 had none. Computing it here
  would cost a second softmax pass per chunk for a number nobody reads;
* aux carries kl (mean per-token KL over completion tokens, logged as actor/kl), kl_loss, pg_loss,
  pg_clipfrac and ppo_kl, 0.1.7's names; its other diagnostics (is_ratio/*, advantage/*) are
  not computed;
* 0.1.7's options outside the published recipe are refused at install time, not silently
  ignored: loss_algo "gspo-token", dual-clip epsilon_c, policy_loss_fn other than "grpo". A
  per-token ``sampler_is_weights`` on the train example is applied as 0.1.7 applies it.
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

# The log importance ratio is clamped to this before exp (Tunix 0.1.7; see the module docstring).
LOG_RATIO_CLAMP = 20.0


# ----------------------------------------------------------------------------------------------
# Per-token log-probs of the completion, chunked
# ----------------------------------------------------------------------------------------------

def hidden_states(model, tokens, positions, attention_mask) -> jax.Array:
    """The model's final-normed hidden states [B, L, D]: its forward pass without the unembedding.

    ``model`` is called through its own ``__call__`` so qwix LoRA applies; ``nnx.capture`` collects
    the sown hidden states without leaving them in the model."""
    # The returned logits are dead code: XLA removes the [B, L, V] unembedding from the program.
    forward = nnx.capture(model, nnx.Intermediate)
    _, intermediates = forward(tokens, positions=positions, cache=None, attention_mask=attention_mask,
                               output_hidden_states=True)
    (hidden,) = intermediates["all_hidden_states"]  # sown once, after final_norm
    return hidden


def completion_hidden_states(model, prompt_ids, completion_ids, pad_id: int) -> jax.Array:
    """Final-normed hidden states [B, T, D] of the positions that predict completion tokens 0..T-1,
    i.e. prompt+completion positions P-1 .. P+T-2 (the logits Tunix keeps: ``[:, -T-1:-1]``).

    Inputs are built exactly as Tunix builds them (``common.process_ids``: left-padded prompt +
    right-padded completion, positions counted over non-pad tokens, causal mask without pads)."""
    tokens, positions, attention_mask, _ = common.process_ids(prompt_ids, completion_ids, pad_id, pad_id)
    length = completion_ids.shape[1]
    return hidden_states(model, tokens, positions, attention_mask)[:, -length - 1:-1, :]


def chunked_token_logps(unembed, hidden, targets, chunk_size: int = DEFAULT_CHUNK_SIZE,
                        temperature: float = 1.0, mask=None) -> jax.Array:
    """log softmax(unembed(hidden) / temperature)[target] for every position: [B, T] float32.

    hidden [B, T, D], targets [B, T] int. Positions are flattened to B*T and processed
    ``chunk_size`` at a time (the last chunk padded), so the float32 logits of at most one chunk
    exist at once, forward and backward (``jax.checkpoint`` recomputes them for the gradient).

    ``mask`` [B, T] (optional): the positions the loss counts. They are put first (a stable sort, so
    in order) and a chunk with none of them is skipped (``lax.cond``): the vocabulary projection, most
    of the work, is then paid for ceil(mask.sum() / chunk_size) chunks instead of every one, e.g.
    only the response of an SFT example, not its prompt or padding. Positions in skipped chunks read 0."""
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

    def one_chunk(h, t):
        logits = unembed(h).astype(jnp.float32)  # [chunk_size, V]: the only vocabulary-sized array
        if temperature not in (0.0, 1.0):  # Tunix's rule: T=0 (greedy) and T=1 leave logits alone
            logits = logits / temperature
        picked = jnp.take_along_axis(logits, t[:, None], axis=-1)[:, 0]
        return picked - jax.nn.logsumexp(logits, axis=-1)

    def skipped(h, t):
        return jnp.zeros(chunk_size, jnp.float32)

    @jax.checkpoint  # around the cond: what the backward pass keeps of a chunk is its inputs
    def chunk_or_skip(args):
        needed, h, t = args
        return jax.lax.cond(needed, one_chunk, skipped, h, t)

    logps = jax.lax.map(chunk_or_skip, (needed, flat_hidden, flat_targets))
    return jnp.zeros(n, jnp.float32).at[order].set(logps.reshape(-1)[:n]).reshape(batch, length)


def unembedding(model):
    """The model's unembedding (``Embedder.decode``: hidden [.., D] -> logits [.., V]) for the chunk
    loop, with its table laid out ONCE, before the loop, so that no chunk moves anything
    vocabulary-sized between devices. Without a mesh that splits D it is ``model.embedder.decode``.

    Tunix shards the table [V, D] as ``shd_config.emb_vd`` = (tp, fsdp): the vocabulary over tp, the
    width D over fsdp. A chunk's logits h @ table.T then contract over a split D, so every device
    holds partial sums of ALL the chunk's logits and XLA all-reduces [chunk, V / tp] in every chunk,
    in the forward pass and again in the backward recomputation: 256 MiB per 256-position chunk in
    float32 under fsdp=8, 2 GiB per pass over the published 2,048 completion positions. Instead
    the fsdp axes move from D onto V: each device keeps whole rows, V / devices of them (a second
    buffer the size of its shard; one all-to-all among the devices that share a tp slice, outside
    the loop because the table does not change in it), computes the logits of its own slice of the
    vocabulary, and the log-softmax combines devices through per-position numbers only: each
    chunk all-reduces its max, its sum of exp and the picked logit ([chunk] floats), gathers its
    hidden states and, in the backward pass, sums their gradient ([chunk, D]: 1.2 MB for 256
    positions of the 1B), the same total however the positions are chunked. test_mesh.py reads
    these loops in the compiled programs. (Gathering the whole table onto every device once would leave the loop
    with no collective at all, but costs a [V, D] copy per device, 604 MB for the 1B in bfloat16,
    and 8x the one-time traffic.)"""
    param = model.embedder.input_embedding
    mesh = jax.typeof(param[...]).sharding.mesh  # abstract (axis names and sizes); empty without a mesh
    names = param.sharding_names or (None, None)  # as Tunix declared them: (vocabulary axes, D axes)
    vocab_axes, model_axes = (() if n is None else (n,) if isinstance(n, str) else tuple(n) for n in names)
    if all(mesh.shape.get(axis, 1) == 1 for axis in model_axes):  # D whole on every device: nothing to sum
        return model.embedder.decode
    # The vocabulary axes first: each device's new rows lie inside its old slice of the vocabulary.
    layout = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(vocab_axes + model_axes, None))
    table = jax.lax.with_sharding_constraint(param[...], layout)
    return lambda h: jnp.dot(h, table.T)  # Embedder.decode's product, on the re-laid-out table


def per_token_logps(model, prompt_ids, completion_ids, pad_id: int, chunk_size: int = DEFAULT_CHUNK_SIZE,
                    temperature: float = 1.0, mask=None) -> jax.Array:
    """The chunked equivalent of Tunix's ``common.compute_per_token_logps``: [B, T] float32 log-probs
    of the completion tokens (values at pad positions are computed but meaningless, as in Tunix;
    with ``mask``, positions outside it are not computed: see ``chunked_token_logps``)."""
    hidden = completion_hidden_states(model, prompt_ids, completion_ids, pad_id)
    return chunked_token_logps(unembedding(model), hidden, completion_ids, chunk_size, temperature, mask)


@functools.partial(jax.jit, static_argnames=("pad_id", "chunk_size", "temperature"))
def _logps_no_grad(graphdef, state, prompt_ids, completion_ids, pad_id, chunk_size, temperature):
    """Compiled, gradient-free ``per_token_logps`` for the reference and old-policy passes."""
    model = nnx.merge(graphdef, state)
    return jax.lax.stop_gradient(per_token_logps(model, prompt_ids, completion_ids, pad_id, chunk_size, temperature))


def rematerialized(model, remat: str):
    """The same model, whose backward pass recomputes activations instead of keeping them: Tunix's
    ``RematConfig`` ("decoder": each decoder layer; "block": each attention and each MLP block;
    "none": ``model`` itself). The values are the same; only memory and compute change.

    Why not simply load the model with remat on: the rollout runs the policy's own modules, and
    Tunix's sampler cannot run a rematerialized layer inside its decode loop (flax raises
    TraceContextError). So inside the loss we build a second set of modules over the SAME arrays
    (``nnx.merge(*nnx.split(model))``: the gradient still reaches the policy's LoRA weights) and
    switch remat on there. Gemma3, its decoder layers and MLPs read ``config.remat_config``; the
    attention modules keep their own copy."""
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


# ----------------------------------------------------------------------------------------------
# The policy loss
# ----------------------------------------------------------------------------------------------

def grpo_loss(model, train_example, algo_config, pad_id: int, chunk_size: int = DEFAULT_CHUNK_SIZE,
              remat: str = "none"):
    """The published GRPO loss (Tunix 0.1.3's ``grpo_loss_fn``) from chunked log-probs -> (loss, aux).

    ``train_example`` is Tunix's TrainExample (prompt/completion ids and masks, advantages [B],
    ref_per_token_logps and old_per_token_logps [B, T] or None). ``algo_config`` is the
    GRPOConfig: beta, epsilon (and epsilon_high if it has one), kl_loss_mode, kl_clamp_value,
    loss_agg_mode and the rollout temperature decide everything. ``remat``: see ``rematerialized``."""
    model = rematerialized(model, remat)
    mask = train_example.completion_mask
    # Only the positions the loss counts are computed (a completion that stopped early skips its padding).
    logps = per_token_logps(model, train_example.prompt_ids, train_example.completion_ids, pad_id, chunk_size,
                            algo_config.temperature, mask=mask)
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


# ----------------------------------------------------------------------------------------------
# Installing it into a Tunix GRPOLearner
# ----------------------------------------------------------------------------------------------

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
    """Make a Tunix ``GRPOLearner`` compute every log-prob in chunks of ``chunk_size`` positions
    (and the policy loss rematerialize its layers: ``remat``, see ``rematerialized``).

    Call it right after ``GRPOLearner(...)`` and before ``learner.train``. It replaces:

    * the policy loss, through ``actor_trainer.with_loss_fn`` -- the extension point GRPOLearner's
      own ``__init__`` uses (same signature; GRPOLearner's ``gen_model_input_fn`` still feeds it);
    * the reference log-probs (``rl_cluster.inference_worker.get_ref_per_token_logps``) and the
      old-policy log-probs (``rl_cluster.rollout.get_per_token_logps``, used when
      num_iterations > 1). Tunix 0.1.7 offers no hook for these two, so they are overridden on
      these two instances (not the classes), with the same signatures; see ``_override``."""
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
        lambda model, train_example, algo_config: grpo_loss(model, train_example, config, pad_id, chunk_size, remat),
        has_aux=True)

    worker = cluster.inference_worker

    def reference_logps(prompt_tokens, completion_tokens, pad_id, eos_id, temperature=1.0):
        graphdef, state = nnx.split(worker.get_model("reference"))
        return _logps_no_grad(graphdef, state, prompt_tokens, completion_tokens, pad_id, chunk_size, temperature)

    def old_policy_logps(prompt_tokens, completion_tokens):
        graphdef, state = nnx.split(cluster.rollout.model())
        return _logps_no_grad(graphdef, state, prompt_tokens, completion_tokens, pad_id, chunk_size,
                              config.temperature)

    _override(worker, "get_ref_per_token_logps", reference_logps)
    _override(cluster.rollout, "get_per_token_logps", old_policy_logps)


def _override(instance, name: str, replacement) -> None:
    """Replace one method of one object (its class and every other instance stay as they are).
    One of the project's two overrides of Tunix (the other: model.py's prefill): RLCluster calls
    ``instance.name(...)``, and 0.1.7 has no setting that changes how these log-probs are computed
    (its main branch later added ``compute_logps_chunk_size``). Refuses if the method is gone, i.e.
    Tunix changed under us."""
    if not callable(getattr(instance, name, None)):
        raise AttributeError(f"{type(instance).__name__}.{name} not found: this Tunix version computes "
                             "log-probs elsewhere; grpo_loss.py needs updating")
    setattr(instance, name, replacement)
