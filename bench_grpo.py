"""How fast, and in how much memory, does a GRPO step run here? Times the REAL training code.

    python bench_grpo.py --model tiny                                   # published lengths, 3 steps
    python bench_grpo.py --model gemma-3-1b-it --random-weights         # real size, no weights needed
    python bench_grpo.py --model tiny -- --logps-chunk-size 0 --remat none   # anything after -- goes to train.py

It runs ``train.py --phase grpo`` in this process (published settings unless told otherwise: G=4,
1,024-token prompts, 512 new tokens, KV cache 2,048; --steps 3) into a temporary run directory,
reads the rows train.py writes to metrics.jsonl (seconds, rollout/reference/update seconds, tokens
per second) and adds what they lack:

* peak memory: on an accelerator the device's ``peak_bytes_in_use``; on CPU the process's peak
  resident set (``ru_maxrss``: everything, model loading included);
* compile time: the first step's seconds minus the median of the later steps;
* the bandwidth floor of the rollout: a decode step reads every weight once, so
  max_tokens_to_generate x weight bytes / memory bandwidth is the least a rollout can take
  (--bandwidth, default 3.35e12 B/s on GPU (H100), 18e9 B/s on CPU (REFERENCE.md section 6)),
  and the same per decode step beside the measured one (decode_step_ms: the rollout's seconds
  over max_tokens_to_generate, which assumes every completion runs to the limit);
* --profile DIR: a JAX profiler trace of the run, to see where a rollout's time goes.

--loss-memory instead runs nothing: it compiles the policy loss and its LoRA gradient (the largest
program of a step) at the given lengths for each --remat setting and prints XLA's planned buffers.
On CPU it compiles in a child process that keeps JAX's remat barriers (XLA:CPU otherwise drops them
before scheduling, GPU and TPU compilers after), so the figures show what remat saves; they still
overstate an accelerator's (XLA:CPU computes bfloat16 matmuls in float32 copies).

--random-weights: weights with the model's names and shapes, drawn from a seeded normal (std
1/sqrt(width), norms 0), written once as a Hugging Face-format directory under the model cache and
loaded through train.py's own --model-path. Random weights never emit <end_of_turn>, so every
completion runs to the token limit: the worst case. `tiny` is always random.

Prints one JSON record (and writes it to --out if given). Steps of random weights get rewards
but learn nothing useful: this measures time and memory only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

import gemma3_270m
import model as M
import runs

DEFAULT_BANDWIDTH = {"gpu": 3.35e12, "cpu": 18e9}  # bytes/s: H100 HBM3; this 2-core machine (REFERENCE section 6)


# ----------------------------------------------------------------------------------------------
# Random weights with the real names and shapes
# ----------------------------------------------------------------------------------------------

def hf_shapes(config) -> dict[str, tuple[int, ...]]:
    """Hugging Face Gemma 3 tensor names -> shapes for a Tunix ModelConfig (the layout model.py's
    GGUF converter writes and Tunix's safetensors loader reads; [out, in] matrices)."""
    d, h, q, kv = config.embed_dim, config.hidden_dim, config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    shapes = {"model.embed_tokens.weight": (config.num_embed, d), "model.norm.weight": (d,)}
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
            p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q),
            p + "self_attn.q_norm.weight": (config.head_dim,), p + "self_attn.k_norm.weight": (config.head_dim,),
            p + "mlp.gate_proj.weight": (h, d), p + "mlp.up_proj.weight": (h, d), p + "mlp.down_proj.weight": (d, h),
            **{p + f"{norm}.weight": (d,) for norm in ("input_layernorm", "post_attention_layernorm",
                                                       "pre_feedforward_layernorm", "post_feedforward_layernorm")},
        })
    return shapes


def random_weights_dir(name: str, seed: int = 0) -> Path:
    """A Hugging Face-format directory of seeded random weights for ``name`` (one safetensors file
    per layer, so writing it never holds more than the embedding in memory), made once and cached."""
    from safetensors.numpy import save_file

    config = M.TUNIX_CONFIGS[name]()
    target = gemma3_270m.cache_dir() / f"random-{name}-seed{seed}"
    if (target / "config.json").exists():  # written last: the directory is complete
        return target
    target.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    std = config.embed_dim ** -0.5
    files: dict[str, dict] = {}  # file name -> its tensors; the embedding and norm, then one per layer
    for tensor, shape in hf_shapes(config).items():
        # Matrices ~ N(0, 1/width) so logits have clear winners; Gemma norms scale by (1 + w): w = 0.
        value = rng.standard_normal(shape, dtype=np.float32) * std if len(shape) == 2 else np.zeros(shape, np.float32)
        files.setdefault("layer" + tensor.split(".")[2] if ".layers." in tensor else "embed", {})[tensor] = value
        if len(files) > 1:  # a new file began: the previous one is complete
            done, tensors = next(iter(files.items()))
            save_file(tensors, str(target / f"model-{done}.safetensors"), metadata={"format": "pt"})
            del files[done]
    for done, tensors in files.items():
        save_file(tensors, str(target / f"model-{done}.safetensors"), metadata={"format": "pt"})
    # Every Gemma 3 size shares one tokenizer: the embedded 270M's.
    (target / "tokenizer.model").write_bytes((gemma3_270m.ensure_gemma3_270m() / "tokenizer.model").read_bytes())
    runs.write_json(target / "config.json", {
        "model_type": "gemma3_text", "num_hidden_layers": config.num_layers, "hidden_size": config.embed_dim,
        "intermediate_size": config.hidden_dim, "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim, "vocab_size": config.num_embed,
        "random_weights_seed": seed})
    return target


