"""Adapter precision: how far do GRPO steps move bfloat16 and float32 LoRA adapters? (README section 4)

    python bench_lora_precision.py                          # tiny in bf16, 20 steps at 3e-6 and at 2e-5
    python bench_lora_precision.py --steps 10 --lr 3e-6 --lr 2e-4

The published base weights were bfloat16 and qwix makes LoRA adapters in the base weights' dtype, so
the published adapters were bfloat16 (``--lora-dtype base``). bfloat16 keeps 8 significant bits: an
entry w changes only when a step is at least about |w| * 2^-9, and Adam's steps are about the learning
rate. This trains the `tiny` model computing in bfloat16 through train.py's command line
(``train.main``: the real configuration, rollout, loss, optimizer and checkpoints), once per adapter
dtype and learning rate, same seed, and prints per run:

* the share of ``lora_a`` / ``lora_b`` entries that differ from their seeded initial values, and the
  mean |change|: the run's final checkpoint (``model.load_run``) against ``model.apply_lora``'s
  initialisation with the run's seed (the same values in both dtypes);
* how far the policy moved: the mean per-token KL(policy || start) on fixed completions (the gold
  responses of the first 4 training vignettes, teacher-forced, last 128 tokens). The start is the
  block's reference (lora_b = 0: the base model). Computed twice: with the trained weights cast to
  float32 (exact), which measures how far the weights moved, and in bfloat16 as training computes,
  where any change of the weights also re-rounds the activations: a floor of rounding noise.

The learning rate is constant (``--lr-init LR --warmup-ratio 0 --lr-end-ratio 1``): every step is a
step at the published peak, where a block spends most of its 300 steps.

One thing differs from a real block: the reward. The random tiny model's completions all get the same
DIPG reward (zero advantages: nothing to learn, the adapters would move by weight decay only), so a
scripted reward, the share of a completion's characters that are Latin letters, gives every group a
spread and the policy one direction to move in. The tiny model's lora_a entries are also larger than
the 1B's (he-uniform over a fan-in of 64-128, not 1,152-6,912), so fewer of them can move in bfloat16;
test_lora_precision.py states the rule (which entries one step can move) for any values.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import data
import grpo
import model as M
import train

RUN_FLAGS = ["--phase", "grpo", "--model", "tiny", "--dtype", "bfloat16", "--allow-cpu", "--num-generations", "2",
             "--n-prompts", "8", "--max-prompt-length", "128", "--max-tokens-to-generate", "16",
             "--kv-cache-size", "256", "--sample-every", "0", "--warmup-ratio", "0", "--lr-end-ratio", "1"]


def latin_share(prompts, completions, **_):
    """The scripted reward: the share of a completion's characters that are Latin letters."""
    return [sum(ch.isascii() and ch.isalpha() for ch in str(c)) / max(len(str(c)), 1) for c in completions]


def adapters(model) -> dict[str, np.ndarray]:
    """Every LoRA array of a model by its path, as float32 numpy (exact for bfloat16 values)."""
    leaves = jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.LoRAParam))
    return {jax.tree_util.keystr(path): np.asarray(x, dtype=np.float32) for path, x in leaves}


def fixed_completions(tokenizer, n: int = 4, length: int = 128) -> jnp.ndarray:
    rows = [data.to_sft_example(r) for r in data.load_dipg("builtin", "train", n=n)]
    ids = [[tokenizer.bos_id()] + tokenizer.encode(r["prompt"] + r["completion"]) for r in rows]
    return jnp.array([x[-length:] for x in ids])


def logprobs(model, tokens) -> np.ndarray:
    from tunix.sft import utils

    mask = jnp.ones_like(tokens, dtype=bool)
    logits, _ = model(tokens, positions=utils.build_positions_from_mask(mask), cache=None,
                      attention_mask=utils.make_causal_attn_mask(mask))
    return np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1))


def as_float32(model):
    """The same weights in float32 (every bfloat16 value is exact there), in place."""
    nnx.update(model, jax.tree.map(lambda x: x.astype(jnp.float32), nnx.state(model, nnx.Param)))
    return model


