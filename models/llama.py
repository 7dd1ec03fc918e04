"""The Llama family (Llama, Mistral, Qwen2, Qwen3) and its MoE members (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeekMoE,
our PRMoE format for DeepSpeed-MoE style models, models/prmoe.py, Step-3, models/step3.py, whose attention is MFA,
models/layers/mfa.py, and DeepSeek-V2/V3, models/deepseek_v2.py, whose attention is MLA, models/layers/mla.py):
pre-norm decoder layers with GQA, RoPE, and a SwiGLU MLP or an MoE block as the FFN.

Each decoder layer is two halves (docs/architecture.md, seam 1):
    attn_half(hidden, residual, context, meta, kv) -> (ffn_input, residual, routing)  # norm, attention, norm, router
    ffn_half(ffn_input, routing) -> ffn_out                                          # the MLP or the MoE block
`routing` (models/layers/moe_router.Routing: top-k expert ids and weights) is None for dense layers. Routing runs in
the attention half so that the FFN half needs nothing but its inputs. `context` (LayerContext) is what every layer of
a step reads besides its hidden states: the rotary tables, and a Read-ME model's routing, chosen once per step from
the token ids by its pre-gating router (models/readme.py). One loop alternates the halves
(models/layer_loop.py): in-process for the model's forward, across workers under AFD.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from afdserve.kernels.attention import AttentionBackend, AttentionMetadata, TorchPagedAttention
from afdserve.models.hf_config import TransformerConfig
from afdserve.kernels.cpu_linear import can_prepack, linear, prepack
from afdserve.kernels.quant_linear import quantize_weight, quantized_linear
from afdserve.models.layers.expert_cache import ExpertCacheTotals, offload_directory
from afdserve.models.layers.linear import Linear
from afdserve.models.layers.mfa import MFAttention
from afdserve.models.layers.mla import MLAConfig, MLAttention
from afdserve.models.layers.mlp import GatedMLP
from afdserve.models.layers.moe import MoEBlock
from afdserve.models.layers.moe_router import Router, Routing
from afdserve.models.layers.norm import RMSNorm
from afdserve.models.layers.pre_gating_router import PreGatingRouter
from afdserve.models.readme import router_sizes
from afdserve.models.moe_config import MoEConfig
from afdserve.models.layers.rotary import RotaryEmbedding, RopeTables, apply_rotary
from afdserve.models.layer_loop import LocalFFN, run_layers


class LayerInput(NamedTuple):
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata


class LayerContext(NamedTuple):
    """What every layer of a step (micro-batch) reads besides its hidden states; made by the model's `embed`."""
    rope: RopeTables
    token_routing: Routing | None = None  # pre-gated MoE (Read-ME): each token's experts, the same in every layer


@dataclass(frozen=True)
class LlamaVariant:
    """What distinguishes the family's members, chosen by the config's architecture name in registry.py."""
    qkv_bias: bool = False  # Qwen2 always; Llama when config.attention_bias
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k before RoPE
    share_q_dim: int = 0  # Step-3: MFA attention with a low-rank query of this width (models/layers/mfa.py)
    mla: MLAConfig | None = None  # DeepSeek-V2/V3: MLA attention over a latent KV cache (models/layers/mla.py)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: TransformerConfig, variant: LlamaVariant, attention: AttentionBackend, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_sizes = [self.q_size, self.kv_size, self.kv_size]  # rows of the fused projection
        self.scale = self.head_dim ** -0.5
        bias = variant.qkv_bias or cfg.attention_bias
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=cfg.attention_bias and not variant.qkv_bias)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if variant.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if variant.qk_norm else None
        self.attn = attention

    def forward(self, x: torch.Tensor, rope: RopeTables, meta: AttentionMetadata,
                kv_cache: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split(self.qkv_sizes, dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, rope), apply_rotary(k, rope)
        out = self.attn(q, k, v, kv_cache, meta, self.scale, self.layer_index)
        return self.o_proj(out.reshape(-1, self.q_size))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig, variant: LlamaVariant, attention: AttentionBackend, layer_index: int,
                 moe: MoEConfig | None = None):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if variant.mla is not None:  # MLA reads its own latent cache: kernels/attention/mla_paged.py
            self.self_attn = MLAttention(cfg, variant.mla, layer_index, getattr(attention, "name", "torch"))
        elif variant.share_q_dim:
            self.self_attn = MFAttention(cfg, variant.share_q_dim, attention, layer_index)
        else:
            self.self_attn = LlamaAttention(cfg, variant, attention, layer_index)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.top_k = 0 if moe is None else moe.router.top_k  # experts per token (the FFN side needs only this)
        if moe is None:
            self.router = None
            self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size)
        else:
            # Pre-gated (Read-ME): no router here; the step's token_routing comes with the LayerContext.
            self.router = None if moe.pre_gated else Router(cfg.hidden_size, moe.router, fp32_logits=moe.router_fp32)
            self.mlp = MoEBlock(cfg.hidden_size, moe.num_experts, moe.intermediate_size,
                                moe.shared_intermediate_size, moe.shared_expert_gate,
                                moe.residual_intermediate_size)

    def attn_half(self, hidden: torch.Tensor, residual: torch.Tensor | None, context: LayerContext,
                  meta: AttentionMetadata, kv_cache: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, Routing | None]:
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(hidden, context.rope, meta, kv_cache)
        ffn_input, residual = self.post_attention_layernorm(hidden, residual)
        if self.router is not None:
            routing = self.router(ffn_input)
        else:
            routing = context.token_routing if self.top_k else None
        return ffn_input, residual, routing

    def ffn_half(self, ffn_input: torch.Tensor, routing: Routing | None = None,
                 expert_sliced: bool = False) -> torch.Tensor:
        if not self.top_k:  # a dense layer (an FFN worker's layers keep no router: test top_k)
            return self.mlp(ffn_input)
        if routing is None:
            raise ValueError("an MoE layer's FFN half needs the routing computed by its attention half")
        return self.mlp(ffn_input, routing, expert_sliced)


