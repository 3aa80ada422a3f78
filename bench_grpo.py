"""How fast, in how much memory, and how far do GRPO steps run here? Drives the real training code (train.main).

    python bench_grpo.py --model tiny                                   # published lengths, 3 steps
    python bench_grpo.py --model gemma-3-1b-it --random-weights         # real size, no weights needed
    python bench_grpo.py --model tiny -- --logps-chunk-size 0 --remat none   # anything after -- goes to train.py
    python bench_grpo.py --loss-memory                                  # XLA's plan for the loss, per --remat
    python bench_grpo.py --peer trl                 # ours beside TRL's GRPOTrainer (pip install -r requirements-bench.txt)

README section 8 ("Memory and speed") explains the timing and --loss-memory; figures: BENCHMARKS.md (the adapter
precision's --lora-precision: at commit 81c96bf). Random weights never emit <end_of_turn>: every completion runs to the limit (the worst case).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import gemma3_270m
import model as M
import runs

DEFAULT_BANDWIDTH = {"gpu": 3.35e12, "cpu": 18e9}  # bytes/s: H100 HBM3; this 2-core machine (REFERENCE section 6)
# XLA:CPU drops JAX's remat barriers before scheduling (GPU and TPU compilers after): keep them for --loss-memory.
KEEP_REMAT_BARRIERS = "--xla_disable_hlo_passes=cse_barrier_expander"


def hf_shapes(config) -> dict[str, tuple[int, ...]]:
    """Hugging Face Gemma 3 tensor names -> [out, in] shapes for a Tunix ModelConfig (as model.py's loader reads)."""
    d, h, q, kv = config.embed_dim, config.hidden_dim, config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    layer = {"self_attn.q_proj": (q, d), "self_attn.k_proj": (kv, d), "self_attn.v_proj": (kv, d),
             "self_attn.o_proj": (d, q), "self_attn.q_norm": (config.head_dim,), "self_attn.k_norm": (config.head_dim,),
             "mlp.gate_proj": (h, d), "mlp.up_proj": (h, d), "mlp.down_proj": (d, h),
             **{norm: (d,) for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                                        "post_feedforward_layernorm")}}
    return {"model.embed_tokens.weight": (config.num_embed, d), "model.norm.weight": (d,),
            **{f"model.layers.{i}.{k}.weight": s for i in range(config.num_layers) for k, s in layer.items()}}


def random_weights_dir(name: str, seed: int = 0) -> Path:
    """A cached Hugging Face-format directory of seeded random weights for ``name``, for --model-path (one
    safetensors file per layer: writing it never holds more than the embedding in memory)."""
    from safetensors.numpy import save_file

    config = M.TUNIX_CONFIGS[name]()
    target = gemma3_270m.cache_dir() / f"random-{name}-seed{seed}"
    if (target / "config.json").exists():  # written last: the directory is complete
        return target
    target.mkdir(parents=True, exist_ok=True)
    rng, std = np.random.default_rng(seed), config.embed_dim ** -0.5
    files: dict[str, dict] = {}  # file -> {tensor: shape}: the embedding and final norm, then one file per layer
    for tensor, shape in hf_shapes(config).items():
        files.setdefault("layer" + tensor.split(".")[2] if ".layers." in tensor else "embed", {})[tensor] = shape
    for part, shapes in files.items():
        # Matrices ~ N(0, 1/width) so logits have clear winners; Gemma norms scale by (1 + w): w = 0.
        tensors = {t: rng.standard_normal(s, dtype=np.float32) * std if len(s) == 2 else np.zeros(s, np.float32)
                   for t, s in shapes.items()}
        save_file(tensors, str(target / f"model-{part}.safetensors"), metadata={"format": "pt"})
    # Every Gemma 3 size shares one tokenizer: the embedded 270M's.
    (target / "tokenizer.model").write_bytes((gemma3_270m.ensure_gemma3_270m() / "tokenizer.model").read_bytes())
    runs.write_json(target / "config.json", {
        "model_type": "gemma3_text", "num_hidden_layers": config.num_layers, "hidden_size": config.embed_dim,
        "intermediate_size": config.hidden_dim, "num_attention_heads": config.num_heads, "num_key_value_heads":
        config.num_kv_heads, "head_dim": config.head_dim, "vocab_size": config.num_embed, "random_weights_seed": seed})
    return target


