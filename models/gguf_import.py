"""Import a llama-architecture GGUF file as an HF-format model directory.

A GGUF packs (often quantized) weights, the hyperparameters and the tokenizer into one file under
llama.cpp's names. The rest of afdserve reads one format only, an HF directory, so a GGUF is
converted once and then loaded like any other checkpoint:

    metadata  ──► config.json, generation_config.json
    tensors   ──► dequantize ──► HF names, q/k un-permuted ──► model.safetensors (float32)
    tokenizer ──► tokenizer.json (byte-level BPE), tokenizer_config.json (chat template)

Everything is written into a staging directory beside `out_dir` and renamed into place at the end,
so a crash never leaves a half-imported model where a cache lookup would find it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader
from gguf.gguf_reader import ReaderTensor
from gguf.quants import dequantize
from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE
from tqdm import tqdm

# Written last into every imported directory: which file it came from, so a cache can tell a
# stale import (the GGUF was replaced) from a current one.
SOURCE_RECORD = "gguf_source.json"

_SUPPORTED_ARCHITECTURES = ("llama",)

# GGUF tensor name -> HF name. Per-layer names are `blk.{i}.<key>` -> `model.layers.{i}.<value>`.
_GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4

# Llama-3's split regex, as in its tokenizer.json (llama.cpp calls it "llama-bpe").
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class _TensorJob:
    """One GGUF tensor on its way into model.safetensors."""

    hf_name: str
    source: ReaderTensor
    shape: tuple[int, ...]  # HF (row-major) shape
    rotary_heads: int | None  # un-permute q/k rows over this many heads; None leaves it as is


def import_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Convert a llama-architecture GGUF into an HF model directory at `out_dir` and return it.

    An existing `out_dir` is replaced only once the new import is complete.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    reader = _open_gguf(gguf_path)
    meta = _read_metadata(reader, gguf_path)
    config = _llama_config(meta, reader, gguf_path)
    jobs = _tensor_jobs(reader, config, gguf_path)
    tokenizer = _build_tokenizer(meta, gguf_path)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    try:
        _write_json(staging / "config.json", config)
        _write_json(staging / "generation_config.json", _generation_config(meta))
        _write_json(staging / "tokenizer_config.json", _tokenizer_config(meta, config))
        tokenizer.save(str(staging / "tokenizer.json"))
        _write_safetensors(staging / "model.safetensors", jobs, gguf_path)
        _write_json(staging / SOURCE_RECORD, gguf_source_record(gguf_path))
        staging.chmod(0o755)  # mkdtemp makes it private; a model cache is readable like any directory
        _move_into_place(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def gguf_source_record(gguf_path: Path) -> dict[str, Any]:
    """What identifies the GGUF an import came from (compared against SOURCE_RECORD)."""
    stat = Path(gguf_path).stat()
    return {"gguf_path": str(Path(gguf_path).resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


# ---------------------------------------------------------------- reading the file


def _open_gguf(path: Path) -> GGUFReader:
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        return GGUFReader(path)
    except Exception as exc:  # the reader fails in many ways (struct, numpy, unicode) on a bad file
        raise ValueError(f"{path} is not a readable GGUF file (corrupt or truncated?): {exc}") from exc


def _read_metadata(reader: GGUFReader, path: Path) -> dict[str, Any]:
    try:
        return {key: field.contents() for key, field in reader.fields.items()}
    except Exception as exc:
        raise ValueError(f"{path} has unreadable GGUF metadata: {exc}") from exc


def _require(meta: dict[str, Any], key: str, path: Path) -> Any:
    if key not in meta:
        raise ValueError(f"{path} lacks the GGUF metadata key {key!r}")
    return meta[key]


def _as_float(value: float) -> float:
    """GGUF stores float32; give back its shortest decimal (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(value)))


# ---------------------------------------------------------------- config.json