def weight_bytes(name: str, dtype: str, lora_rank: int) -> int:
    """Bytes a decode step reads: every base weight plus the LoRA adapters, in the run's dtype."""
    config = M.tiny_config() if name == "tiny" else M.TUNIX_CONFIGS[name]()
    base = sum(int(np.prod(s)) for s in hf_shapes(config).values())
    # LoRA on q, kv, attention output, gate, up, down: rank x (in + out) each.
    d, h, q, kv = config.embed_dim, config.hidden_dim, config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    lora = config.num_layers * lora_rank * ((d + q) + (d + 2 * kv) + (q + d) + 2 * (d + h) + (h + d))
    return (base + lora) * jax.numpy.dtype(dtype).itemsize


# ----------------------------------------------------------------------------------------------
# The measurement
# ----------------------------------------------------------------------------------------------

def peak_memory() -> dict:
    """Peak device memory on an accelerator, peak resident memory of this process on CPU."""
    device = jax.devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        return {"peak_device_bytes": stats.get("peak_bytes_in_use"), "device_bytes_limit": stats.get("bytes_limit")}
    return {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}  # Linux: KiB


def summarize(rows: list[dict]) -> dict:
    """Per-phase medians over the steps after the first (the first one compiles)."""
    later = rows[1:] or rows
    median = lambda key: statistics.median(r[key] for r in later) if all(r.get(key) is not None for r in later) else None
    out = {key: median(key) for key in ("seconds", "rollout_seconds", "reference_seconds", "update_seconds",
                                        "tokens_per_second", "completion_len_mean")}
    out["first_step_seconds"] = rows[0]["seconds"]
    out["compile_seconds"] = rows[0]["seconds"] - out["seconds"] if len(rows) > 1 else None
    return out


# ----------------------------------------------------------------------------------------------
# --loss-memory: what XLA plans for the policy loss and its gradient, without running a step
# ----------------------------------------------------------------------------------------------

KEEP_REMAT_BARRIERS = "--xla_disable_hlo_passes=cse_barrier_expander"


