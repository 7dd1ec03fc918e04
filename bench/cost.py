"""Step-3's theoretical decoding cost (arXiv 2507.19427, §4-§5): USD per 1M decoded tokens, attention and FFN
costed apart, on a catalog of models and cards.

Per decoded token at a context of `ctx` cached tokens, summed over layers (each layer its own attention type):
    KV bytes      MQA/GQA/MFA 2 n_kv d_h b ctx;  MLA (d_c + d_r) b ctx;  chunked GQA with ctx -> min(ctx, chunk)
    attention     MQA/GQA/MFA 4 n_q d_h ctx;     MLA 4 n_h (d_c + d_r) ctx (weight-absorbed decode)
    linear        2 x (attention projection weights: Q/K/V or MLA down/up, O)
    FFN           2 x (activated FFN parameters: routed + shared experts of MoE layers, dense MLPs)
Embeddings, LM head, routers and communication are left out, as in the paper. Costs with a card's price P (USD per
hour), peak F (FP8 where the card has it, else BF16) and memory bandwidth W:
    U_flop = P / (3600 F),  U_byte = P / (3600 W)
    attention(X) = 1e6 [max(attention FLOPs U_flop, KV bytes U_byte) + linear FLOPs U_flop]
    FFN(Y)       = 1e6 FFN FLOPs U_flop
    AFD          = min_X attention(X) + min_Y FFN(Y)    (each part on its cheapest card)
FFN batch and sparsity (§5.3-§5.4), with S = activated / total experts (shared ones included):
    B_MoE >= F / (2 S W) tokens per FFN instance;  S >= 3 H L (F / W) / (2 Net T_stage), T_stage = 16.6 ms.

Decisions on the questions the paper leaves open (also in the README):
- KV precision is the model's, whatever the card: 1 byte (FP8, or INT8 on cards without FP8), 2 bytes for the
  hybrids' full-attention layers.
- MiniMax-M1's lightning layers: each decoded token reads and updates a per-head d x d FP32 state, counted as
  heads d^2 4 bytes read and 4 heads d^2 FLOPs, independent of the context.
- `Net` in the sparsity bound is the FFN server's aggregate NIC bandwidth in one direction (8 x 400 Gbps = 400 GB/s).
- H100, H200 and B200 come from their public spec sheets (dense FLOPs); the paper gives no price for them, so they
  are costed only when `--price NAME=USD` gives one.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

T_STAGE_S = 0.0166  # one third of a 50 ms TPOT: the communication stage of the A->F->A pipeline


@dataclass(frozen=True)
class Hardware:
    name: str
    usd_per_hour: float | None  # None: no price known; give --price
    bf16_flops: float
    fp8_flops: float | None  # None: no FP8 (INT8 weights and KV at the same byte count, BF16 compute)
    mem_bw: float  # bytes/s
    net_bw: float  # an 8-card server's NICs, bytes/s in one direction

    @property
    def peak_flops(self) -> float:
        return self.fp8_flops or self.bf16_flops

    @property
    def usd_per_flop(self) -> float:
        return self.usd_per_hour / (3600 * self.peak_flops)

    @property
    def usd_per_byte(self) -> float:
        return self.usd_per_hour / (3600 * self.mem_bw)


GBPS_400, GBPS_200 = 8 * 400e9 / 8, 8 * 200e9 / 8  # 8 NICs, bits -> bytes
HARDWARE = {h.name: h for h in [
    # Step-3's Table 4.
    Hardware("H800", 2.0, 9.89e14, 1.98e15, 3.35e12, GBPS_400),
    Hardware("H20", 0.8, 1.48e14, 2.96e14, 4.00e12, GBPS_400),
    Hardware("A800", 0.75, 3.12e14, None, 2.00e12, GBPS_200),
    Hardware("910B", 0.67, 2.80e14, None, 1.60e12, GBPS_200),
    # NVIDIA's spec sheets (SXM, dense); 8 x 400 Gbps NICs assumed.
    Hardware("H100", None, 9.89e14, 1.979e15, 3.35e12, GBPS_400),
    Hardware("H200", None, 9.89e14, 1.979e15, 4.8e12, GBPS_400),
    Hardware("B200", None, 2.25e15, 4.5e15, 8.0e12, GBPS_400),
]}
PAPER_HARDWARE = ("H800", "H20", "A800", "910B")


@dataclass(frozen=True)
class AttentionLayers:
    """`count` layers of one attention type. kind: gqa (MQA, GQA and MFA), mla, or lightning (linear attention)."""
    count: int
    kind: str
    q_heads: int
    kv_heads: int = 0
    head_dim: int = 0
    kv_bytes: float = 1.0  # per element
    latent_dim: int = 0  # MLA: d_c + d_r, cached once per token
    chunk: int | None = None  # chunked attention: ctx -> min(ctx, chunk)
    proj_params: int = 0  # attention projection weights per layer

    def kv_bytes_per_token(self, ctx: int) -> float:
        span = min(ctx, self.chunk) if self.chunk else ctx
        if self.kind == "mla":
            return self.count * self.latent_dim * self.kv_bytes * span
        if self.kind == "lightning":
            return self.count * self.q_heads * self.head_dim ** 2 * 4  # the FP32 state, whatever the context
        return self.count * 2 * self.kv_heads * self.head_dim * self.kv_bytes * span

    def attn_flops_per_token(self, ctx: int) -> float:
        span = min(ctx, self.chunk) if self.chunk else ctx
        if self.kind == "mla":
            return self.count * 4 * self.q_heads * self.latent_dim * span
        if self.kind == "lightning":
            return self.count * 4 * self.q_heads * self.head_dim ** 2
        return self.count * 4 * self.q_heads * self.head_dim * span


@dataclass(frozen=True)
class CostModel:
    name: str
    hidden: int
    layers: int
    attention: tuple[AttentionLayers, ...]
    ffn_params: int  # activated FFN parameters per token (all layers)
    experts_active: int = 1  # per MoE layer, shared ones included; a dense model is 1 of 1
    experts_total: int = 1

    @property
    def sparsity(self) -> float:
        return self.experts_active / self.experts_total

    def per_token(self, ctx: int) -> dict:
        return {"kv_bytes_per_token": sum(a.kv_bytes_per_token(ctx) for a in self.attention),
                "attn_flops_per_token": sum(a.attn_flops_per_token(ctx) for a in self.attention),
                "linear_flops_per_token": 2 * sum(a.count * a.proj_params for a in self.attention),
                "ffn_flops_per_token": 2 * self.ffn_params}


def _gqa_proj(hidden: int, q_heads: int, kv_heads: int, head_dim: int) -> int:
    """Q, K, V and O weights of a GQA layer."""
    return hidden * (q_heads + 2 * kv_heads) * head_dim + q_heads * head_dim * hidden


def _mla_proj(hidden: int, heads: int) -> int:
    """DeepSeek-V3's MLA: q_a [H, 1536], q_b [1536, heads 192], kv_a [H, 576], kv_b [512, heads 256],
    o [heads 128, H]."""
    return hidden * 1536 + 1536 * heads * 192 + hidden * 576 + 512 * heads * 256 + heads * 128 * hidden


def _swiglu(hidden: int, inter: int) -> int:
    return 3 * hidden * inter


CATALOG = {m.name: m for m in [
    CostModel("Step-3", 7168, 61, (AttentionLayers(
        61, "gqa", 64, 1, 256, proj_params=7168 * 2560 + 2048 * 16384 + 16384 * 7168),),
        56 * 4 * _swiglu(7168, 5120) + 5 * _swiglu(7168, 18432), 4, 49),
    CostModel("DeepSeek-V3", 7168, 61, (AttentionLayers(
        61, "mla", 128, latent_dim=576, proj_params=_mla_proj(7168, 128)),),
        58 * 9 * _swiglu(7168, 2048) + 3 * _swiglu(7168, 18432), 9, 257),
    CostModel("Kimi-K2", 7168, 61, (AttentionLayers(
        61, "mla", 64, latent_dim=576, proj_params=_mla_proj(7168, 64)),),
        60 * 9 * _swiglu(7168, 2048) + 1 * _swiglu(7168, 18432), 9, 385),
    CostModel("Qwen3-235B-A22B", 4096, 94, (AttentionLayers(
        94, "gqa", 64, 4, 128, proj_params=_gqa_proj(4096, 64, 4, 128)),),
        94 * 8 * _swiglu(4096, 1536), 8, 128),
    CostModel("Qwen3-32B", 5120, 64, (AttentionLayers(
        64, "gqa", 64, 8, 128, proj_params=_gqa_proj(5120, 64, 8, 128)),),
        64 * _swiglu(5120, 25600)),
    CostModel("Llama-4-Maverick", 5120, 48, (
        AttentionLayers(12, "gqa", 40, 8, 128, kv_bytes=2, proj_params=_gqa_proj(5120, 40, 8, 128)),
        AttentionLayers(36, "gqa", 40, 8, 128, chunk=8192, proj_params=_gqa_proj(5120, 40, 8, 128))),
        24 * 2 * _swiglu(5120, 8192) + 24 * _swiglu(5120, 16384), 2, 129),
    CostModel("MiniMax-M1", 6144, 80, (
        AttentionLayers(10, "gqa", 64, 8, 128, kv_bytes=2, proj_params=_gqa_proj(6144, 64, 8, 128)),
        AttentionLayers(70, "lightning", 64, head_dim=128, proj_params=_gqa_proj(6144, 64, 64, 128))),
        80 * 2 * _swiglu(6144, 9216), 2, 32),
    CostModel("ERNIE-4.5", 8192, 54, (AttentionLayers(
        54, "gqa", 64, 8, 128, proj_params=_gqa_proj(8192, 64, 8, 128)),),
        3 * _swiglu(8192, 28672) + 51 * 8 * _swiglu(8192, 3584), 8, 64),
    CostModel("Pangu-Pro-MoE", 5120, 48, (AttentionLayers(
        48, "gqa", 40, 8, 128, proj_params=_gqa_proj(5120, 40, 8, 128)),),
        48 * 12 * _swiglu(5120, 1344), 12, 68),
]}


def model_from_hf_config(path: str | Path) -> CostModel:
    """A CostModel from an HF config.json (or its directory): GQA or MLA attention, dense or MoE FFN, 8-bit KV."""
    path = Path(path)
    cfg = json.loads((path / "config.json" if path.is_dir() else path).read_text())
    hidden, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    heads = cfg["num_attention_heads"]
    if cfg.get("kv_lora_rank"):
        latent = cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]
        q_dim = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
        q_rank = cfg.get("q_lora_rank") or 0
        proj = ((hidden * q_rank + q_rank * heads * q_dim) if q_rank else hidden * heads * q_dim) \
            + hidden * latent + cfg["kv_lora_rank"] * heads * (cfg["qk_nope_head_dim"] + cfg["v_head_dim"]) \
            + heads * cfg["v_head_dim"] * hidden
        attention = AttentionLayers(layers, "mla", heads, latent_dim=latent, proj_params=proj)
    else:
        kv_heads = cfg.get("num_key_value_heads", heads)
        head_dim = cfg.get("head_dim") or hidden // heads
        attention = AttentionLayers(layers, "gqa", heads, kv_heads, head_dim,
                                    proj_params=_gqa_proj(hidden, heads, kv_heads, head_dim))
    routed = cfg.get("n_routed_experts") or cfg.get("num_experts") or cfg.get("num_local_experts") or 0
    if not routed:
        return CostModel(cfg.get("_name_or_path") or path.stem, hidden, layers, (attention,),
                         layers * _swiglu(hidden, cfg["intermediate_size"]))
    top_k = cfg["num_experts_per_tok"]
    shared = cfg.get("n_shared_experts") or (1 if cfg.get("shared_expert_intermediate_size") else 0)
    expert_inter = cfg.get("moe_intermediate_size") or cfg["intermediate_size"]
    shared_inter = cfg.get("shared_expert_intermediate_size") or shared * expert_inter
    dense = cfg.get("first_k_dense_replace", 0)
    ffn = (layers - dense) * (top_k * _swiglu(hidden, expert_inter) + _swiglu(hidden, shared_inter)) \
        + dense * _swiglu(hidden, cfg["intermediate_size"])
    return CostModel(cfg.get("_name_or_path") or path.stem, hidden, layers, (attention,), ffn,
                     top_k + shared, routed + shared)


def attention_usd_per_1m(q: dict, hw: Hardware) -> float:
    return 1e6 * (max(q["attn_flops_per_token"] * hw.usd_per_flop, q["kv_bytes_per_token"] * hw.usd_per_byte)
                  + q["linear_flops_per_token"] * hw.usd_per_flop)


def ffn_usd_per_1m(q: dict, hw: Hardware) -> float:
    return 1e6 * q["ffn_flops_per_token"] * hw.usd_per_flop


def min_moe_sparsity(model: CostModel, hw: Hardware) -> float:
    """The sparsity below which an FFN instance's weight-bound batch cannot cross the network within T_stage."""
    return 3 * model.hidden * model.layers * (hw.peak_flops / hw.mem_bw) / (2 * hw.net_bw * T_STAGE_S)