def kl(logp, start_logp) -> float:
    """Mean over token positions of KL(policy || start) over the whole vocabulary."""
    return float(np.mean(np.sum(np.exp(logp) * (logp - start_logp), axis=-1)))


def measure(run_dir: Path, start, start_logp, tokens) -> dict:
    """What training changed: adapter entries (final checkpoint vs init) and the policy (KL to start)."""
    trained, _, meta = M.load_run(run_dir, dtype="bfloat16")
    after = adapters(trained)
    record = {"adapter_dtype": str(next(iter(jax.tree.leaves(nnx.state(trained, nnx.LoRAParam)))).dtype),
              "checkpoint_step": meta["checkpoint_step"]}
    for kind in ("lora_a", "lora_b"):
        keys = [k for k in after if kind in k]
        delta = np.concatenate([(after[k] - start[k]).ravel() for k in keys])
        record[f"{kind}_changed"] = float(np.mean(delta != 0))
        record[f"{kind}_mean_abs_change"] = float(np.mean(np.abs(delta)))
    record["kl_bf16_forward"] = kl(logprobs(trained, tokens), start_logp["bfloat16"])
    record["kl_to_start_per_token"] = kl(logprobs(as_float32(trained), tokens), start_logp["float32"])
    return record


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20, help="GRPO steps per run (default %(default)s)")
    p.add_argument("--lr", type=float, action="append", help="learning rate (repeatable; default 3e-6 and 2e-5)")
    p.add_argument("--lora-rank", type=int, default=64, help="default %(default)s (published)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write the JSON records to this file")
    args = p.parse_args(argv)
    lrs = args.lr or [3e-6, 2e-5]

    # The start both adapter dtypes share: qwix's seeded init (bf16 values) and its policy (= the base).
    base, tokenizer, _ = M.load("tiny", dtype="bfloat16", seed=args.seed)
    start_model = M.apply_lora(base, rank=args.lora_rank, alpha=float(args.lora_rank), seed=args.seed)
    start, tokens = adapters(start_model), fixed_completions(tokenizer)
    start_logp = {"bfloat16": logprobs(start_model, tokens)}
    start_logp["float32"] = logprobs(as_float32(start_model), tokens)

    records = []
    with tempfile.TemporaryDirectory(prefix="lora_precision_") as tmp:
        for lr in lrs:
            for lora_dtype in ("base", "float32"):
                run_dir = Path(tmp) / f"{lora_dtype}_{lr:g}"
                argv_run = [*RUN_FLAGS, "--lora-dtype", lora_dtype, "--learning-rate", str(lr), "--lr-init", str(lr),
                            "--steps", str(args.steps), "--lora-rank", str(args.lora_rank),
                            "--lora-alpha", str(float(args.lora_rank)), "--seed", str(args.seed),
                            "--save-every", str(args.steps), "--out", str(run_dir)]
                with mock.patch.object(grpo, "reward_functions", lambda config: [latin_share]):
                    train.main(argv_run)
                rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
                record = {"learning_rate": lr, "lora_dtype": lora_dtype, "steps": len(rows),
                          **measure(run_dir, start, start_logp, tokens)}
                print(json.dumps(record), flush=True)
                records.append(record)
    print("\n| lr | --lora-dtype | lora_a changed | lora_a mean abs change | lora_b changed | "
          "lora_b mean abs change | KL to start per token | same, bf16 forward |\n|---|---|---|---|---|---|---|---|")
    for r in records:
        print(f"| {r['learning_rate']:g} | {r['lora_dtype']} ({r['adapter_dtype']}) | {r['lora_a_changed']:.1%} | "
              f"{r['lora_a_mean_abs_change']:.2e} | {r['lora_b_changed']:.1%} | {r['lora_b_mean_abs_change']:.2e} | "
              f"{r['kl_to_start_per_token']:.2e} | {r['kl_bf16_forward']:.2e} |")
    if args.out:
        Path(args.out).write_text(json.dumps(records, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
