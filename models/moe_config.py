"""MoE fields of an HF config.json, read per family into one MoEConfig (what the MoE layers of a model look like).

Placement rules (which decoder layers are MoE; the others keep a dense MLP of width `intermediate_size`):
    Mixtral:        every layer
    Qwen2/3-MoE:    i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0
    DeepSeek(MoE):  i >= first_k_dense_replace and i % moe_layer_freq == 0
    Step-3:         i in moe_layers_enum  (models/step3.py)
    PRMoE:          `moe_layers`, or (i + 1) % moe_layer_freq == 0  (models/prmoe.py documents the format)
    Read-ME:        every layer, routed by one pre-gating router  (models/readme.py)
Pyramid MoE (PRMoE): each MoE layer may have its own expert count (`layer_num_experts`); `for_layer(i)` gives the
config one decoder layer is built from.
Router semantics per family: see models/layers/moe_router.py.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from afdserve.models.hf_config import TransformerConfig
from afdserve.models.layers.moe_router import RouterConfig


@dataclass(frozen=True)
class MoEConfig:
    router: RouterConfig
    intermediate_size: int  # of one routed expert
    moe_layers: frozenset[int]
    shared_intermediate_size: int = 0  # 0: no shared expert
    shared_expert_gate: bool = False  # Qwen2-MoE: the shared expert's output is scaled by sigmoid(gate(x))
    router_fp32: bool = False  # gate weight kept and applied in fp32 (DeepSeek), see moe_router.Router
    # Checkpoint naming: an expert's (gate, up, down) tensors are `<layer>.mlp.experts.<e>.<name>.weight` ...
    hf_expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    # ... after these HF -> ours substring renames.
    hf_renames: tuple[tuple[str, str], ...] = ()
    # Step-3: one tensor per projection holds all E experts: `<layer>.mlp.<name>.weight` [E, rows, cols] after renames.
    hf_experts_stacked: bool = False
    # DeepSpeed Residual-MoE: a dense MLP of this width beside the routed experts, mixed by a learned 2-way softmax
    # (models/layers/moe.py). 0: none.
    residual_intermediate_size: int = 0
    # Pyramid MoE: (layer, expert count) for the layers whose count differs from router.num_experts.
    layer_num_experts: tuple[tuple[int, int], ...] = ()
    # Read-ME: no router per layer; one pre-gating router routes each token from its id, for every layer
    # (models/readme.py). The layers' experts then add with weight 1.
    pre_gated: bool = False

    def __post_init__(self):
        if self.residual_intermediate_size and self.shared_intermediate_size:
            raise ValueError("an MoE layer has either a shared expert or a residual MLP, not both")
        stray = sorted(i for i, _ in self.layer_num_experts if i not in self.moe_layers)
        if stray:
            raise ValueError(f"expert counts given for layers {stray}, which are not MoE layers")

    @property
    def num_experts(self) -> int:
        """The expert count of the MoE layers that have no per-layer count (pyramid MoE: see `for_layer`)."""
        return self.router.num_experts

    def for_layer(self, layer: int) -> MoEConfig | None:
        """The MoE config of decoder layer `layer` (with its own expert count), or None for a dense layer."""
        if layer not in self.moe_layers:
            return None
        count = dict(self.layer_num_experts).get(layer, self.router.num_experts)
        if count == self.router.num_experts:
            return self
        return replace(self, router=replace(self.router, num_experts=count), layer_num_experts=())


def mixtral_moe_config(cfg: TransformerConfig) -> MoEConfig:
    raw = cfg.raw
    check_silu(raw)
    router = RouterConfig(num_experts=raw["num_local_experts"], top_k=raw["num_experts_per_tok"], renormalize=True)
    return MoEConfig(router=router, intermediate_size=cfg.intermediate_size,
                     moe_layers=frozenset(range(cfg.num_layers)),
                     hf_expert_names=("w1", "w3", "w2"), hf_renames=(("block_sparse_moe.", "mlp."),))


def qwen_moe_config(cfg: TransformerConfig) -> MoEConfig:
    """Qwen2-MoE and Qwen3-MoE (the latter without a shared expert)."""
    raw = cfg.raw
    check_silu(raw)
    num_experts = raw.get("num_experts", raw.get("num_local_experts"))
    router = RouterConfig(num_experts=num_experts, top_k=raw["num_experts_per_tok"],
                          renormalize=bool(raw.get("norm_topk_prob", False)))
    dense = set(raw.get("mlp_only_layers") or [])
    step = raw.get("decoder_sparse_step", 1)
    shared = raw.get("shared_expert_intermediate_size") or 0
    return MoEConfig(router=router, intermediate_size=raw["moe_intermediate_size"],
                     moe_layers=frozenset(i for i in range(cfg.num_layers) if i not in dense and (i + 1) % step == 0),
                     shared_intermediate_size=shared, shared_expert_gate=shared > 0)


def deepseek_moe_config(cfg: TransformerConfig) -> MoEConfig | None:
    """DeepSeekMoE (`DeepseekForCausalLM`) and the DeepSeek-V2/V3 gating fields; None when n_routed_experts is unset."""
    raw = cfg.raw
    if raw.get("n_routed_experts") is None:
        return None
    check_silu(raw)
    top_k = raw["num_experts_per_tok"]
    method = raw.get("topk_method") or "greedy"
    norm = bool(raw.get("norm_topk_prob", False))
    scale = float(raw.get("routed_scaling_factor") or 1.0)
    if method == "noaux_tc":  # V3: renormalize if asked, then always scale
        renormalize = norm
    else:  # V1/V2: renormalize (k > 1 and norm_topk_prob) or scale, never both
        renormalize = norm and top_k > 1
        scale = 1.0 if renormalize else scale
    router = RouterConfig(num_experts=raw["n_routed_experts"], top_k=top_k,
                          scoring=raw.get("scoring_func") or "softmax", topk_method=method,
                          n_group=raw.get("n_group") or 1, topk_group=raw.get("topk_group") or 1,
                          renormalize=renormalize, routed_scaling_factor=scale)
    first_moe, freq = raw.get("first_k_dense_replace") or 0, raw.get("moe_layer_freq") or 1
    inter = raw["moe_intermediate_size"]
    return MoEConfig(router=router, intermediate_size=inter,
                     moe_layers=frozenset(i for i in range(cfg.num_layers) if i >= first_moe and i % freq == 0),
                     shared_intermediate_size=(raw.get("n_shared_experts") or 0) * inter, router_fp32=True,
                     hf_renames=(("mlp.shared_experts.", "mlp.shared_expert."),
                                 ("mlp.gate.e_score_correction_bias", "router.e_score_correction_bias")))


def check_silu(raw: dict) -> None:
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"unsupported MoE expert activation {act!r}; supported: 'silu'")