def b_moe_tokens(model: CostModel, hw: Hardware) -> float:
    """Tokens an FFN instance must batch for its experts to be compute-bound: F / (2 S W)."""
    return hw.peak_flops / (2 * model.sparsity * hw.mem_bw)


@dataclass(frozen=True)
class CostSpec:
    models: tuple[str, ...] = tuple(CATALOG)  # catalog names or paths to HF config.json files
    contexts: tuple[int, ...] = (8192, 32768)
    hardware: tuple[str, ...] = tuple(HARDWARE)
    prices: dict[str, float] = field(default_factory=dict)  # overrides and additions, USD per card-hour


def spec_hardware(spec: CostSpec) -> list[Hardware]:
    """The spec's cards with its --price overrides; a card may still have no price."""
    unknown = sorted(set(spec.hardware) - HARDWARE.keys())
    if unknown:
        raise ValueError(f"unknown hardware {', '.join(unknown)}; the catalog has {', '.join(HARDWARE)}")
    return [replace(HARDWARE[n], usd_per_hour=spec.prices.get(n, HARDWARE[n].usd_per_hour)) for n in spec.hardware]


def resolve_model(name: str) -> CostModel:
    if name in CATALOG:
        return CATALOG[name]
    if Path(name).exists():
        return model_from_hf_config(name)
    raise ValueError(f"model {name!r} is neither in the catalog ({', '.join(CATALOG)}) nor a config.json path")


