"""Gemma 3 for this project through Tunix: loading, LoRA, generation and checkpoints.

``load(name) -> (model, tokenizer, config)``: ``gemma-3-1b-it`` (the published run's; local Hugging Face-format
directory, else the hub or Kaggle), ``gemma-3-270m`` (offline default, converted once by gemma3_270m.py) or
``tiny`` (random, tests). Weights and tokenizer are logged with sha256; missing weights are an error, never a
fallback. Also ``make_mesh``, ``apply_lora`` (qwix, the published pattern), ``generate`` (Tunix's Sampler),
``restore_checkpoint`` / ``load_run``. Try: ``python model.py --model gemma-3-270m --prompt "The capital of"``."""

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
from tunix.utils import mesh as mesh_lib

import runs
from gemma3_270m import WeightsUnavailable, cache_dir, ensure_gemma3_270m, file_sha256

log = logging.getLogger(__name__)

MODEL_NAMES = ("gemma-3-1b-it", "gemma-3-270m", "tiny")
# The published run's LoRA: every attention and MLP projection (Tunix: attn.{q,kv,attn_vec}_einsum, mlp.*_proj).
LORA_PATTERN = ".*(attn|mlp).*(einsum|proj).*"

# Which Tunix config describes each named model, and where its weights can come from.
TUNIX_CONFIGS = {"gemma-3-1b-it": gemma3_lib.ModelConfig.gemma3_1b_it,
                 "gemma-3-270m": gemma3_lib.ModelConfig.gemma3_270m}
HF_REPOS = {"gemma-3-1b-it": "google/gemma-3-1b-it"}
KAGGLE_HANDLES = {"gemma-3-1b-it": "google/gemma-3/transformers/gemma-3-1b-it"}

CHECKPOINT_SUBDIR = "checkpoints"  # RUN_DIR/checkpoints, also what the Tunix trainers are given


# ---- Devices, tokenizer, loading -------------------------------------------------------------

def make_mesh(fsdp: int = 1, tp: int = 1) -> jax.sharding.Mesh:
    """A (fsdp, tp) device mesh with the axis names Tunix's Gemma 3 gives its weights: fsdp splits
    weights (and the batch) across devices, tp splits heads / hidden units."""
    devices = jax.devices()
    if fsdp * tp > len(devices):
        raise ValueError(f"mesh fsdp={fsdp} x tp={tp} needs {fsdp * tp} devices but jax sees {len(devices)} "
                         f"({devices[0].platform}); ask for fewer (on CPU, XLA_FLAGS="
                         f"--xla_force_host_platform_device_count=N simulates N devices)")
    # Tunix's helper makes "Auto" axes; plain jax.make_mesh defaults to "Explicit", unsupported by Tunix's models.
    return mesh_lib.create_mesh((fsdp, tp), ("fsdp", "tp"), devices=devices[: fsdp * tp])


def load_tokenizer(path: str | Path) -> tokenizer_adapter.TokenizerAdapter:
    """A Tunix TokenizerAdapter over a SentencePiece file, built here (Tunix's ``Tokenizer`` calls
    ``SetEncodeExtraOptions``, gone from current sentencepiece). ``encode`` adds no <bos>; the Sampler does."""
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
    config = dataclasses.replace(TUNIX_CONFIGS[name](), param_dtype=jnp.dtype(dtype))
    _check_hf_dir(path, name, config)
    start = time.time()
    model = params_safetensors.create_model_from_safe_tensors(str(path), config, mesh=mesh, dtype=jnp.dtype(dtype))
    for f in sorted(path.glob("*.safetensors")):
        log.info("%s weights: %s sha256=%s", name, f, file_sha256(f))
    tokenizer = load_tokenizer(path / "tokenizer.model")
    log.info("%s tokenizer: %s sha256=%s", name, path / "tokenizer.model", file_sha256(path / "tokenizer.model"))
    log.info("loaded %s (%s, %d params) in %.1f s", name, dtype, _count(model, nnx.Param), time.time() - start)
    return model, tokenizer, config


def load(name: str, model_path: str | Path | None = None, mesh=None, dtype: str = "float32", seed: int = 0):
    """Load a model by name -> (Tunix ``Gemma3``, ``TokenizerAdapter``, ``ModelConfig``). ``model_path``: a
    local Hugging Face-format directory; ``mesh`` (``make_mesh``) shards the weights; ``seed``: tiny only."""
    # Compiling dominates a short CPU run: keep XLA's programs on disk for later processes (a resumed block, tests).
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla"))
    give_gemma3_decode_only_last_token()
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    if name == "tiny":
        return _load_tiny(model_path, mesh, dtype, seed)
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