def loss_memory(name: str, model_path, dtype: str, remat: str, generations: int, prompt_length: int,
                completion_length: int) -> dict:
    """XLA's buffers (GiB) for grpo_loss.grpo_loss and its LoRA gradient at the published loss
    settings (train.phase_defaults("grpo")) and these lengths: compiled for this machine, not run."""
    import jax.numpy as jnp
    from flax import nnx
    from tunix.rl.grpo import grpo_learner

    import grpo_loss
    import train

    c = train.phase_defaults("grpo")
    base = M.load(name, model_path=model_path, dtype=dtype)[0]
    graphdef, lora, rest = nnx.split(M.apply_lora(base, rank=c["lora_rank"], alpha=c["lora_alpha"]), nnx.LoRAParam, ...)
    prompt = jnp.ones((generations, prompt_length), jnp.int32)
    completion = jnp.ones((generations, completion_length), jnp.int32)
    example = grpo_learner.TrainExample(
        prompt_ids=prompt, prompt_mask=prompt > 0, completion_ids=completion, completion_mask=completion,
        advantages=jnp.ones(generations), ref_per_token_logps=jnp.zeros(completion.shape), old_per_token_logps=None)
    algo = grpo_learner.GRPOConfig(num_generations=generations, beta=c["beta"], epsilon=c["epsilon"],
                                   kl_loss_mode=c["kl_loss_mode"], loss_agg_mode=c["loss_agg_mode"])
    algo.temperature = c["temperature"]  # GRPOLearner sets it from the rollout config

    def step(lora, rest):
        loss = lambda m: grpo_loss.grpo_loss(m, example, algo, 0, c["logps_chunk_size"], remat)[0]
        return nnx.value_and_grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(nnx.merge(graphdef, lora, rest))

    plan = jax.jit(step).lower(lora, rest).compile().memory_analysis()
    gib = lambda n: round(n / 2 ** 30, 3)
    return {"arguments_gib": gib(plan.argument_size_in_bytes), "temp_gib": gib(plan.temp_size_in_bytes),
            "total_gib": gib(plan.argument_size_in_bytes + plan.output_size_in_bytes + plan.temp_size_in_bytes
                             - plan.alias_size_in_bytes)}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    train_extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Arguments after -- are passed to train.py unchanged.")
    p.add_argument("--model", default="tiny", choices=M.MODEL_NAMES)
    p.add_argument("--random-weights", action="store_true",
                   help="seeded random weights of the model's real size (no download); tiny is always random")
    p.add_argument("--steps", type=int, default=3, help="GRPO steps to time (the first one compiles)")
    p.add_argument("--num-generations", type=int, default=4)
    p.add_argument("--max-prompt-length", type=int, default=1024)
    p.add_argument("--max-tokens-to-generate", type=int, default=512)
    p.add_argument("--kv-cache-size", type=int, default=2048)
    p.add_argument("--bandwidth", type=float,
                   help="memory bandwidth in bytes/s for the floor (default: 3.35e12 on GPU, 18e9 on CPU)")
    p.add_argument("--profile", metavar="DIR",
                   help="also record a JAX profiler trace of the whole run into DIR (open it with TensorBoard's "
                        "profile plugin or ui.perfetto.dev); use --steps 2 to keep it small")
    p.add_argument("--loss-memory", action="store_true",
                   help="run nothing: print XLA's planned buffers for the policy loss and its gradient, per --remat")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="as train.py's (auto: bfloat16 on GPU/TPU, float32 on CPU)")
    p.add_argument("--out", help="also write the JSON record to this file")
    args = p.parse_args(argv)
    if args.steps < 2:
        p.error("--steps must be >= 2 (the first step compiles; the others are timed)")
    model_path = random_weights_dir(args.model) if args.random_weights and args.model != "tiny" else None

    if args.loss_memory:
        if jax.devices()[0].platform == "cpu" and KEEP_REMAT_BARRIERS not in os.environ.get("XLA_FLAGS", ""):
            env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {KEEP_REMAT_BARRIERS}".strip())
            return subprocess.run([sys.executable, __file__, *argv], env=env).returncode
        import train

        dtype = train.resolve_dtype(args.dtype)
        lengths = (args.num_generations, args.max_prompt_length, args.max_tokens_to_generate)
        record = {"model": args.model, "dtype": dtype, "generations, prompt, completion": lengths,
                  "device": jax.devices()[0].device_kind, "xla_flags": os.environ.get("XLA_FLAGS", ""),
                  **{f"remat={r}": loss_memory(args.model, model_path, dtype, r, *lengths)
                     for r in ("none", "block", "decoder")}}
        print(json.dumps(record, indent=2))
        if args.out:
            Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
        return 0

    import train  # after argument parsing: --help stays fast

    model_args = ["--model", args.model] + (["--model-path", str(model_path)] if model_path else [])
    with tempfile.TemporaryDirectory(prefix="bench_grpo_") as tmp:
        run_dir = Path(tmp) / "run"
        train_args = ["--phase", "grpo", *model_args, "--dtype", args.dtype, "--steps", str(args.steps), "--sample-every", "0",
                      "--num-generations", str(args.num_generations),
                      "--max-prompt-length", str(args.max_prompt_length),
                      "--max-tokens-to-generate", str(args.max_tokens_to_generate),
                      "--kv-cache-size", str(args.kv_cache_size),
                      "--save-every", str(10 ** 6), *train_extra, "--out", str(run_dir)]  # ours last: it wins
        start = time.time()
        # --profile: the first step compiles; the later ones are the profile.
        with jax.profiler.trace(args.profile) if args.profile else contextlib.nullcontext():
            train.main(train_args)
        wall = time.time() - start
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        config = json.loads((run_dir / "metadata.json").read_text())["config"]

    platform_name = jax.devices()[0].platform
    bandwidth = args.bandwidth or DEFAULT_BANDWIDTH.get(platform_name, DEFAULT_BANDWIDTH["gpu"])
    wbytes = weight_bytes(args.model, config["dtype"], config["lora_rank"])
    record = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {jax.devices()[0].device_kind}",
        "load_average_at_start": os.getloadavg()[0],
        "model": args.model, "weights": "random" if args.random_weights or args.model == "tiny" else "real",
        "dtype": config["dtype"], "train_args": train_args[:-2],  # without the temporary --out
        "steps": len(rows), "wall_seconds": round(wall, 1),
        **summarize(rows), **peak_memory(),
        "weight_bytes": wbytes, "bandwidth_bytes_per_s": bandwidth,
        # The rollout can be no faster than reading every weight once per decode step.
        "rollout_floor_seconds": args.max_tokens_to_generate * wbytes / bandwidth,
    }
    # Per decode step (the G completions advance together; exact when every completion runs to the
    # limit, as with random weights): measured against the floor of reading the weights once.
    if record["rollout_seconds"] is not None:
        record["decode_step_ms"] = 1000 * record["rollout_seconds"] / args.max_tokens_to_generate
        record["decode_step_floor_ms"] = 1000 * wbytes / bandwidth
    text = json.dumps(record, indent=2, default=str)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
