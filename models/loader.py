"""Loads safetensors checkpoints (HF names) into our modules, folding q/k/v and gate/up into fused parameters and
per-expert tensors into stacked expert weights."""
from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from afdserve.kernels.attention import AttentionBackend
from afdserve.kernels.quant_linear import dequantize_fp8_blocks
from afdserve.models.hf_config import TransformerConfig
from afdserve.models.registry import build_model


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


def dequantized_fp8_weights(weights, block: tuple[int, int]):
    """The tensors of a block-scaled fp8 checkpoint with every fp8 weight `X.weight` replaced by its fp32 value, from
    its codes and `X.weight_scale_inv` (kernels/quant_linear.dequantize_fp8_blocks); other tensors pass through.
    A checkpoint stores the two side by side (safetensors sorts names), so at most one waits for its partner."""
    codes: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}
    for name, tensor in weights:
        if name.endswith(".weight_scale_inv"):
            weight = name.removesuffix("_scale_inv")
            if weight in codes:
                yield weight, dequantize_fp8_blocks(codes.pop(weight), tensor, block)
            else:
                scales[weight] = tensor
        elif tensor.dtype == torch.float8_e4m3fn:
            if name in scales:
                yield name, dequantize_fp8_blocks(tensor, scales.pop(name), block)
            else:
                codes[name] = tensor
        else:
            yield name, tensor
    unpaired = sorted(codes) + sorted(scales)
    if unpaired:
        raise ValueError(f"fp8 checkpoint: {len(unpaired)} fp8 weight(s) without a weight_scale_inv, or scales "
                         f"without their weight, e.g. {unpaired[:3]}")


def load_weights(model: nn.Module, weights) -> None:
    """Copies HF-named tensors into the model's parameters. A model may declare, as attributes:
    `param_renames` [(theirs, ours)]: substring renames applied to each HF name first;
    `expert_params` [(ours, theirs, shard)]: `<p>.experts.<e>.<theirs>.weight` goes to expert e of the stacked
        parameter `<p>.experts.<ours>` ([E, rows, cols]), rows split evenly between the shards of `ours`;
        with `experts_stacked` (Step-3), `<p>.<theirs>.weight` [E, rows, cols] holds all E experts at once;
    `stacked_params` [(ours, theirs, shard)] with `shard_sizes(ours, rows)`: HF tensors fused along rows."""
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for hf_name, tensor in weights:
        name = hf_name.removeprefix("model.")
        if "rotary_emb.inv_freq" in name:
            continue
        if name == "lm_head.weight" and getattr(model, "lm_head", None) is None:
            continue  # tied to the embedding
        for theirs, ours in getattr(model, "param_renames", []):
            name = name.replace(theirs, ours)
        if name.startswith((*getattr(model, "pruned_prefixes", ()), *getattr(model, "ignored_prefixes", ()))):
            continue  # the other side's weights on an AFD worker, or a part not served
        if not (_load_expert(model, params, name, tensor, hf_name, loaded)
                or _load_stacked(model, params, name, tensor, hf_name, loaded)):
            if name not in params:
                raise ValueError(f"checkpoint tensor {hf_name!r} has no parameter in {type(model).__name__}")
            _copy(params[name].data, tensor, hf_name)
            loaded.add(name)
    _check_complete(model, params, loaded)


_EXPERT_TENSOR = re.compile(r"^(?P<prefix>.+)\.experts\.(?P<expert>\d+)\.(?P<part>[^.]+)\.weight$")
_STACKED_EXPERTS_TENSOR = re.compile(r"^(?P<prefix>.+)\.(?P<part>[^.]+)\.weight$")


def _load_expert(model, params: dict, name: str, tensor: torch.Tensor, hf_name: str, loaded: set[str]) -> bool:
    if getattr(model, "experts_stacked", False):
        return _load_stacked_experts(model, params, name, tensor, hf_name, loaded)
    expert_params = getattr(model, "expert_params", [])
    match = _EXPERT_TENSOR.match(name)
    entry = match and next((e for e in expert_params if e[1] == match["part"]), None)
    if not entry:
        return False
    ours, _, shard = entry
    pname = f"{match['prefix']}.experts.{ours}"
    if pname not in params:
        raise ValueError(f"checkpoint tensor {hf_name!r} has no parameter in {type(model).__name__}")
    param, expert = params[pname], int(match["expert"])
    if expert >= param.shape[0]:
        raise ValueError(f"checkpoint tensor {hf_name!r} names expert {expert}, but the model has {param.shape[0]}")
    rows = param.shape[1] // _num_expert_shards(expert_params, ours)
    _copy(param.data[expert, shard * rows:(shard + 1) * rows], tensor, hf_name)
    loaded.add(f"{pname}#{expert}.{shard}")
    return True


