"""Loads safetensors checkpoints (HF names) into our modules, folding q/k/v and gate/up into fused parameters."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from models.hf_config import TransformerConfig
from models.registry import build_model


def iter_safetensors(model_dir: Path):
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors file in model directory {model_dir}")
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ValueError(f"cannot read weights file {path}: {e}") from None


def load_weights(model: nn.Module, weights) -> None:
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    stacked = getattr(model, "stacked_params", [])
    for hf_name, tensor in weights:
        name = hf_name.removeprefix("model.")
        if "rotary_emb.inv_freq" in name:
            continue
        if name == "lm_head.weight" and getattr(model, "lm_head", None) is None:
            continue  # tied to the embedding
        for fused, part, shard in stacked:
            if f".{part}." in name:
                name = name.replace(part, fused)
                param = params[name]
                sizes = model.shard_sizes(fused)
                offset = sum(sizes[:shard])
                _copy(param.data[offset:offset + sizes[shard]], tensor, hf_name)
                loaded.add(f"{name}#{shard}")
                break
        else:
            if name not in params:
                raise ValueError(f"checkpoint tensor {hf_name!r} has no parameter in {type(model).__name__}")
            _copy(params[name].data, tensor, hf_name)
            loaded.add(name)
    _check_complete(model, params, loaded)


def _copy(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
    dst.copy_(src)


def _check_complete(model: nn.Module, params: dict, loaded: set[str]) -> None:
    missing = []
    for name in params:
        fused = next((f for f, _, _ in getattr(model, "stacked_params", []) if f".{f}." in name), None)
        if fused is None:
            ok = name in loaded
        else:
            ok = all(f"{name}#{i}" in loaded for i in range(len(model.shard_sizes(fused))))
        if not ok:
            missing.append(name)
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} parameters, e.g. {missing[:3]}")


def load_model(model_dir: Path, cfg: TransformerConfig, dtype: torch.dtype, max_positions: int) -> nn.Module:
    model = build_model(cfg, max_positions)
    load_weights(model, iter_safetensors(model_dir))
    model = model.to(dtype).eval()
    model.prepare_for_inference()
    return model