class LlamaForCausalLM(nn.Module):
    # HF checkpoint names folded into our fused parameters: (ours, theirs, shard index).
    stacked_params = [
        ("qkv_proj", "q_proj", 0), ("qkv_proj", "k_proj", 1), ("qkv_proj", "v_proj", 2),
        ("gate_up_proj", "gate_proj", 0), ("gate_up_proj", "up_proj", 1),
    ]
    # HF -> ours substring renames, and per-expert HF tensors folded into stacked expert weights
    # (ours, theirs, shard index); both set per instance for MoE models (see models/loader.py).
    param_renames: list[tuple[str, str]] = []
    expert_params: list[tuple[str, str, int]] = []
    experts_stacked = False  # the checkpoint holds all experts of a projection in one tensor (models/loader.py)
    # Parameters (name suffixes) that stay fp32 whatever the model dtype (models/loader.cast_model).
    fp32_params: tuple[str, ...] = ()
    # Module paths whose checkpoint tensors are skipped: the other side's weights on an AFD worker (prune_to_role).
    pruned_prefixes: tuple[str, ...] = ()
    # Checkpoint tensors not served, whatever the role: DeepSeek-V3's multi-token-prediction layer.
    ignored_prefixes: tuple[str, ...] = ()

    def __init__(self, cfg: TransformerConfig, variant: LlamaVariant, max_positions: int,
                 moe: MoEConfig | None = None, attention: AttentionBackend | None = None):
        """attention: the backend every layer calls (kernels/attention.select_attention_backend); None: torch."""
        super().__init__()
        self.config = cfg
        self.moe_config = moe
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        attention = attention or TorchPagedAttention()
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(cfg, variant, attention, i, None if moe is None else moe.for_layer(i))
            for i in range(cfg.num_layers))
        if moe is not None:
            self.param_renames = [*moe.hf_renames, ("mlp.gate.weight", "router.gate.weight")]
            gate, up, down = moe.hf_expert_names
            self.expert_params = [("w13", gate, 0), ("w13", up, 1), ("w2", down, 0)]
            self.experts_stacked = moe.hf_experts_stacked
            fp32_gate = ("router.gate.weight",) if moe.router_fp32 else ()
            self.fp32_params = ("router.e_score_correction_bias", *fp32_gate)
        self.expert_offload = None  # offload_experts: (the experts' files, the prefetch thread)
        self.pre_gating_router = None
        if moe is not None and moe.pre_gated:
            router_hidden, router_inter = router_sizes(cfg)
            self.pre_gating_router = PreGatingRouter(cfg.vocab_size, router_hidden, router_inter, moe.num_experts,
                                                     moe.router.top_k, cfg.rms_norm_eps)
            # fp32 whatever the model dtype, as it was trained: a bf16 router would flip its near-ties
            self.fp32_params = (*self.fp32_params, *(f"pre_gating_router.{name}" for name, _ in
                                                     self.pre_gating_router.named_parameters()))
        if variant.mla is not None:
            # MLA projects its own queries and keys: q_proj / k_proj / v_proj are no fused QKV, and RoPE turns only
            # the qk_rope_head_dim part of a head.
            self.stacked_params = [p for p in self.stacked_params if p[0] != "qkv_proj"]
            self.ignored_prefixes = (f"layers.{cfg.num_layers}.",)
        rotary_dim = cfg.head_dim if variant.mla is None else variant.mla.qk_rope_head_dim
        self.rotary = RotaryEmbedding(rotary_dim, max_positions, cfg.rope_theta, cfg.rope_scaling)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.packed_tied_head: torch.Tensor | None = None
        # --quantization: the tied head's (quantization, codes, scales)
        self.quantized_tied_head: tuple[str, torch.Tensor, torch.Tensor] | None = None

    def prune_to_role(self, role: str) -> None:
        """Keeps one side of attention-FFN disaggregation, before the weights are loaded. "attention": embeddings,
        attention, norms, routers and the LM head; "ffn": the MLPs / MoE blocks. `pruned_prefixes` tells the loader
        which checkpoint tensors to skip."""
        if role == "attention":
            self.pruned_prefixes = tuple(f"layers.{i}.mlp." for i in range(len(self.layers)))
            for layer in self.layers:
                layer.mlp = None
        elif role == "ffn":
            self.pruned_prefixes = ("embed_tokens.", "norm.", "lm_head.", "pre_gating_router.", *(
                f"layers.{i}.{part}." for i in range(len(self.layers))
                for part in ("self_attn", "input_layernorm", "post_attention_layernorm", "router")))
            self.embed_tokens = self.norm = self.lm_head = self.rotary = self.pre_gating_router = None
            for layer in self.layers:
                layer.self_attn = layer.input_layernorm = layer.post_attention_layernorm = layer.router = None
        else:
            raise ValueError(f"role must be attention or ffn, got {role!r}")

    def shard_sizes(self, fused_name: str, rows: int) -> list[int]:
        """Row counts of the HF tensors stacked into one fused parameter of `rows` rows."""
        if fused_name == "qkv_proj":
            return list(self.layers[0].self_attn.qkv_sizes)
        return [rows // 2] * 2  # gate_up_proj: dense MLPs and shared experts differ in width

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, LayerContext]:
        """The first hidden states and what every layer of this step reads besides them."""
        hidden = self.embed_tokens(input_ids)
        routing = None if self.pre_gating_router is None else self.pre_gating_router(input_ids)
        if routing is not None and self.expert_offload is not None and self.expert_offload[1] is not None:
            # Pre-gating: every layer's experts are known now, so an expert cache loads a layer's missing experts
            # while the layers before it compute.
            needed = torch.unique(routing.topk_ids).tolist()
            for layer in self.layers:
                if layer.top_k:
                    layer.mlp.experts.cache.prefetch(needed)
        return hidden, LayerContext(self.rotary.tables(positions, hidden.dtype), routing)

    def expert_cache_totals(self) -> ExpertCacheTotals | None:
        """The expert caches' hits, misses and loading time, summed over layers; None without --expert-cache-size."""
        if self.expert_offload is None:
            return None
        return ExpertCacheTotals.of(layer.mlp.experts.cache for layer in self.layers if layer.top_k)

    def offload_experts(self, capacity: int, policy: str, parent: Path | None = None) -> None:
        """--expert-cache-size: each MoE layer keeps `capacity` experts in memory, the rest memory-mapped from files
        under `parent` (default: the system's temporary directory) that live as long as the model. For the
        pre-gated models one background thread prefetches, where the host has a core beside torch's threads: on
        2 cores running 2 torch threads it made decode steps slower (bench readme; models/layers/expert_cache.py)."""
        if self.moe_config is None:
            raise ValueError("expert_cache_size: set, but the model has no MoE experts")
        spare_core = (os.cpu_count() or 1) > torch.get_num_threads()
        prefetcher = ThreadPoolExecutor(1, thread_name_prefix="expert-prefetch") if spare_core else None
        self.expert_offload = (offload_directory(parent), prefetcher)
        directory, prefetcher = Path(self.expert_offload[0].name), self.expert_offload[1]
        for index, layer in enumerate(self.layers):
            if layer.top_k:
                layer.mlp.experts.offload_(capacity, policy, directory / f"layer{index}", prefetcher)

    def final_norm(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """The last FFN output added to the residual stream, normalized: what compute_logits reads."""
        return self.norm(hidden, residual)[0]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[torch.Tensor]) -> torch.Tensor:
        """The whole model in this process: the one layer loop with the FFN halves run in place."""
        return run_layers(self, [LayerInput(input_ids, positions, meta)], kv_caches, LocalFFN())[0]

    def prepare_for_inference(self, quantization: str | None = None) -> None:
        # fp8 leaves the LM head in the model dtype, as vLLM's fp8 does: on SmolLM2 bf16 an e4m3 head alone cost
        # 3.7 of fp8's 5.4% perplexity (1,024 tokens of pydoc_data.topics).
        head_quantization = None if quantization == "fp8" else quantization
        for module in self.modules():
            if isinstance(module, Linear):
                module.prepare_for_inference(head_quantization if module is self.lm_head else quantization)
        # The tied LM head reads the embedding table as a linear weight: pack (or quantize) a copy of it too; the
        # embedding lookup keeps the table as it is.
        if self.embed_tokens is not None and self.lm_head is None:
            tied = self.embed_tokens.weight
            if head_quantization is not None:
                self.quantized_tied_head = (head_quantization, *quantize_weight(tied, head_quantization))
            else:
                self.packed_tied_head = prepack(tied) if can_prepack(tied) else None

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is not None:
            return self.lm_head(hidden).float()
        if self.quantized_tied_head is not None:
            return quantized_linear(hidden, *self.quantized_tied_head, None).float()
        return linear(hidden, self.embed_tokens.weight, None, self.packed_tied_head).float()
