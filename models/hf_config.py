"""Reads an HF `config.json` into the fields the model code needs, across transformers' config spellings."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from afdserve.kernels.cpu_linear import onednn_runs_natively

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_REQUIRED_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")


class KVEntry(NamedTuple):
    """What one token leaves in one layer's KV cache: `planes` (2: K and V; 1: MLA's latent) of `heads` x `head_dim`."""
    planes: int
    heads: int
    head_dim: int


@dataclass
class TransformerConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    sliding_window: int | None
    torch_dtype: torch.dtype
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    # (rows, cols) of the weight blocks of a block-scaled fp8 checkpoint (DeepSeek-V3's, Qwen3's -FP8 releases): each
    # fp8 weight comes with one `weight_scale_inv` per block, and the loader dequantizes it (models/loader.py).
    fp8_weight_block: tuple[int, int] | None = None
    raw: dict = field(default_factory=dict)  # the whole config.json, for model-specific fields

    @property
    def kv_entry(self) -> KVEntry:
        """K and V of the KV heads; for MLA (DeepSeek-V2/V3, where `kv_lora_rank` is set) one latent of
        kv_lora_rank + qk_rope_head_dim values (models/layers/mla.py)."""
        if self.raw.get("kv_lora_rank"):
            return KVEntry(1, 1, self.raw["kv_lora_rank"] + self.raw.get("qk_rope_head_dim", 0))
        return KVEntry(2, self.num_kv_heads, self.head_dim)

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of KV cache per token over all layers, at 1 byte per element (multiply by the element size)."""
        planes, heads, head_dim = self.kv_entry
        return planes * self.num_layers * heads * head_dim


def _as_list(x) -> list[int]:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


def load_transformer_config(model_dir: Path) -> TransformerConfig:
    path = Path(model_dir) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no config.json in model directory {model_dir}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    missing = [f for f in _REQUIRED_FIELDS if f not in raw]
    if missing:
        raise ValueError(f"{path} lacks required fields: {', '.join(map(repr, missing))}")
    archs = raw.get("architectures") or []
    if not archs:
        raise ValueError(f"{path} names no 'architectures'")
    # transformers 5 folds rope_theta / rope_scaling into rope_parameters.
    rope = dict(raw.get("rope_parameters") or {})
    rope_theta = raw.get("rope_theta", rope.pop("rope_theta", 10000.0))
    rope_scaling = raw.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    num_heads = raw["num_attention_heads"]
    dtype_name = raw.get("torch_dtype") or raw.get("dtype") or "float32"
    gen_cfg = Path(model_dir) / "generation_config.json"
    eos = _as_list(raw.get("eos_token_id"))
    if gen_cfg.exists():
        eos = sorted(set(eos) | set(_as_list(json.loads(gen_cfg.read_text()).get("eos_token_id"))))
    return TransformerConfig(
        architecture=archs[0],
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw.get("intermediate_size", 4 * raw["hidden_size"]),
        num_layers=raw["num_hidden_layers"],
        num_heads=num_heads,
        # Step-3 spells the KV head count `num_attention_groups` and the context `max_position_embedding`.
        num_kv_heads=raw.get("num_key_value_heads") or raw.get("num_attention_groups") or num_heads,
        head_dim=raw.get("head_dim") or raw["hidden_size"] // num_heads,
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope_theta),
        rope_scaling=rope_scaling,
        max_position_embeddings=raw.get("max_position_embeddings", raw.get("max_position_embedding", 2048)),
        tie_word_embeddings=raw.get("tie_word_embeddings", False),
        attention_bias=raw.get("attention_bias", False),
        sliding_window=raw.get("sliding_window") if raw.get("use_sliding_window", True) else None,
        torch_dtype=_DTYPES.get(dtype_name, torch.float32),
        eos_token_ids=eos,
        bos_token_id=raw.get("bos_token_id"),
        fp8_weight_block=_fp8_weight_block(path, raw.get("quantization_config")),
        raw=raw,
    )


def _fp8_weight_block(path: Path, quantization: dict | None) -> tuple[int, int] | None:
    """The weight block of a checkpoint quantized as DeepSeek-V3 ships (`quant_method` fp8, dynamic activations,
    fp32 block scales); None for an unquantized one. Any other quantized format is refused by name: its tensors
    would not load."""
    if not quantization:
        return None
    method = quantization.get("quant_method")
    where = f"{path}: quantization_config"
    if method != "fp8":
        raise ValueError(f"{where} has quant_method {method!r}; afdserve loads unquantized checkpoints and fp8 ones "
                         f"with block scales (quant_method 'fp8', as DeepSeek-V3 ships)")
    block = quantization.get("weight_block_size")
    if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise ValueError(f"{where}: fp8 without weight_block_size [rows, cols] (per-tensor fp8 scales) is not "
                         f"supported; got weight_block_size {block!r}")
    if quantization.get("activation_scheme", "dynamic") != "dynamic":
        raise ValueError(f"{where}: activation_scheme {quantization['activation_scheme']!r} (static input scales) is "
                         f"not supported; afdserve reads fp8 checkpoints with dynamic activations")
    if quantization.get("scale_fmt", "float") != "float":
        raise ValueError(f"{where}: scale_fmt {quantization['scale_fmt']!r} is not supported; afdserve reads fp32 "
                         f"block scales (scale_fmt 'float')")
    return int(block[0]), int(block[1])


def resolve_dtype(name: str, config: TransformerConfig, device: str = "cpu") -> torch.dtype:
    """The dtype the weights and activations run in. auto: the checkpoint's, except a bf16 / fp16 checkpoint on a
    CPU whose oneDNN has no native path for that dtype (an AVX2-only host: 26 output tok/s in bf16 against ~85 in
    fp32 for SmolLM2 at concurrency 16-32), which runs in fp32."""
    if name != "auto":
        return _DTYPES[name]
    if torch.device(device).type == "cpu" and not onednn_runs_natively(config.torch_dtype):
        return torch.float32
    return config.torch_dtype