# ---- LoRA ------------------------------------------------------------------------------------

class LoraKeepsComputeDtype(qwix.LoraProvider):
    """qwix's LoRA, but an adapted layer returns its non-LoRA dtype: else float32 adapters over bfloat16
    weights turn the whole model float32 (slower, more memory, not the published computation)."""

    def einsum(self, einsum_str, *operands, **kwargs):
        out_dtype = kwargs.get("preferred_element_type") or jnp.result_type(*operands)
        return super().einsum(einsum_str, *operands, **kwargs).astype(out_dtype)

    def dot_general(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, out_sharding=None):
        out = super().dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type, out_sharding=out_sharding)
        return out.astype(preferred_element_type or jnp.result_type(lhs, rhs))


def apply_lora(model, rank: int = 64, alpha: float = 64.0, mesh=None, pattern: str = LORA_PATTERN, seed: int = 0,
               dtype: str = "base"):
    """Wrap projections matching ``pattern`` in qwix LoRA as the published run did (``lora_a`` random, ``lora_b``
    zeros). ``dtype``: "base" or "float32"; compute stays in the base dtype (``LoraKeepsComputeDtype``)."""
    provider = LoraKeepsComputeDtype(module_path=pattern, rank=rank, alpha=alpha)
    inputs = model.get_model_input()

    # qwix finds the modules by running a forward pass: under jit one compilation, not one per op (3x faster on CPU).
    @nnx.jit
    def add_lora(base):
        return qwix.apply_lora_to_model(base, provider, rngs=nnx.Rngs(params=seed), **inputs)

    lora_model = add_lora(model)
    if dtype != "base":  # qwix makes the adapters in the base weights' dtype; same values, cast
        lora = nnx.state(lora_model, nnx.LoRAParam)
        nnx.update(lora_model, jax.tree.map(lambda x: x.astype(dtype), lora))
    # jit hands back copies of the base weights: use the originals, shared with the base (and reference) model.
    nnx.update(lora_model, nnx.state(model, nnx.Param))
    if mesh is not None:
        # qwix makes the adapters whole on every device (Tunix leaves a model already on `mesh` alone): split them
        # as declared, or the first update splits them and the sampler and train step recompile (test_mesh.py).
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


# ---- Generation ------------------------------------------------------------------------------

# Prefill needs only last logits, but Tunix 0.1.7's Gemma 3 computes [batch, prompt, 262,144] float32. Its Sampler
# asks for less from a model accepting `decode_only_last_token` (as later Tunix Gemma 3s do): ours gets it here, the
# one override of a Tunix class; XLA drops the full logits (test_prefill_unembeds_the_last_token_only; README s. 3).
_tunix_gemma3_call = gemma3_lib.Gemma3.__call__


def _gemma3_call(self, last_tokens, positions=None, cache=None, attention_mask=None, output_hidden_states=False,
                 *, images=None, decode_only_last_token=False, shared_prompt=None):
    if shared_prompt:
        return _shared_prompt_call(self, last_tokens, positions, attention_mask, *shared_prompt)
    if not decode_only_last_token:
        return _tunix_gemma3_call(self, last_tokens, positions, cache, attention_mask, output_hidden_states, images=images)
    # GRPO's rollout (grpo.build sets prompt_group = G): runs of G rows hold one prompt, prefilled once.
    group = getattr(self, "prompt_group", 1)
    rows = lambda x: x[::group]
    (_, new_cache), sown = nnx.capture(_tunix_gemma3_call, nnx.Intermediate)(
        self, rows(last_tokens), rows(positions), jax.tree.map(rows, cache), rows(attention_mask), True, images=images)
    (hidden,), new_cache = [jax.tree.map(lambda x: jnp.repeat(x, group, axis=0), t) for t in (sown["all_hidden_states"], new_cache)]
    if output_hidden_states:  # as the caller asked: leave them sown
        self.sow(nnx.Intermediate, "all_hidden_states", hidden)
    return self.embedder.decode(hidden[:, -1:]), new_cache