@contextlib.contextmanager
def peak_rss_by_phase(peaks: dict):
    """Fills peaks {rollout, reference, update: GiB}: resident memory sampled every 20 ms by a thread while
    RLCluster runs each phase (Linux; memory an earlier phase frees late is counted where it is freed)."""
    from tunix.rl import rl_cluster

    phases = {"generate": "rollout", "get_ref_per_token_logps": "reference", "update_actor": "update"}
    now, done = [], threading.Event()
    originals = {name: getattr(rl_cluster.RLCluster, name) for name in phases}

    def sample():
        while not done.wait(0.02):
            rss = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 30
            for phase in now[-1:]:
                peaks[phase] = round(max(peaks.get(phase, 0), rss), 2)

    def inside(name):
        def call(*args, **kwargs):
            now.append(phases[name])
            try:
                return originals[name](*args, **kwargs)
            finally:
                now.pop()
        return call

    threading.Thread(target=sample, daemon=True).start()
    try:
        for name in phases:
            setattr(rl_cluster.RLCluster, name, inside(name))
        yield peaks
    finally:
        done.set()
        for name, method in originals.items():
            setattr(rl_cluster.RLCluster, name, method)


def timing(args, train_args: list[str]) -> dict:
    """train.py's GRPO in this process (our --out last wins): medians over steps after the first (compiles), peak memory
    (on CPU: peak RSS, model loading included) and the rollout's floor (a decode step reads every weight once)."""
    import train  # here, not at the top: --help stays fast

    with tempfile.TemporaryDirectory(prefix="bench_grpo_") as tmp:
        start = time.time()
        with jax.profiler.trace(args.profile) if args.profile else contextlib.nullcontext(), peak_rss_by_phase({}) as by_phase:
            train.main([*train_args, "--out", str(Path(tmp) / "run")])
        wall, rows = time.time() - start, runs.read_rows(Path(tmp) / "run")
        config = runs.read_metadata(Path(tmp) / "run")["config"]
    later, device = rows[1:] or rows, jax.devices()[0]
    median = lambda key: statistics.median(r[key] for r in later) if all(r.get(key) is not None for r in later) else None
    medians = {key: median(key) for key in ("seconds", "rollout_seconds", "reference_seconds", "update_seconds",
                                            "tokens_per_second", "completion_len_mean")}
    medians["seconds_per_token"] = statistics.median(r["seconds"] / (args.num_generations * r["completion_len_mean"])
                                                     for r in later) if medians["completion_len_mean"] else None
    if device.platform == "cpu":
        peak = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux: KiB
                "peak_rss_gib_by_phase": by_phase}
    else:
        stats = device.memory_stats() or {}
        peak = {"peak_device_bytes": stats.get("peak_bytes_in_use"), "device_bytes_limit": stats.get("bytes_limit")}
    model = M.tiny_config() if args.model == "tiny" else M.TUNIX_CONFIGS[args.model]()
    d, h, q, kv = model.embed_dim, model.hidden_dim, model.num_heads * model.head_dim, model.num_kv_heads * model.head_dim
    # Every base weight plus LoRA on q, kv, attention output, gate, up, down (rank x (in + out) each), in run dtype.
    lora = model.num_layers * config["lora_rank"] * ((d + q) + (d + 2 * kv) + (q + d) + 2 * (d + h) + (h + d))
    wbytes = (sum(int(np.prod(s)) for s in hf_shapes(model).values()) + lora) * jnp.dtype(config["dtype"]).itemsize
    bandwidth = args.bandwidth or DEFAULT_BANDWIDTH.get(device.platform, DEFAULT_BANDWIDTH["gpu"])
    record = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {device.device_kind}",
        "load_average_at_start": os.getloadavg()[0],
        "model": args.model, "weights": "random" if args.random_weights or args.model == "tiny" else "real",
        "dtype": config["dtype"], "train_args": train_args, "steps": len(rows), "wall_seconds": round(wall, 1),
        **medians, "first_step_seconds": rows[0]["seconds"],
        "compile_seconds": rows[0]["seconds"] - medians["seconds"] if len(rows) > 1 else None,
        **peak, "weight_bytes": wbytes, "bandwidth_bytes_per_s": bandwidth,
        "rollout_floor_seconds": args.max_tokens_to_generate * wbytes / bandwidth}
    # Per decode step (the G completions advance together; exact when all run to the limit, as random weights do).
    if record["rollout_seconds"] is not None:
        record["decode_step_ms"] = 1000 * record["rollout_seconds"] / args.max_tokens_to_generate
        record["decode_step_floor_ms"] = 1000 * wbytes / bandwidth
    return record