def _llama_config(meta: dict[str, Any], reader: GGUFReader, path: Path) -> dict[str, Any]:
    arch = meta.get("general.architecture")
    if arch not in _SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{path}: GGUF architecture {arch!r} is not supported (supported: {', '.join(_SUPPORTED_ARCHITECTURES)})"
        )
    if meta.get(f"{arch}.expert_count", 0):
        raise ValueError(f"{path}: mixture-of-experts GGUFs ({arch}.expert_count > 0) are not supported")

    def key(name: str) -> Any:
        return _require(meta, f"{arch}.{name}", path)

    hidden_size = int(key("embedding_length"))
    num_heads = int(key("attention.head_count"))
    head_dim = int(meta.get(f"{arch}.attention.key_length", hidden_size // num_heads))
    rotary_dim = int(meta.get(f"{arch}.rope.dimension_count", head_dim))
    if rotary_dim != head_dim:
        raise ValueError(
            f"{path}: partial rotary (rope.dimension_count {rotary_dim} != head_dim {head_dim}) is not supported"
        )

    tensor_names = {tensor.name for tensor in reader.tensors}
    tokens = _require(meta, "tokenizer.ggml.tokens", path)
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": hidden_size,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(meta.get(f"{arch}.attention.head_count_kv", num_heads)),
        "head_dim": head_dim,
        "rms_norm_eps": _as_float(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": _as_float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(key("context_length")),
        "vocab_size": int(meta.get(f"{arch}.vocab_size", len(tokens))),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "mlp_bias": "blk.0.ffn_up.bias" in tensor_names,
        "torch_dtype": "float32",
    }
    for name in ("bos", "eos", "padding"):
        token_id = meta.get(f"tokenizer.ggml.{name}_token_id")
        if token_id is not None:
            config[f"{name.replace('padding', 'pad')}_token_id"] = int(token_id)
    rope_scaling = _rope_scaling(meta, arch, tensor_names, path)
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    return config


def _rope_scaling(meta: dict[str, Any], arch: str, tensor_names: set[str], path: Path) -> dict[str, Any] | None:
    if "rope_freqs.weight" in tensor_names:
        raise ValueError(f"{path}: Llama-3.1-style rope scaling (a rope_freqs tensor) is not supported yet")
    kind = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor")
    if kind is None and meta.get(f"{arch}.rope.scale_linear") is not None:
        kind, factor = "linear", meta[f"{arch}.rope.scale_linear"]
    if kind in (None, "none") or factor in (None, 1.0):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": _as_float(factor)}
    if kind == "yarn":
        original = _require(meta, f"{arch}.rope.scaling.original_context_length", path)
        return {"rope_type": "yarn", "factor": _as_float(factor), "original_max_position_embeddings": int(original)}
    raise ValueError(f"{path}: rope scaling type {kind!r} is not supported")


def _generation_config(meta: dict[str, Any]) -> dict[str, Any]:
    """bos/eos ids; a distinct end-of-turn token (Llama-3's <|eot_id|>) also ends generation."""
    ids = {name: meta.get(f"tokenizer.ggml.{name}_token_id") for name in ("bos", "eos", "eot", "padding")}
    stop_ids = list(dict.fromkeys(int(ids[name]) for name in ("eos", "eot") if ids[name] is not None))
    generation: dict[str, Any] = {}
    if ids["bos"] is not None:
        generation["bos_token_id"] = int(ids["bos"])
    if stop_ids:
        generation["eos_token_id"] = stop_ids[0] if len(stop_ids) == 1 else stop_ids
    if ids["padding"] is not None:
        generation["pad_token_id"] = int(ids["padding"])
    return generation


# ---------------------------------------------------------------- model.safetensors


def _tensor_jobs(reader: GGUFReader, config: dict[str, Any], path: Path) -> list[_TensorJob]:
    """Map every GGUF tensor to its HF name; refuse unknown or missing ones rather than guess."""
    by_name = {tensor.name: tensor for tensor in reader.tensors}
    wanted = _hf_names(config)
    unknown = sorted(set(by_name) - set(wanted))
    if unknown:
        raise ValueError(f"{path}: unexpected tensors for a llama model: {', '.join(unknown[:5])}")
    missing = sorted(set(wanted) - set(by_name))
    if missing:
        raise ValueError(f"{path}: missing tensors: {', '.join(missing[:5])}")

    rotary_heads = {
        "attn_q": config["num_attention_heads"],
        "attn_k": config["num_key_value_heads"],
    }
    jobs = []
    for gguf_name, hf_name in wanted.items():
        tensor = by_name[gguf_name]
        role = gguf_name.split(".")[-2]  # blk.3.attn_q.weight -> attn_q
        shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
        jobs.append(_TensorJob(hf_name, tensor, shape, rotary_heads.get(role)))
    return jobs


def _hf_names(config: dict[str, Any]) -> dict[str, str]:
    """GGUF name -> HF name for every tensor this config's llama has."""
    names = {f"{gguf}.weight": f"{hf}.weight" for gguf, hf in _GLOBAL_TENSORS.items()}
    if config["tie_word_embeddings"]:
        del names["output.weight"]
    suffixes = {key: [".weight"] for key in _LAYER_TENSORS}
    if config["attention_bias"]:
        for key in ("attn_q", "attn_k", "attn_v", "attn_output"):
            suffixes[key].append(".bias")
    if config["mlp_bias"]:
        for key in ("ffn_gate", "ffn_up", "ffn_down"):
            suffixes[key].append(".bias")
    for layer in range(config["num_hidden_layers"]):
        for gguf, hf in _LAYER_TENSORS.items():
            for suffix in suffixes[gguf]:
                names[f"blk.{layer}.{gguf}{suffix}"] = f"model.layers.{layer}.{hf}{suffix}"
    return names


def _unpermute_rotary(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation.

    HF rotates pairs (i, i + head_dim/2) of each head (rotate_half); llama.cpp rotates adjacent pairs
    (2i, 2i+1), so its converter interleaves each head's two halves:
    `w.reshape(heads, 2, d/2, ...).swapaxes(1, 2)`. Swapping back restores HF's row order.
    """
    half = weight.shape[0] // num_heads // 2
    return weight.reshape(num_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _dequantized(job: _TensorJob, path: Path) -> np.ndarray:
    try:
        weight = dequantize(job.source.data, job.source.tensor_type)
    except NotImplementedError as exc:
        kind = job.source.tensor_type.name
        raise ValueError(f"{path}: tensor {job.source.name} has unsupported type {kind}") from exc
    weight = np.asarray(weight, dtype=np.float32).reshape(job.shape)
    if job.rotary_heads is not None:
        weight = _unpermute_rotary(weight, job.rotary_heads)
    return np.ascontiguousarray(weight, dtype="<f4")


def _write_safetensors(out_path: Path, jobs: list[_TensorJob], gguf_path: Path) -> None:
    """Stream float32 tensors into a safetensors file, one tensor in memory at a time.

    The format is an 8-byte little-endian header length, a JSON header of dtype/shape/byte range per
    tensor, then the raw bytes; every shape is known up front, so the header is written first.
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for job in jobs:
        size = 4 * math.prod(job.shape)
        header[job.hf_name] = {"dtype": "F32", "shape": list(job.shape), "data_offsets": [offset, offset + size]}
        offset += size
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # keep tensor data 8-byte aligned
    with open(out_path, "wb") as out:
        out.write(len(header_bytes).to_bytes(8, "little"))
        out.write(header_bytes)
        for job in tqdm(jobs, desc=f"importing {gguf_path.name}", unit="tensor"):
            out.write(memoryview(_dequantized(job, gguf_path)).cast("B"))


# ---------------------------------------------------------------- tokenizer


def _build_tokenizer(meta: dict[str, Any], path: Path) -> Tokenizer:
    """Byte-level BPE from the GGUF vocabulary, merges and token types.

    Control tokens become special added tokens so that `<|im_start|>` is matched whole; the
    pre-tokenizer follows `tokenizer.ggml.pre`, the split the merges were learned with.
    """
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"{path}: tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2')")
    tokens = list(_require(meta, "tokenizer.ggml.tokens", path))
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError(f"{path}: the GGUF vocabulary has duplicate tokens")
    merges = [tuple(merge.split(" ", 1)) for merge in _require(meta, "tokenizer.ggml.merges", path)]

    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"), path)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = _post_processor(meta, tokens)

    token_types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    control = [t for t, kind in zip(tokens, token_types) if kind == _TOKEN_CONTROL]
    user_defined = [t for t, kind in zip(tokens, token_types) if kind == _TOKEN_USER_DEFINED]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in user_defined])
    if tokenizer.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise ValueError(f"{path}: special tokens do not map onto the GGUF vocabulary")
    return tokenizer