def _shared_prompt_call(self, tokens, positions, attention_mask, p: int, group: int):
    """Forward pass (no cache, inside __call__) where each run of `group` rows shares its first p (prompt) tokens,
    run once (same values up to rounding). The completions' mask holds the sliding window; Tunix's is lifted."""
    one, length = slice(None, None, group), tokens.shape[1]
    x_prompt, x = self._encode_and_get_inputs(tokens=tokens[one, :p]), self._encode_and_get_inputs(tokens=tokens[:, p:])
    distance = jnp.arange(p, length)[:, None] - jnp.arange(length)[None, :]  # query's index - key's index
    for layer in self.layers:
        attn, mask = layer.attn, attention_mask[:, p:]
        empty = jnp.zeros((x_prompt.shape[0], p, attn.num_kv_heads, attn.head_dim), x.dtype)
        kv, x_prompt = layer(x_prompt, positions[one, :p], {"k": empty, "v": empty, "end_index": jnp.zeros(
            x_prompt.shape[0], jnp.int32)}, attention_mask[one, :p, :p])
        cache = {k: jnp.pad(jnp.repeat(kv[k], group, axis=0), ((0, 0), (0, length - p), (0, 0), (0, 0))) for k in "kv"}
        window = attn.sliding_window_size
        if attn.attn_type == gemma3_lib.AttentionType.LOCAL_SLIDING:
            mask, attn.sliding_window_size = jnp.logical_and(mask, distance < window), length
        try:
            _, x = layer(x, positions[:, p:], {**cache, "end_index": jnp.full(x.shape[0], p, jnp.int32)}, mask)
        finally:
            attn.sliding_window_size = window
    x = self.final_norm(jnp.concatenate([jnp.repeat(x_prompt, group, axis=0), x], axis=1))
    self.sow(nnx.Intermediate, "all_hidden_states", x)
    return self.embedder.decode(x), None


def give_gemma3_decode_only_last_token() -> None:
    """Install the override above (idempotent; a Tunix whose Gemma 3 has the argument keeps its own).
    Called by `load`, so every model this project builds has it; Tunix's class is untouched until then."""
    if "decode_only_last_token" not in inspect.signature(gemma3_lib.Gemma3.__call__).parameters:
        gemma3_lib.Gemma3.__call__ = _gemma3_call


_SAMPLERS: dict = {}  # one compiled Sampler per (model, tokenizer, cache size): compiling is generation's slow part


def _sampler_for(model, tokenizer, cache_size: int, config) -> sampler_lib.Sampler:
    for key in [k for k, (ref, _) in _SAMPLERS.items() if ref() is None]:
        del _SAMPLERS[key]  # the model is gone; let its weights go too
    key = (id(model), id(tokenizer), cache_size)
    if key in _SAMPLERS and _SAMPLERS[key][0]() is model:
        sampler = _SAMPLERS[key][1]
        sampler.transformer_state = nnx.variables(model)  # training updates the model in place: the current weights
        return sampler
    cache_config = sampler_lib.CacheConfig(cache_size=cache_size, num_layers=config.num_layers,
                                           num_kv_heads=config.num_kv_heads, head_dim=config.head_dim)
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
    """Complete each prompt (Gemma turn format) -> [{"text", "n_tokens"}], stopping at ``stop_tokens``; temperature
    0 is greedy. Static shapes: batches of min(batch_size, len(prompts)), prompts padded to ``padded_prompt_length``."""
    prompts = [str(p) for p in prompts]  # numpy.str_ from datasets is rejected by SentencePiece
    if not prompts:
        return []
    longest, padded = padded_prompt_length(tokenizer, prompts)
    if max_prompt_length is None:
        max_prompt_length = padded
    elif max_prompt_length < longest:
        raise ValueError(f"a prompt has {longest} tokens, more than max_prompt_length={max_prompt_length}")
    sampler = _sampler_for(model, tokenizer, max_prompt_length + max_new_tokens, model.config)
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
            out = sampler(batch, max_generation_steps=max_new_tokens, max_prompt_length=max_prompt_length,
                          eos_tokens=stop, seed=jax.random.fold_in(jax.random.key(seed), b), **sampling)
        for tokens in out.tokens[:n_real]:
            ids = [int(t) for t in tokens]
            results.append({"text": tokenizer.decode(ids), "n_tokens": len(ids)})
        bar.update(n_real)
    bar.close()
    return results


# ---- Checkpoints -----------------------------------------------------------------------------