def run_cost(spec: CostSpec) -> dict:
    all_cards = spec_hardware(spec)
    cards = [hw for hw in all_cards if hw.usd_per_hour is not None]
    if not cards:
        raise ValueError("no priced hardware: give --price NAME=USD for H100, H200 or B200")
    models = [resolve_model(name) for name in spec.models]
    rows = []
    for model in models:
        for ctx in spec.contexts:
            q = model.per_token(ctx)
            attn = {hw.name: attention_usd_per_1m(q, hw) for hw in cards}
            ffn = {hw.name: ffn_usd_per_1m(q, hw) for hw in cards}
            best_attn, best_ffn = min(attn, key=attn.get), min(ffn, key=ffn.get)
            rows.append({"model": model.name, "context": ctx, **q, "usd_per_1m_attention": attn,
                         "usd_per_1m_ffn": ffn, "usd_per_1m_single": {n: attn[n] + ffn[n] for n in attn},
                         "usd_per_1m_afd_best": attn[best_attn] + ffn[best_ffn],
                         "afd_best_cards": {"attention": best_attn, "ffn": best_ffn}})
    step3 = CATALOG["Step-3"]
    return {"rows": rows,
            "min_moe_sparsity": {hw.name: min_moe_sparsity(step3, hw) for hw in all_cards},
            "b_moe_tokens": {hw.name: b_moe_tokens(step3, hw) for hw in all_cards},
            "step3_sparsity": step3.sparsity, "t_stage_ms": T_STAGE_S * 1e3,
            "hardware": {hw.name: {"usd_per_hour": hw.usd_per_hour, "peak_flops": hw.peak_flops,
                                   "mem_bw": hw.mem_bw, "net_bw": hw.net_bw} for hw in all_cards}}