def loss_memory(args, model_path) -> dict:
    """XLA's buffers (GiB) for grpo_loss.grpo_loss and its LoRA gradient at the published loss settings, per --remat:
    compiled for this machine, not run. On CPU they overstate an accelerator's (bf16 matmuls in fp32 copies)."""
    from tunix.rl.grpo import grpo_learner

    import grpo_loss
    import train

    c, dtype = train.phase_defaults("grpo"), train.resolve_dtype(args.dtype)
    g, p, t = lengths = (args.num_generations, args.max_prompt_length, args.max_tokens_to_generate)
    prompt, completion = jnp.ones((g, p), jnp.int32), jnp.ones((g, t), jnp.int32)
    example = grpo_learner.TrainExample(
        prompt_ids=prompt, prompt_mask=prompt > 0, completion_ids=completion, completion_mask=completion,
        advantages=jnp.ones(g), ref_per_token_logps=jnp.zeros(completion.shape), old_per_token_logps=None)
    algo = grpo_learner.GRPOConfig(num_generations=g, beta=c["beta"], epsilon=c["epsilon"],
                                   kl_loss_mode=c["kl_loss_mode"], loss_agg_mode=c["loss_agg_mode"])
    algo.temperature = c["temperature"]  # GRPOLearner sets it from the rollout config
    gib = lambda n: round(n / 2 ** 30, 3)

    def plan(remat: str) -> dict:  # a freshly loaded model per setting
        base = M.load(args.model, model_path=model_path, dtype=dtype)[0]
        policy = M.apply_lora(base, rank=c["lora_rank"], alpha=c["lora_alpha"])
        graphdef, lora, rest = nnx.split(policy, nnx.LoRAParam, ...)

        def step(lora, rest):
            loss = lambda m: grpo_loss.grpo_loss(m, example, algo, 0, c["logps_chunk_size"], remat, g)[0]
            return nnx.value_and_grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(nnx.merge(graphdef, lora, rest))

        x = jax.jit(step).lower(lora, rest).compile().memory_analysis()
        return {"arguments_gib": gib(x.argument_size_in_bytes), "temp_gib": gib(x.temp_size_in_bytes), "total_gib":
                gib(x.argument_size_in_bytes + x.output_size_in_bytes + x.temp_size_in_bytes - x.alias_size_in_bytes)}

    return {"model": args.model, "dtype": dtype, "generations, prompt, completion": lengths,
            "device": jax.devices()[0].device_kind, "xla_flags": os.environ.get("XLA_FLAGS", ""),
            **{f"remat={r}": plan(r) for r in ("none", "block", "decoder")}}