def _pre_tokenizer(pre: str, path: Path) -> pre_tokenizers.PreTokenizer:
    """The text split for llama.cpp's `tokenizer.ggml.pre` name, as the model's tokenizer.json has it."""
    if pre in ("default", "gpt2"):
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("smollm", "starcoder", "refact", "codeshell"):
        # Each digit on its own, then GPT-2's split (llama.cpp: "\p{N}" before the GPT-2 regex).
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    if pre in ("llama-bpe", "llama3", "llama-v3"):
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    raise ValueError(f"{path}: pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported")


def _post_processor(meta: dict[str, Any], tokens: list[str]) -> processors.PostProcessor:
    """Byte-level offsets, plus BOS in front when the GGUF asks for it (tokenizer.ggml.add_bos_token)."""
    byte_level = processors.ByteLevel(trim_offsets=False)
    bos_id = meta.get("tokenizer.ggml.bos_token_id")
    if not meta.get("tokenizer.ggml.add_bos_token", False) or bos_id is None:
        return byte_level
    bos = tokens[bos_id]
    template = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, int(bos_id))]
    )
    return processors.Sequence([byte_level, template])


def _tokenizer_config(meta: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    tokens = meta["tokenizer.ggml.tokens"]

    def token(name: str) -> str | None:
        token_id = meta.get(f"tokenizer.ggml.{name}_token_id")
        return tokens[token_id] if token_id is not None else None

    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos"),
        "eos_token": token("eos"),
        "pad_token": token("padding"),
        "unk_token": token("unknown"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "model_max_length": config["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
        "chat_template": meta.get("tokenizer.chat_template"),
    }
    return {key: value for key, value in tokenizer_config.items() if value is not None}


# ---------------------------------------------------------------- files


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _move_into_place(staging: Path, out_dir: Path) -> None:
    """Rename the finished import to `out_dir`; an older import there is removed only afterwards."""
    if not out_dir.exists():
        os.rename(staging, out_dir)
        return
    retired = staging.with_suffix(".old")
    os.rename(out_dir, retired)
    os.rename(staging, out_dir)
    shutil.rmtree(retired, ignore_errors=True)