def format_cost_result(result: dict) -> str:
    cards = [n for n, h in result["hardware"].items() if h["usd_per_hour"] is not None]
    head = f"{'model':<17} {'ctx':>6} {'KV MB/tok':>9} " + " ".join(f"{n + ' A+F':>11}" for n in cards)
    lines = ["USD per 1M decoded tokens: attention + FFN on one card kind, and AFD with each part on its cheapest",
             head + f" {'AFD best':>9}  cards (attention/FFN)", "-" * (len(head) + 32)]
    for r in result["rows"]:
        single = " ".join(f"{r['usd_per_1m_single'][n]:>11.3f}" for n in cards)
        best = r["afd_best_cards"]
        lines.append(f"{r['model']:<17} {r['context']:>6} {r['kv_bytes_per_token'] / 1e6:>9.2f} {single} "
                     f"{r['usd_per_1m_afd_best']:>9.3f}  {best['attention']}/{best['ffn']}")
    lines.append("Step-3 (S = %.3f): minimum MoE sparsity %s; FFN batch per instance %s" % (
        result["step3_sparsity"],
        ", ".join(f"{n} {s:.3f}" for n, s in result["min_moe_sparsity"].items()),
        ", ".join(f"{n} {b:,.0f}" for n, b in result["b_moe_tokens"].items())))
    return "\n".join(lines)