def _load_stacked_experts(model, params: dict, name: str, tensor: torch.Tensor, hf_name: str,
                          loaded: set[str]) -> bool:
    """`<p>.<theirs>.weight` [E, rows, cols] -> all experts of `<p>.experts.<ours>`; False when `<p>` is no MoE
    block (a dense MLP or a shared expert has projections of the same names)."""
    match = _STACKED_EXPERTS_TENSOR.match(name)
    entry = match and next((e for e in model.expert_params if e[1] == match["part"]), None)
    if not entry or f"{match['prefix']}.experts.{entry[0]}" not in params:
        return False
    ours, _, shard = entry
    pname = f"{match['prefix']}.experts.{ours}"
    param = params[pname]
    rows = param.shape[1] // _num_expert_shards(model.expert_params, ours)
    _copy(param.data[:, shard * rows:(shard + 1) * rows], tensor, hf_name)
    loaded.update(f"{pname}#{expert}.{shard}" for expert in range(param.shape[0]))
    return True


def _load_stacked(model, params: dict, name: str, tensor: torch.Tensor, hf_name: str, loaded: set[str]) -> bool:
    for fused, part, shard in getattr(model, "stacked_params", []):
        if f".{part}." in name:
            name = name.replace(part, fused)
            if name not in params:
                raise ValueError(f"checkpoint tensor {hf_name!r} has no parameter in {type(model).__name__}")
            param = params[name]
            sizes = model.shard_sizes(fused, param.shape[0])
            offset = sum(sizes[:shard])
            _copy(param.data[offset:offset + sizes[shard]], tensor, hf_name)
            loaded.add(f"{name}#{shard}")
            return True
    return False


def _num_expert_shards(expert_params: list, ours: str) -> int:
    return sum(1 for o, _, _ in expert_params if o == ours)


def _copy(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
    dst.copy_(src)


def _expected_keys(model: nn.Module, name: str, param: torch.Tensor) -> list[str]:
    """The `loaded` keys that together fill parameter `name`."""
    for ours in {o for o, _, _ in getattr(model, "expert_params", [])}:
        if name.endswith(f".experts.{ours}"):
            shards = _num_expert_shards(model.expert_params, ours)
            return [f"{name}#{e}.{s}" for e in range(param.shape[0]) for s in range(shards)]
    fused = next((f for f, _, _ in getattr(model, "stacked_params", []) if f".{f}." in name), None)
    if fused is not None:
        return [f"{name}#{i}" for i in range(len(model.shard_sizes(fused, param.shape[0])))]
    return [name]


def _check_complete(model: nn.Module, params: dict, loaded: set[str]) -> None:
    missing = [name for name, param in params.items()
               if not all(key in loaded for key in _expected_keys(model, name, param))]
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} parameters, e.g. {missing[:3]}")


def load_model(model_dir: Path, cfg: TransformerConfig, dtype: torch.dtype, max_positions: int,
               attention: AttentionBackend | None = None, device: torch.device | str = "cpu",
               role: str | None = None, ffn_shard: tuple[int, int] | None = None,
               quantization: str | None = None, expert_cache: tuple[int, str] | None = None) -> nn.Module:
    """attention: the attention backend (kernels/attention.select_attention_backend); None: the torch reference.
    role: None for the whole model, or "attention" / "ffn" for one side of an AFD deployment (prune_to_role).
    ffn_shard: (index, count) of an FFN worker among several: it keeps its shard of every MLP / MoE block.
    quantization: None, "int8" or "int4" (weight-only; engine/config.QUANTIZATIONS), applied to what this process keeps.
    expert_cache: (experts resident per layer, eviction policy) for a process that runs the MoE experts
    (offload_experts); None: all resident.
    The weights are read on the host, cast, moved to `device`, packed or quantized for inference, then sharded."""
    model = build_model(cfg, max_positions, attention)
    if role is not None:
        model.prune_to_role(role)
    weights = iter_safetensors(model_dir)
    if cfg.fp8_weight_block is not None:  # served in the model dtype (or re-quantized by `quantization`)
        weights = dequantized_fp8_weights(weights, cfg.fp8_weight_block)
    load_weights(model, weights)
    cast_model(model, dtype)
    model.to(device)
    model.eval().prepare_for_inference(quantization)
    if ffn_shard is not None:  # after quantizing: a shard's int8 codes and scales are the whole layer's
        for layer in model.layers:
            layer.mlp.shard_(*ffn_shard)
    if expert_cache is not None and role != "attention":
        model.offload_experts(*expert_cache)
    return model


def cast_model(model: nn.Module, dtype: torch.dtype) -> None:
    """Casts the model to `dtype`, except parameters whose names end with one of the model's `fp32_params`
    (e.g. DeepSeek router gates and selection biases, which transformers also keeps in fp32)."""
    keep = tuple(getattr(model, "fp32_params", ()))
    saved = {name: p.data for name, p in model.named_parameters() if keep and name.endswith(keep)}
    model.to(dtype)
    params = dict(model.named_parameters())
    for name, data in saved.items():
        params[name].data = data.to(device=params[name].device, dtype=torch.float32)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters as loaded (not counting CPU-packed copies of linear weights)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def full_model_weight_bytes(cfg: TransformerConfig, dtype: torch.dtype, max_positions: int) -> int:
    """weight_bytes of the whole model, computed on the meta device without reading or allocating weights."""
    with torch.device("meta"):
        model = build_model(cfg, max_positions)
    cast_model(model, dtype)
    return weight_bytes(model)
