"""Tests for export.py: each exported file loaded by the library that reads it (transformers, PEFT, our GGUF
reader), its logits and greedy text compared with our JAX model carrying its LoRA.

`tiny` here has 6 layers (so one is global, as every sixth in Gemma 3) and random norm scales, with LoRA
rank 4 and alpha 8 (a scaling error would show); the 270M has taken 2 SFT steps at 1e-3 through train.py.
"""

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file
from tunix.models.gemma3 import model as gemma3_lib
from tunix.models.gemma3 import params_safetensors

import data
import export
import gemma3_270m as G
import gsm8k
import model as M
import runs
from test_model import forward_logits

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

HERE = Path(__file__).resolve().parent
PROMPT = data.format_prompt(data.user_content_for("Weight 12 kg (2026-01-03); 14 kg (2026-02-01).\n  Dose: 5 mg/kg.",
                                                  "What dose for the latest weight?"))
TEXTS = [PROMPT, "  two  spaces\tand\ttabs\n\n<end_of_turn> <start_of_turn>x", "ünïcode 日本語 🙂 1,234.5"]


def hf_logits(hf_model, ids) -> np.ndarray:
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].float().numpy()


def hf_greedy(hf_model, tokenizer, ids, n) -> str:
    out = hf_model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)[0, len(ids):].tolist()
    return tokenizer.decode([t for t in out if t not in (1, 106)])  # generate keeps the stop token; ours drops it


def read_gguf(path: Path, folder: Path, config) -> nnx.Module:
    """The GGUF read back as the embedded 270M is: our converter, then Tunix's loader."""
    folder.mkdir()
    G.convert_gguf_to_hf(path, folder)
    return params_safetensors.create_model_from_safe_tensors(str(folder), config, dtype=jnp.float32)


# ---------------------------------------------------------------- tiny

def hf_weights(model, cfg) -> dict:
    """A Tunix Gemma 3's weights under Hugging Face names and layouts (the inverse of Tunix's loader): tiny's
    base folder, as a downloaded model's would be."""
    names = {"embedder.input_embedding": "embed_tokens", "final_norm.scale": "norm", "attn.q_einsum.w": "self_attn.q_proj",
             "attn.attn_vec_einsum.w": "self_attn.o_proj", "attn._query_norm.scale": "self_attn.q_norm",
             "attn._key_norm.scale": "self_attn.k_norm", "pre_attention_norm.scale": "input_layernorm",
             "post_attention_norm.scale": "post_attention_layernorm", "pre_ffw_norm.scale": "pre_feedforward_layernorm",
             "post_ffw_norm.scale": "post_feedforward_layernorm"}
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        key, w = ".".join(map(str, path)), np.asarray(var.get_value(), np.float32)
        layer, _, part = key.removeprefix("layers.").partition(".")
        prefix, part = ("model.", key) if key in names else (f"model.layers.{layer}.", part)
        if part == "attn.kv_einsum.w":  # [2, K, D, h] -> k_proj, v_proj [K * h, D]
            for i, proj in enumerate(("k_proj", "v_proj")):
                out[f"{prefix}self_attn.{proj}.weight"] = w[i].transpose(0, 2, 1).reshape(-1, cfg.embed_dim)
            continue
        if part == "attn.q_einsum.w":  # [H, D, h]
            w = w.transpose(0, 2, 1).reshape(-1, cfg.embed_dim)
        elif part == "attn.attn_vec_einsum.w":  # [H, h, D]
            w = w.reshape(-1, cfg.embed_dim).T
        elif part.startswith("mlp."):  # [in, out]
            w = w.T
        out[prefix + names.get(part, part.removesuffix(".kernel")) + ".weight"] = np.ascontiguousarray(w)
    return out