def trl_side(args) -> dict:
    """TRL's GRPOTrainer (torch) on our step: the same converted weights, float32, LoRA on the same projections,
    the same prompts in the same order, the same reward and loss settings, no gradient checkpointing."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    import data
    import rewards
    import train

    c, path, g = train.phase_defaults("grpo"), gemma3_270m.ensure_gemma3_270m(), args.num_generations
    rows = data.fit_prompts(data.training_examples("grpo", "builtin", None, 0, None),
                            M.load_tokenizer(path / "tokenizer.model"), args.max_prompt_length)
    order = data.prompt_order(rows, 1, c["shuffle_seed"])  # as train.py: the published order
    prompts = Dataset.from_list([{"prompt": str(b["prompts"][0]), "answer": str(b["answer"][0])} for b in order[:args.steps]])
    ends, logged = [], []

    class Clock(TrainerCallback):  # a step: from the previous step's end (or the start) to its own end
        def on_train_begin(self, *_, **__): ends.append(time.time())
        def on_step_end(self, *_, **__): ends.append(time.time())
        def on_log(self, *_, logs=None, **__): logged.append(logs)

    with tempfile.TemporaryDirectory(prefix="bench_trl_") as tmp:
        config = GRPOConfig(
            output_dir=tmp, max_steps=args.steps, per_device_train_batch_size=g, num_generations=g,
            max_completion_length=args.max_tokens_to_generate, learning_rate=c["learning_rate"], beta=c["beta"],
            epsilon=c["epsilon"], loss_type="dapo",  # dapo: the mean over every completion token (our token-mean)
            temperature=c["temperature"], top_p=c["top_p"], top_k=c["top_k"], weight_decay=c["weight_decay"],
            max_grad_norm=c["max_grad_norm"], gradient_checkpointing=False, bf16=False, shuffle_dataset=False,
            logging_steps=1, save_strategy="no", report_to="none", disable_dropout=True, seed=0)
        lora = LoraConfig(r=c["lora_rank"], lora_alpha=c["lora_alpha"], lora_dropout=0.0, task_type="CAUSAL_LM",
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        model, tokenizer = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(
            path, add_bos_token=True)
        model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids(c["stop_tokens"])  # ours: <eos> only
        trainer = GRPOTrainer(
            model=model, args=config, peft_config=lora, processing_class=tokenizer, train_dataset=prompts,
            reward_funcs=rewards.make_dipg_reward("soft"), callbacks=[Clock()])
        trainer.train()
    steps = [b - a for a, b in zip(ends, ends[1:])]
    tokens = [g * float(row["completions/mean_length"]) for row in logged if "completions/mean_length" in row]
    return {"side": f"TRL {importlib.metadata.version('trl')}, torch {torch.__version__}", "seconds": statistics.median(
        steps[1:]), "seconds_per_token": statistics.median(s / n for s, n in zip(steps[1:], tokens[1:])), "steps": steps,
            "tokens": tokens, "first_step_seconds": steps[0], "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def peer(args, train_extra: list[str]) -> dict:
    """Each side in its own process (its own peak memory), one after the other, on the same settings; the ratios."""
    lengths = ["--steps", str(args.steps), "--num-generations", str(args.num_generations), "--max-prompt-length",
               str(args.max_prompt_length), "--max-tokens-to-generate", str(args.max_tokens_to_generate)]
    sides = {"ours": ["--model", args.model, "--dtype", "float32", "--kv-cache-size", str(args.kv_cache_size),
                      *lengths, "--", "--remat", "none", *train_extra], "trl": ["--side", "trl", *lengths]}
    with tempfile.TemporaryDirectory(prefix="bench_peer_") as tmp:
        for side in [args.side] if args.side else sides:
            subprocess.run([sys.executable, __file__, "--out", f"{tmp}/{side}.json", *sides[side]], check=True)
        out = {side: json.loads(f.read_text()) for side in sides if (f := Path(tmp, f"{side}.json")).exists()}
    if len(out) == 2:
        print(f"{'':22}{'ours':>10}{'TRL':>10}   TRL / ours")
        for key, unit, scale in (("seconds", "s/step", 1), ("seconds_per_token", "s/token", 1),
                                 ("first_step_seconds", "first step s", 1), ("peak_rss_bytes", "peak RSS GiB", 2 ** 30)):
            a, b = out["ours"][key] / scale, out["trl"][key] / scale
            print(f"{unit:22}{a:10.3f}{b:10.3f}   {b / a:.2f}")
    return out


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, train_extra = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Arguments after -- are passed to train.py unchanged.")
    p.add_argument("--model", default="tiny", choices=M.MODEL_NAMES)
    p.add_argument("--random-weights", action="store_true", help="seeded, of the real size; tiny is always random")
    p.add_argument("--steps", type=int, default=3, help="GRPO steps (the first one compiles; default %(default)s)")
    p.add_argument("--num-generations", type=int, default=4)
    p.add_argument("--max-prompt-length", type=int, default=1024)
    p.add_argument("--max-tokens-to-generate", type=int, default=512)
    p.add_argument("--kv-cache-size", type=int, default=2048)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="as train.py's")
    p.add_argument("--bandwidth", type=float, help="bytes/s for the floor (default: 3.35e12 GPU, 18e9 CPU)")
    p.add_argument("--profile", metavar="DIR", help="also record a JAX profiler trace into DIR (try --steps 2)")
    p.add_argument("--loss-memory", action="store_true", help="run nothing: XLA's plan for the loss, per --remat")
    p.add_argument("--out", help="also write the JSON record to this file")
    p.add_argument("--peer", choices=["trl"], help="ours and TRL's GRPOTrainer side by side (issue 32's settings: "
                   "gemma-3-270m, float32, G=4, 768 + 128, LoRA 64, no remat, 6 steps, medians of 2-6)")
    p.add_argument("--side", choices=["ours", "trl"], help="--peer: run only this side")
    if "--peer" in argv or "--side" in argv:
        p.set_defaults(model="gemma-3-270m", steps=6, max_prompt_length=768, max_tokens_to_generate=128, kv_cache_size=1024)
    args = p.parse_args(argv)
    if args.steps < 2:
        p.error("--steps must be >= 2 (the first step compiles; the others are timed)")
    model_path = random_weights_dir(args.model) if args.random_weights and args.model != "tiny" else None

    if args.peer or args.side == "ours":
        record = peer(args, train_extra)
    elif args.side == "trl":
        record = trl_side(args)
    elif args.loss_memory:
        if jax.devices()[0].platform == "cpu" and KEEP_REMAT_BARRIERS not in os.environ.get("XLA_FLAGS", ""):
            env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {KEEP_REMAT_BARRIERS}".strip())
            return subprocess.run([sys.executable, __file__, *argv], env=env).returncode
        record = loss_memory(args, model_path)
    else:
        model_args = ["--model", args.model] + (["--model-path", str(model_path)] if model_path else [])
        train_args = ["--phase", "grpo", *model_args, "--dtype", args.dtype, "--steps", str(args.steps),
                      "--sample-every", "0", "--num-generations", str(args.num_generations), "--max-prompt-length",
                      str(args.max_prompt_length), "--max-tokens-to-generate", str(args.max_tokens_to_generate),
                      "--kv-cache-size", str(args.kv_cache_size)]
        record = timing(args, [*train_args, "--save-every", str(10 ** 6), *train_extra])
    print(text := json.dumps(record, indent=2, default=str))
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
