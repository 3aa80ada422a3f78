"""The published mesh on 8 devices (the published run sharded fsdp=8 over a TPU v5e-8), checked on this CPU.

One child process sees 8 CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8). For the
meshes fsdp=1 (one device: the reference), fsdp=8 (the published one) and fsdp=4,tp=2 it builds a
`tiny` GRPO block and a `tiny` SFT block exactly as train.py does (its --print-config, then
grpo.build / sft.build) and:

* trains one real step of each (Tunix's GRPOLearner: rollout, reference pass, update; Tunix's
  PeftTrainer) -- the GRPO rollouts come out the same on every mesh, so the step's gradient norm
  and the SFT step's new LoRA weights are compared with the one-device run's;
* reads the shardings of the real arrays, as built and after the step: base weights and LoRA
  adapters split over the mesh axes Tunix and qwix declare for them, the optimizer state Tunix
  holds (Adam moments, accumulated gradients) split as its parameter;
* computes the loss and LoRA gradients of a step with the trainer's own loss function on
  identical inputs (the first GRPO step's loss is 0 by construction: ratio 1, no KL yet, equal
  completion lengths; so here advantages, old and reference log-probs make every term count), and
  compares them with the one-device values;
* reads XLA's compiled program of that loss and gradient: the while loops over chunks (lax.map in
  the forward pass, its transpose in the backward pass, with the recomputation) must not move
  anything vocabulary-sized between devices. Every collective inside them is bounded by one
  chunk's hidden states, chunk_size x D numbers, so a pass's traffic does not grow with the number
  of chunks (grpo_loss.unembedding says why the logits alone would be 256 MiB per chunk).
"""

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
MESHES = ("fsdp=1", "fsdp=8", "fsdp=4,tp=2")
GRPO_FLAGS = ["--phase", "grpo", "--model", "tiny", "--n-prompts", "2", "--num-generations", "2",
              "--max-prompt-length", "64", "--max-tokens-to-generate", "8", "--kv-cache-size", "128",
              "--lora-rank", "8", "--steps", "1", "--logps-chunk-size", "16"]
# The builtin SFT examples are 500-1,000 tokens long: of the first 40, 600 tokens keep three (a batch of 2).
SFT_FLAGS = ["--phase", "sft", "--model", "tiny", "--n-prompts", "40", "--max-seq-length", "600",
             "--gradient-accumulation-steps", "1", "--lora-rank", "8", "--steps", "1", "--logps-chunk-size", "128",
             "--max-tokens-to-generate", "0"]
V, D, HIDDEN = 262144, 64, 128  # tiny's vocabulary, width and MLP width (model.tiny_config)
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")


# ----------------------------------------------------------------------------------------------
# Reading XLA's compiled program (HLO text)
# ----------------------------------------------------------------------------------------------