def restore_checkpoint(run_dir, model, step: int | None = None, optimizer=None,
                       checkpoint_dir: str = CHECKPOINT_SUBDIR) -> tuple[int, dict]:
    """Restore RUN_DIR/``checkpoint_dir`` at ``step`` (None: latest) into ``model`` (and optimizer) -> (step, meta)."""
    import orbax.checkpoint as ocp
    from tunix.sft import checkpoint_manager
    root = Path(run_dir).expanduser().resolve() / checkpoint_dir
    if not root.is_dir():  # checked first: orbax would create the directory
        raise FileNotFoundError(f"no checkpoint in {root} (no such directory); check the run directory or train first")
    manager = checkpoint_manager.CheckpointManager(str(root), ocp.CheckpointManagerOptions(max_to_keep=None))
    try:
        available = sorted(manager._checkpoint_manager.all_steps())
        if not available or (step is not None and step not in available):
            what = "no checkpoint" if step is None else f"no checkpoint for step {step}"
            raise FileNotFoundError(f"{what} in {root} (steps there: {available or 'none'}); "
                                    "check the run directory or train first")
        lora = is_lora(model)
        try:
            with runs.restoring(root):
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
    """A training run's base model + LoRA checkpoint -> (model, tokenizer, metadata), per RUN_DIR/metadata.json;
    adapters in the run's ``lora_dtype`` (older runs: "base"). ``model_path`` overrides the recorded one."""
    run_dir = Path(run_dir).expanduser()
    metadata = runs.read_metadata(run_dir)
    if metadata is None:
        raise FileNotFoundError(f"no run in {run_dir} (no metadata.json); pass a run directory written by train.py")
    missing = [k for k in ("model", "lora_rank", "lora_alpha") if k not in metadata]
    if missing:
        raise ValueError(f"{run_dir / 'metadata.json'} lacks {', '.join(missing)}; cannot rebuild the model this run trained")
    model, tokenizer, _ = load(metadata["model"], model_path=model_path or metadata.get("model_path"), mesh=mesh,
                               dtype=dtype, seed=metadata.get("config", {}).get("seed", 0))  # tiny's weights
    model = apply_lora(model, rank=metadata["lora_rank"], alpha=metadata["lora_alpha"], mesh=mesh,
                       dtype=metadata.get("lora_dtype", "base"))
    restored, _ = restore_checkpoint(run_dir, model, step=step, checkpoint_dir=metadata.get("checkpoint_dir", CHECKPOINT_SUBDIR))
    return model, tokenizer, dict(metadata, checkpoint_step=restored)


# ---- For tests only: `tiny`, a random two-layer Gemma 3 with the real tokenizer, built in seconds ----

def tiny_config(dtype: str = "float32") -> gemma3_lib.ModelConfig:
    """A small Gemma 3 (2 layers, width 64) with the full 262,144-token vocabulary."""
    return gemma3_lib.ModelConfig(
        num_layers=2, num_embed=262144, embed_dim=64, hidden_dim=128, num_heads=2, head_dim=32,
        num_kv_heads=1, sliding_window_size=16, local_base_frequency=10_000,
        global_base_frequency=1_000_000, param_dtype=jnp.dtype(dtype))


def _load_tiny(model_path, mesh, dtype: str, seed: int):
    """``load("tiny")``: numpy weights, std 1/sqrt(width) (Tunix's initialisers make logits near-equal, so greedy
    decoding would differ across meshes); norm scales 0 (Gemma norms multiply by 1 + scale)."""
    if model_path is not None:
        raise ValueError("tiny is randomly initialised; it takes no --model-path")
    config = tiny_config(dtype)
    abstract = nnx.eval_shape(lambda: gemma3_lib.Gemma3(config, rngs=nnx.Rngs(params=seed)))
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(seed)
    std = config.embed_dim ** -0.5

    def draw(x):
        if len(x.shape) < 2:
            return np.zeros(x.shape, x.dtype)
        return (rng.standard_normal(x.shape, dtype=np.float32) * std).astype(x.dtype)

    sharding = None if mesh is None else nnx.get_named_sharding(state, mesh)  # by the names Tunix gave each weight
    model = nnx.merge(graphdef, jax.device_put(jax.tree.map(draw, state), sharding))
    tok_path = ensure_gemma3_270m() / "tokenizer.model"
    log.info("tiny: random Gemma 3 (seed %d, %d params, %s); tokenizer %s sha256=%s",
             seed, _count(model, nnx.Param), dtype, tok_path, file_sha256(tok_path))
    return model, load_tokenizer(tok_path), config


# ---- Command line: greedy continuation of a prompt, and the speed of producing it ------------

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