@pytest.fixture(scope="module")
def tiny6(tmp_path_factory):
    """A 6-layer tiny with random weights (its base folder written as a download's) and random adapters, exported
    with --peft and a GGUF of each type."""
    config = dataclasses.replace(M.tiny_config(), num_layers=6)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: gemma3_lib.Gemma3(config, rngs=nnx.Rngs(params=0))))
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda x: rng.standard_normal(x.shape, dtype=np.float32) * (0.125 if len(x.shape) > 1 else 0.3), state)
    base = nnx.merge(graphdef, state)
    root, tok_path = tmp_path_factory.mktemp("tiny6"), G.ensure_gemma3_270m() / "tokenizer.model"
    (root / "base").mkdir()
    save_file(hf_weights(base, config), str(root / "base" / "model.safetensors"))
    shutil.copy(tok_path, root / "base" / "tokenizer.model")
    G.complete_hf_folder(root / "base", export.hf_config(config, "float32"))
    lora = M.apply_lora(base, rank=4, alpha=8)
    nnx.update(lora, jax.tree.map(lambda x: rng.standard_normal(x.shape, dtype=np.float32) * 0.3,
                                  nnx.state(lora, nnx.LoRAParam)))
    meta = {"model": "tiny", "lora_rank": 4, "lora_alpha": 8, "run_dir": str(root / "run"), "checkpoint_step": 1}
    export.export_model(lora, root / "base", root / "out", meta, peft=True, gguf="f32")
    export.export_model(lora, root / "base", root / "q8", meta, gguf="q8_0")
    tokenizer = M.load_tokenizer(tok_path)
    ids = [tokenizer.bos_id()] + tokenizer.encode(PROMPT)  # 147 tokens: past the 16-token sliding window
    return {"root": root, "config": config, "lora": lora, "tokenizer": tokenizer, "ids": ids,
            "ours": np.asarray(forward_logits(lora, [ids]))[0], "base": np.asarray(forward_logits(base, [ids]))[0]}


def test_tiny_merged_folder_loads_in_transformers_with_our_logits(tiny6):
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny6["root"] / "out", dtype=torch.float32)
    assert np.abs(tiny6["ours"] - tiny6["base"]).max() > 1.0  # the LoRA matters here
    np.testing.assert_allclose(hf_logits(hf, tiny6["ids"]), tiny6["ours"], atol=1e-4, rtol=0)
    tok = transformers.AutoTokenizer.from_pretrained(tiny6["root"] / "out")
    ours = M.generate(tiny6["lora"], tiny6["tokenizer"], [PROMPT], 12, progress=False)[0]["text"]
    assert hf_greedy(hf, tok, tiny6["ids"], 12) == ours