def hlo_computations(text: str) -> dict[str, list[str]]:
    """Compiled HLO text -> {computation name: its instruction lines}."""
    computations, lines = {}, None
    for line in text.splitlines():
        header = re.match(r"(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if header and not line.startswith(" "):
            lines = computations[header.group(1)] = []
        elif lines is not None:
            lines.append(line)
    return computations


def _called(line: str) -> list[str]:
    names = re.findall(r"(?:body|condition|to_apply|calls|true_computation|false_computation)=%?([\w.\-]+)", line)
    for group in re.findall(r"(?:branch_computations|called_computations)=\{([^}]*)\}", line):
        names += [name.strip().lstrip("%") for name in group.split(",")]
    return names


def _reachable(computations: dict, root: str) -> set[str]:
    seen, todo = set(), [root]
    while todo:
        name = todo.pop()
        if name not in seen and name in computations:
            seen.add(name)
            todo += [c for line in computations[name] for c in _called(line)]
    return seen


def _shapes(text: str) -> list[tuple[int, ...]]:
    return [tuple(int(d) for d in dims.split(",") if d) for dims in re.findall(r"\b[a-z]+\d*\[([\d,]*)\]", text)]


def chunk_loops(text: str, vocab_size: int) -> list[list[tuple[str, list]]]:
    """The while loops of a compiled program that compute logits (an array with a vocabulary-sized
    dimension: V, or V split over up to 8 devices), each as [(collective, its shapes), ...] found in
    its body and everything the body calls (conditionals included)."""
    computations = hlo_computations(text)
    loops = []
    for lines in computations.values():
        for line in lines:
            if " while(" not in line:
                continue
            body = _reachable(computations, re.search(r"body=%?([\w.\-]+)", line).group(1))
            body_lines = [l for name in body for l in computations[name]]
            if not any(d >= vocab_size // 8 for l in body_lines for s in _shapes(l) for d in s):
                continue
            found = []
            for l in body_lines:
                op = next((op for op in COLLECTIVES if re.search(rf"\s{op}(-start)?\(", l)), None)
                if op:
                    found.append((op, _shapes(l.split("=", 1)[1].split(f" {op}")[0])))
            loops.append(found)
    return loops


# ----------------------------------------------------------------------------------------------
# The child process: 8 CPU devices
# ----------------------------------------------------------------------------------------------

def _config(flags: list[str]) -> dict:
    """The block's configuration as `python train.py FLAGS --print-config` prints it."""
    import train

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        train.main(flags + ["--print-config"])
    return json.loads(out.getvalue())


def _sharding_report(model, optimizer, mesh) -> dict:
    """Every weight (base and LoRA) against the mesh axes Tunix declares for it, every optimizer
    array against its parameter's sharding, and the shard shapes of three arrays."""
    import jax
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    wrong, lora = [], {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        array, name = var.get_value(), "/".join(map(str, path))
        declared = NamedSharding(mesh, PartitionSpec(*(var.sharding_names or ())))
        if not array.sharding.is_equivalent_to(declared, array.ndim):
            wrong.append(f"{name}: {array.sharding.spec} but declared {declared.spec}")
        if isinstance(var, nnx.LoRAParam):
            lora[name] = array.sharding
    n_optimizer = 0
    for path, var in nnx.to_flat_state(nnx.state(optimizer, nnx.optimizer.OptState)):
        array, name = var.get_value(), "/".join(map(str, path))
        param = next((p for p in lora if name.endswith("/" + p)), None)
        if param is not None and isinstance(array, jax.Array):
            n_optimizer += 1
            if not array.sharding.is_equivalent_to(lora[param], array.ndim):
                wrong.append(f"optimizer {name}: {array.sharding.spec} but its parameter has {lora[param].spec}")
    layer = model.layers[0]
    shard = lambda a: list(a.get_value().addressable_shards[0].data.shape)
    return {"wrong": wrong, "n_lora": len(lora), "n_optimizer_arrays": n_optimizer,
            "embedding_shard": shard(model.embedder.input_embedding),
            "gate_lora_a_shard": shard(layer.mlp.gate_proj.kernel_lora_a),
            "gate_lora_b_shard": shard(layer.mlp.gate_proj.kernel_lora_b)}


def _loss_and_grads(trainer, batch, has_aux: bool, mesh) -> dict:
    """Tunix's train step without the update (PeftTrainer._train_step: the trainer's input function,
    then value_and_grad of its loss over the LoRA params), on `batch` sharded as Tunix shards it,
    compiled once: its values and its compiled program."""
    import jax
    from flax import nnx
    from tunix.sft import sharding_utils

    graphdef, state = nnx.split(trainer.model)

    def loss_and_grads(state, batch):
        grad_fn = nnx.value_and_grad(trainer.loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam), has_aux=has_aux)
        return grad_fn(nnx.merge(graphdef, state), **trainer.gen_model_input_fn(batch))

    with mesh:
        batch = sharding_utils.shard_input(batch, trainer.config.data_sharding_axis)
        compiled = jax.jit(loss_and_grads).lower(state, batch).compile()
        out, grads = compiled(state, batch)
    loss, aux = out if has_aux else (out, {})
    return {"loss": float(loss), "aux": {k: float(v) for k, v in aux.items()},
            "grads": [np.asarray(g).tolist() for g in jax.tree.leaves(grads)],
            "loops": chunk_loops(compiled.as_text(), trainer.model.embedder.input_embedding.shape[0])}


def _grpo_example(config):
    """A TrainExample of 8 rows (split over the batch axis), prompts with left padding, completions
    with right padding, advantages of both signs, old-policy log-probs that make the ratio clip and
    reference log-probs that make the KL count."""
    import jax.numpy as jnp
    from tunix.rl.grpo import grpo_learner

    rng = np.random.default_rng(0)
    rows, prompt_len, length = 8, config["max_prompt_length"], config["max_tokens_to_generate"]
    prompt = rng.integers(5, 50_000, (rows, prompt_len))
    prompt[:, : prompt_len // 4] = 0  # pad id 0
    completion = rng.integers(5, 50_000, (rows, length))
    completion[::3, length // 2:] = 0
    return grpo_learner.TrainExample(
        prompt_ids=jnp.asarray(prompt, jnp.int32), prompt_mask=jnp.asarray(prompt != 0, jnp.int32),
        completion_ids=jnp.asarray(completion, jnp.int32), completion_mask=jnp.asarray(completion != 0, jnp.int32),
        advantages=jnp.asarray(rng.normal(0, 1, rows), jnp.float32),
        ref_per_token_logps=jnp.asarray(rng.normal(-12.5, 0.5, (rows, length)), jnp.float32),
        old_per_token_logps=jnp.asarray(rng.normal(-12.5, 0.5, (rows, length)), jnp.float32))


def _grpo(mesh_flag: str, root: Path) -> dict:
    from tunix.rl import rl_cluster as rl

    import grpo
    import runs

    config = _config(GRPO_FLAGS + ["--mesh", mesh_flag])
    sampled = []

    def reward(prompts, completions, **_):  # a spread of rewards, so the step's gradient is not 0
        sampled.extend(completions)
        return [float(len(set(c))) for c in completions]

    run_dir = runs.prepare_run_dir(root / f"grpo {mesh_flag}", config)
    block = grpo.build(config, run_dir, reward_fns=[reward])
    trainer, mesh = block["cluster"].actor_trainer, block["cluster"].cluster_config.role_to_mesh[rl.Role.ACTOR]
    result = {"shardings": {"built": _sharding_report(trainer.model, trainer.optimizer, mesh)},
              "identical_inputs": _loss_and_grads(trainer, _grpo_example(config), True, mesh)}
    block["metrics"].start(0)
    block["learner"].train(block["batches"])
    block["metrics"].finish()
    (step,) = runs.read_rows(run_dir)  # RUN_DIR/metrics.jsonl: the step's row
    result.update(completions=sampled, step={k: step[k] for k in ("loss", "grad_norm", "reward_mean")})
    result["shardings"]["after one step"] = _sharding_report(trainer.model, trainer.optimizer, mesh)
    return result


def _sft(mesh_flag: str, root: Path) -> dict:
    import jax
    from flax import nnx

    import runs
    import sft

    config = _config(SFT_FLAGS + ["--mesh", mesh_flag])
    block = sft.build(config, runs.prepare_run_dir(root / f"sft {mesh_flag}", config))
    trainer, mesh = block["trainer"], block["mesh"]
    # The loss of the batch the step then trains on, with the weights it starts from: the step's loss.
    result = {"shardings": {"built": _sharding_report(trainer.model, trainer.optimizer, mesh)},
              "identical_inputs": _loss_and_grads(trainer, block["batches"][0], False, mesh)}
    with warnings.catch_warnings(action="ignore", category=DeprecationWarning), mesh:
        trainer.train(block["batches"])
    lora = nnx.state(trainer.model, nnx.LoRAParam)
    result["lora_after_step"] = [np.asarray(x).tolist() for x in jax.tree.leaves(lora)]
    result["shardings"]["after one step"] = _sharding_report(trainer.model, trainer.optimizer, mesh)
    return result


def child(out: str) -> None:
    """Both phases on every mesh, one after the other; what was seen goes to `out` (JSON)."""
    root, results = Path(tempfile.mkdtemp(prefix="test_mesh_")), {}
    for mesh_flag in MESHES:
        start = time.time()
        results[mesh_flag] = {"grpo": _grpo(mesh_flag, root), "sft": _sft(mesh_flag, root)}
        print(f"{mesh_flag}: {time.time() - start:.1f} s", flush=True)
    Path(out).write_text(json.dumps(results))


# ----------------------------------------------------------------------------------------------
# The test
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def on_eight_devices(tmp_path_factory):
    """{mesh: {phase: what the child process saw}}."""
    out = tmp_path_factory.mktemp("mesh") / "results.json"
    env = dict(os.environ, PYTHONPATH=str(HERE), XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, "-c", "import sys, test_mesh; test_mesh.child(sys.argv[1])", str(out)],
                          cwd=HERE, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("when", ["built", "after one step"])
@pytest.mark.parametrize("mesh", MESHES[1:])
@pytest.mark.parametrize("phase", ["grpo", "sft"])
def test_weights_adapters_and_optimizer_are_sharded_as_declared(on_eight_devices, phase, mesh, when):
    """From the start: arrays whose layout changed after the first update would make the sampler and
    the train step compile again at step 2."""
    fsdp, tp = (8, 1) if mesh == "fsdp=8" else (4, 2)
    report = on_eight_devices[mesh][phase]["shardings"][when]
    assert report["wrong"] == []
    assert report["n_lora"] == 24 and report["n_optimizer_arrays"] >= 2 * 24  # Adam's mu and nu at least
    assert report["embedding_shard"] == [V // tp, D // fsdp]  # vocabulary over tp, width over fsdp
    assert report["gate_lora_a_shard"] == [D // fsdp, 8]  # LoRA A [width, rank]: as its kernel's input
    assert report["gate_lora_b_shard"] == [8, HIDDEN // tp]  # LoRA B [rank, hidden]: as its kernel's output


@pytest.mark.parametrize("mesh", MESHES[1:])
@pytest.mark.parametrize("phase", ["grpo", "sft"])
def test_loss_and_gradients_equal_the_one_device_run(on_eight_devices, phase, mesh):
    one, many = on_eight_devices["fsdp=1"][phase]["identical_inputs"], on_eight_devices[mesh][phase]["identical_inputs"]
    assert abs(one["loss"]) > 1e-3  # every term counts (see _grpo_example)
    np.testing.assert_allclose(many["loss"], one["loss"], rtol=1e-5)
    for key in one["aux"]:
        np.testing.assert_allclose(many["aux"][key], one["aux"][key], rtol=1e-5, atol=1e-6)
    assert any(np.abs(g).max() > 0 for g in map(np.asarray, one["grads"]))
    scale = max(np.abs(g).max() for g in map(np.asarray, one["grads"]))  # float32 sums in another order
    for got, expected in zip(many["grads"], one["grads"], strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("mesh", MESHES[1:])
def test_one_real_step_equals_the_one_device_run(on_eight_devices, mesh):
    one, many = on_eight_devices["fsdp=1"], on_eight_devices[mesh]
    # GRPO: the same sampled completions (same seed, the same logits up to rounding), the same update.
    assert many["grpo"]["completions"] == one["grpo"]["completions"]
    assert one["grpo"]["step"]["grad_norm"] > 0
    np.testing.assert_allclose(many["grpo"]["step"]["grad_norm"], one["grpo"]["step"]["grad_norm"], rtol=1e-5)
    np.testing.assert_allclose(many["grpo"]["step"]["loss"], one["grpo"]["step"]["loss"], atol=1e-6)
    # SFT: the same batch, the same new LoRA weights.
    for got, expected in zip(many["sft"]["lora_after_step"], one["sft"]["lora_after_step"], strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mesh", MESHES[1:])
@pytest.mark.parametrize("phase", ["grpo", "sft"])
def test_no_vocabulary_sized_collective_inside_the_chunk_loop(on_eight_devices, phase, mesh):
    """The forward loop and the backward loop (recomputation + gradient) exist, and every collective
    in them moves at most one chunk's hidden states (chunk x D numbers), never its logits."""
    config_flags = GRPO_FLAGS if phase == "grpo" else SFT_FLAGS
    chunk = int(config_flags[config_flags.index("--logps-chunk-size") + 1])
    loops = on_eight_devices[mesh][phase]["identical_inputs"]["loops"]
    assert len(loops) == 2, loops  # lax.map in the forward pass, its transpose in the backward pass
    too_big = [(op, shapes) for loop in loops for op, shapes in loop
               if max(int(np.prod(s)) for s in shapes) > chunk * D]
    assert too_big == [], f"collectives inside the chunk loop larger than a chunk's hidden states: {too_big}"
