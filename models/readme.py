"""`ReadMEForCausalLM`: our checkpoint format for a dense Llama-family model refactored into Read-ME's router-decoupled
MoE (Cai, Ro et al., NeurIPS 2024, arXiv 2410.19123); `afdserve readme-refactor` writes it (models/readme_refactor.py).

Every decoder layer's SwiGLU MLP is split by channels (rows of gate/up, columns of down) into the always-on shared
channels and E experts with disjoint channels; one pre-gating router (models/layers/pre_gating_router.py) picks each
token's experts from its token id, for every layer at once. A layer computes

    y = shared(x) + sum over the token's chosen experts e of expert_e(x)

and since SwiGLU is a sum over its channels, all E experts chosen give exactly the dense MLP.

config.json: the dense model's Llama fields (read as for LlamaForCausalLM), and

    "architectures": ["ReadMEForCausalLM"], "model_type": "readme",
    "num_experts": 8,                     # E, per layer
    "expert_intermediate_size": 176,      # channels of one expert
    "shared_intermediate_size": 128,      # the shared channels (0: none)
    "moe_top_k": 1,                       # experts per token; num_experts: every expert (the dense model)
    "router_hidden_size": 64, "router_intermediate_size": 64

readme_channels.json, beside it: which dense channels went where (not needed to run the model)
    {"<layer>": {"shared": [channel, ...], "experts": [[channel, ...], ...]}}

Weight names (safetensors, HF style):
    model.layers.{i}.mlp.shared_expert.{gate,up,down}_proj.weight
    model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight
    model.pre_gating_router.{embed,up,down,head}.weight, .mlp_norm.weight, .norm.weight
and the dense model's other tensors unchanged.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from afdserve.models.hf_config import TransformerConfig, load_transformer_config
from afdserve.models.layers.moe_router import RouterConfig
from afdserve.models.moe_config import MoEConfig, check_silu

READ_ME_ARCHITECTURE = "ReadMEForCausalLM"
CHANNELS_FILE = "readme_channels.json"


def readme_moe_config(cfg: TransformerConfig) -> MoEConfig:
    raw = cfg.raw
    check_silu(raw)
    for key in ("num_experts", "expert_intermediate_size"):
        if key not in raw:
            raise ValueError(f"a {READ_ME_ARCHITECTURE} config needs {key!r}")
    # RouterConfig checks moe_top_k against num_experts.
    return MoEConfig(router=RouterConfig(num_experts=raw["num_experts"], top_k=raw.get("moe_top_k", 1)),
                     intermediate_size=raw["expert_intermediate_size"],
                     moe_layers=frozenset(range(cfg.num_layers)),
                     shared_intermediate_size=raw.get("shared_intermediate_size", 0),
                     pre_gated=True)


def router_sizes(cfg: TransformerConfig) -> tuple[int, int]:
    """The pre-gating router's (hidden, intermediate) widths."""
    return cfg.raw.get("router_hidden_size", 64), cfg.raw.get("router_intermediate_size", 64)


def load_pre_gating_router(model_dir: Path, top_k: int | None = None):
    """The saved pre-gating router alone (fp32), read without the rest of the checkpoint; top_k: the config's."""
    from afdserve.models.layers.pre_gating_router import PreGatingRouter
    cfg = load_transformer_config(model_dir)
    hidden, inter = router_sizes(cfg)
    num_experts = cfg.raw["num_experts"]
    router = PreGatingRouter(cfg.vocab_size, hidden, inter, num_experts, top_k or cfg.raw.get("moe_top_k", 1),
                             cfg.rms_norm_eps)
    prefix = "model.pre_gating_router."
    tensors = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            tensors.update({k.removeprefix(prefix): f.get_tensor(k).float() for k in f.keys() if k.startswith(prefix)})
    router.load_state_dict(tensors)
    return router.eval()


def token_expert_table(model_dir: Path) -> list[tuple[int, ...]]:
    """Every token id's experts as the saved router picks them (ascending): what a scheduler needs to know a
    token's experts from the token alone."""
    router = load_pre_gating_router(model_dir)
    with torch.no_grad():
        ids = router(torch.arange(router.embed.num_embeddings)).topk_ids
    return [tuple(sorted(row)) for row in ids.tolist()]