def test_tiny_peft_adapter_on_the_base_gives_our_logits(tiny6):
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny6["root"] / "base", dtype=torch.float32)
    np.testing.assert_allclose(hf_logits(base, tiny6["ids"]), tiny6["base"], atol=1e-4, rtol=0)
    with_adapter = peft.PeftModel.from_pretrained(base, tiny6["root"] / "out" / "peft")
    np.testing.assert_allclose(hf_logits(with_adapter, tiny6["ids"]), tiny6["ours"], atol=1e-4, rtol=0)
    adapter = json.loads((tiny6["root"] / "out" / "peft" / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"]) == (4, 8)
    assert set(adapter["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


# Measured on tiny6 (2026-12-07): f32 within 3.6e-5; q8_0 off by 4.7% of the logits' RMS (max 0.83 of logits up
# to 6; 90% of argmaxes kept: random weights amplify the 8-bit rounding layer by layer).
@pytest.mark.parametrize("kind, folder", [("f32", "out"), ("q8_0", "q8")])
def test_tiny_gguf_read_back_gives_our_logits(tiny6, tmp_path, kind, folder):
    model = read_gguf(tiny6["root"] / folder / f"tiny-{kind}.gguf", tmp_path / "read", tiny6["config"])
    theirs, ours = np.asarray(forward_logits(model, [tiny6["ids"]]))[0], tiny6["ours"]
    if kind == "f32":
        np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
    else:
        assert np.sqrt(((theirs - ours) ** 2).mean() / (ours ** 2).mean()) < 0.1


def test_folder_tokenizer_and_chat_template_are_ours(tiny6):
    out = tiny6["root"] / "out"
    tok = transformers.AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        assert tok(text)["input_ids"] == [tiny6["tokenizer"].bos_id()] + tiny6["tokenizer"].encode(text)
    user = data.user_content_for("Some context.", "A question?")
    dipg = [{"role": "system", "content": data.SYSTEM_PROMPT}, {"role": "user", "content": user}]
    assert tok.apply_chat_template(dipg, tokenize=False, add_generation_prompt=True) == "<bos>" + data.format_prompt(user)
    question = "Tom has 3 apples and buys 4 more. How many?"
    math = gsm8k.gsm8k_prompt(question)
    user = math.removeprefix("<start_of_turn>user\n").split("<end_of_turn>")[0]
    assert tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                   add_generation_prompt=True) == "<bos>" + math
    config, generation = (json.loads((out / f).read_text()) for f in ("config.json", "generation_config.json"))
    assert config["max_position_embeddings"] == 32768 and config["query_pre_attn_scalar"] == 32
    assert generation["eos_token_id"] == [1, 106]


def test_refusals_are_one_line(tmp_path, capsys):
    def refused(run_dir, *flags):
        with pytest.raises(SystemExit) as e:
            export.main([str(run_dir), "--out", str(tmp_path / "out"), *flags])
        assert len(str(e.value).splitlines()) == 1
        return str(e.value)

    meta = {"model": "tiny", "lora_rank": 4, "lora_alpha": 4, "checkpoint_dir": "checkpoints"}
    for run in ("untrained", "gone"):
        (tmp_path / run).mkdir()
    runs.write_json(tmp_path / "untrained" / "metadata.json", meta)
    assert "no checkpoint" in refused(tmp_path / "untrained")
    (tmp_path / "gone" / "checkpoints" / "10").mkdir(parents=True)
    runs.write_json(tmp_path / "gone" / "metadata.json", dict(meta, model="gemma-3-1b-it", model_path=str(tmp_path / "nowhere")))
    assert "--model-path" in refused(tmp_path / "gone")
    (tmp_path / "untrained" / "checkpoints" / "3").mkdir(parents=True)
    assert "no base weights" in refused(tmp_path / "untrained")
    assert "no metadata.json" in refused(tmp_path)
    (tmp_path / "out").mkdir()
    assert "--overwrite" in refused(tmp_path / "untrained")
    assert (tmp_path / "out").is_dir() and not any((tmp_path / "out").iterdir())


# ---------------------------------------------------------------- the embedded 270M after 2 SFT steps at 1e-3

@pytest.fixture(scope="module")
def sft270(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft270")
    args = ["--phase", "sft", "--model", "gemma-3-270m", "--steps", "2", "--learning-rate", "1e-3", "--save-every", "2",
            "--batch-size", "1", "--gradient-accumulation-steps", "1", "--max-seq-length", "512",
            "--max-tokens-to-generate", "0", "--remat", "none", "--sample-every", "0", "--out", str(root / "sft")]
    proc = subprocess.run([sys.executable, str(HERE / "train.py"), *args], capture_output=True, text=True, cwd=HERE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    export.main([str(root / "sft"), "--out", str(root / "out"), "--peft", "--gguf", "f32"])
    model, tokenizer, _ = M.load_run(root / "sft")
    prompts = [PROMPT, "<start_of_turn>user\nName three colours.<end_of_turn>\n<start_of_turn>model\n"]
    ids = [[tokenizer.bos_id()] + tokenizer.encode(p) for p in prompts]
    return {"root": root, "model": model, "tokenizer": tokenizer, "prompts": prompts, "ids": ids,
            "ours": [np.asarray(forward_logits(model, [i]))[0] for i in ids]}


def test_270m_merged_folder_and_peft_adapter_give_our_logits_and_text(sft270):
    out = sft270["root"] / "out"
    merged = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    base = transformers.AutoModelForCausalLM.from_pretrained(G.ensure_gemma3_270m(), dtype=torch.float32)
    base_logits = hf_logits(base, sft270["ids"][1])
    with_adapter = peft.PeftModel.from_pretrained(base, out / "peft")
    for ids, ours in zip(sft270["ids"], sft270["ours"]):
        np.testing.assert_allclose(hf_logits(merged, ids), ours, atol=1e-3, rtol=0)
        np.testing.assert_allclose(hf_logits(with_adapter, ids), ours, atol=1e-3, rtol=0)
    assert np.abs(base_logits - sft270["ours"][1]).max() > 1.0  # 2 steps at 1e-3 moved the model
    tok = transformers.AutoTokenizer.from_pretrained(out)
    texts = M.generate(sft270["model"], sft270["tokenizer"], sft270["prompts"], 16, progress=False)
    assert [hf_greedy(merged, tok, ids, 16) for ids in sft270["ids"]] == [t["text"] for t in texts]
    card = (out / "README.md").read_text()
    sha = json.loads((G.ensure_gemma3_270m() / "provenance.json").read_text())["weights_sha256"]
    assert sha in card and "checkpoint step 2" in card and "sft (global steps 1-2, builtin:dipg/train)" in card


def test_270m_gguf_read_back_gives_our_logits(sft270, tmp_path):
    model = read_gguf(sft270["root"] / "out" / "gemma-3-270m-f32.gguf", tmp_path / "read", sft270["model"].config)
    for ids, ours in zip(sft270["ids"], sft270["ours"]):
        np.testing.assert_allclose(np.asarray(forward_logits(model, [ids]))[0], ours, atol=1e-3, rtol=0)