PLOT_CONTEXTS = tuple(2 ** k for k in range(10, 18))  # 1K .. 128K


def cost_against_context(spec: CostSpec, card: str, contexts: tuple[int, ...] = PLOT_CONTEXTS) -> dict:
    """USD per 1M decoded tokens (attention + FFN, both on `card`) per model at each context."""
    hw = {h.name: h for h in spec_hardware(replace(spec, hardware=(card,)))}[card]
    if hw.usd_per_hour is None:
        raise ValueError(f"{card} has no price: give --price {card}=USD")
    curves = {}
    for name in spec.models:
        model = resolve_model(name)
        curves[model.name] = [(ctx, attention_usd_per_1m(model.per_token(ctx), hw) + ffn_usd_per_1m(
            model.per_token(ctx), hw)) for ctx in contexts]
    return curves


def plot_cost_against_context(curves: dict, card: str, path: str | Path) -> Path:
    """One line per model: USD per 1M decoded tokens on one card against context, log-2 x axis."""
    from afdserve.bench.plot import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in curves.items():
        ax.plot([c for c, _ in points], [u for _, u in points], marker="o", ms=3, label=name)
    ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="USD per 1M decoded tokens",
           title=f"Decoding cost against context on {card} (attention + FFN, Step-3's model)")
    ax.set_xticks([c for c, _ in next(iter(curves.values()))],
                  [f"{c // 1024}K" for c, _ in next(iter(curves.values()))])
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(plt, fig, path)
