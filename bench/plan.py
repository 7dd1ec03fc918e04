"""AFD deployment planner in the manner of MegaScale-Infer (MSI, arXiv 2504.02263) on the decoding-cost inputs of
Step-3 (arXiv 2507.19427): how many attention instances x and FFN instances y, how many micro-batches m and how
large a batch give the most decoded tokens per GPU under a TPOT SLA.

Per-layer time of one micro-batch. An instance is one 8-GPU server. Weights and KV take 1 byte (FP8, or INT8 on cards
without FP8), FLOPs run at the card's peak (FP8 where it has it), and the model is bench/cost.py's per-token sums
divided by the layer count: every layer is the average layer.
    attention  DP attention, b sequences per instance and micro-batch, b/8 per GPU (a fractional average):
               t_A = max(b/8 attention FLOPs / F, b/8 KV bytes / (W eff)) + b/8 linear FLOPs / F + P / W
               P: the attention projection weights, which every GPU reads from its own copy once per micro-batch.
               eff = 1 is the roofline; kv_efficiency() derives it per card from Step-3's Table 9.
    FFN        TP inside an instance, EP across the y instances, B = x b tokens per micro-batch:
               t_F = max(B FFN FLOPs / (8 y F), bytes of the experts B tokens touch / (8 y W))
               With top-k of E experts (shared ones counted in both) spread uniformly, B tokens touch
               E (1 - (1 - k/E)^B) experts on average; one expert = activated FFN parameters / layers / k, so a model
               with dense layers counts them as average MoE layers (Step-3: 7% more weight bytes than its real 304B).
               A dense model is 1 expert of 1: every weight, every step.
    comm       per direction, the heavier one: t_C = 2 H B max(1/Net_F, y/(x Net_A)). Each FFN instance gets nearly
               every token (with 4 active experts of 49, a token misses one of 2 instances with p < 0.12), so it
               takes in H B bytes (FP8) and sends back 2 H B (BF16 partial sums): the paper's 3 H per token and
               layer, not split over the y instances (split, Step-3's 3A4F would be far from the network limit the
               paper reports). An attention instance sends its B/x tokens to all y FFN instances. MSI has one Tc
               for both directions; taking the heavier overstates the round trip by H B / Net.
               Net: a server's NICs in one direction (8 x 400 Gbps); realistic_net: DeepEP's 40 GB/s per 50 GB/s NIC.

Pipeline (MSI's ping-pong; one FIFO server each for attention, the A->F link, FFN and the F->A link, which take the
(layer, micro-batch) pairs layer by layer, micro-batch by micro-batch, as the engine's layer loop does):
    R = t_A + t_F + 2 t_C (one micro-batch's round trip per layer), T_f = max(t_A, t_F, t_C)
    TPOT = T_total = R + (m - 1) T_f + (L - 1) max(R, m T_f)
 - m T_f >= R: MSI's regime (m >= 2 (1 + t_C / T_f) when t_A = t_F = T_f). The slowest stage never idles and
   T_total = (t_A + t_F + 2 t_C) + T_f (m L - 1), MSI's formula. Bound: attention, ffn or comm, whichever is T_f.
 - m T_f < R (m = 1 always): each micro-batch waits on its own round trip, T_total = L R + (m - 1) T_f; bound
   "round-trip", so more micro-batches would help. MSI's fallback T_f = max(t_A, t_F, t_C) alone would understate it.
Both branches are exact for fixed stage times with the links as servers (the tests check them against an event
simulation); with t_C <= max(t_A, t_F) a link never queues, so a pure delay gives the same numbers.

Search (plan, predict_fixed): for each x <= X_MAX, y <= Y_MAX, m <= 4 the largest batch m x b (b sequences per
attention instance and micro-batch) with TPOT <= SLA and each attention GPU's KV (batch / 8x sequences at ctx) within
its memory less the attention weights (MEMORY_BYTES, decimal GB; embeddings, LM head and activations left out, as
the paper does). TPOT and KV only grow with b, so a binary search finds it. Plans rank by tokens/s per GPU; with
prices, tokens per USD too.

Step-3 2A2F on H800 at 4K, 50 ms (step3_2a2f()): the paper measures 4,039 tok/s/GPU at a batch of 6,144 (3 x 2,048),
i.e. TPOT = 6144 / (32 x 4039) = 47.5 ms, 260 us per layer and micro-batch. The roofline gives t_A = 153 us (80 us
reading KV, 51 us reading the projection weights, 22 us of linear FLOPs), t_F = 100 us (weight-bound: 2,048 tokens
touch all 49 experts) and t_C = 73 us: attention-bound, TPOT 28.2 ms at 6,144. The best batch is then 8,712, capped
by H800 memory (70 GB of KV per GPU), at TPOT 36.0 ms and 7,556 tok/s/GPU: 1.87x the paper. The gap is attention
efficiency: the paper's own per-layer latencies (Table 9) put MFA on H800 at 57% of the bandwidth roofline for the KV
read alone, 73% once the linear part is charged (kv_efficiency('H800')), and its 47.5 ms is 59% of our 28.2 ms. With
kv_efficiency 0.73 the prediction is 1.54x, with 0.57 1.29x (SLA-bound at 8,358). The rest is what Table 9 does not
see at 4K (norms, router, FP8 quantisation, the EP reduction, LM head and sampling, the ~2 ms TPOT jitter the paper
reports) and, perhaps, a round 3 x 2,048 batch rather than the largest that fits.

Measured mode (fit_measured, plan_measured) for this engine's CPU workers, per layer and micro-batch, MSI's linear
model: t_A(b) = k1 b + k2 (b sequences on one attention worker), t_F(B) = (k3 B + k4) / y (B tokens over y FFN
workers, each a 1/y slice of the MLP or experts), t_C(B) = kc B max(1, y/x); per step, o1 n + o0 outside the layers
(embedding, LM head, sampling, scheduling, Ray; n sequences per attention worker), fitted as the measured mean TPOT
less the pipeline's prediction. Inputs, from `afdserve bench throughput --afd xAyF --json` results: afd_stage_times
holds per-layer sums over a step's m micro-batches (divided by m here), of attention worker 0 and FFN worker 0 (the
FFN's multiplied by y), and the two sides' time in send calls (halved per direction; absent in older results, where
t_C = 0). The averages include the run's few prefill steps (a few % of its time). Least squares needs two batch
sizes; with one the model is proportional through the point (k2 = k4 = o0 = 0), so throughput no longer depends on
the batch and micro-batch counts differ only by the pipeline fill. Each worker takes a core: x + y <= cores, which
on a 2-core host leaves only 1A1F.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from afdserve.bench.cost import CATALOG, HARDWARE, CostModel, Hardware
from afdserve.engine.config import parse_afd_ratio

GPUS = 8  # per instance
WEIGHT_BYTES = 1.0  # per weight: FP8 or INT8
DEEPEP_NIC_SHARE = 40 / 50  # DeepEP's measured GB/s per 400 Gbps NIC
MEMORY_BYTES = {"H800": 80e9, "H20": 96e9, "A800": 80e9, "910B": 64e9, "H100": 80e9, "H200": 141e9, "B200": 192e9}
X_MAX, Y_MAX, M_MAX = 8, 8, 4

# Step-3 Table 9: us per attention layer with its linear layers; 4 GPUs, total batch 256 (64 per GPU, DP), BF16 KV,
# FP8 (SM90) or INT8 (SM80) GEMMs. GQA's rows run TP, a layout this model does not cover, and are left out.
CALIBRATION = {("MFA", 8192): {"H800": 281, "H20": 438, "A800": 531},
               ("MFA", 32768): {"H800": 791, "H20": 1452, "A800": 1484},
               ("MLA", 8192): {"H800": 372, "H20": 1252}, ("MLA", 32768): {"H800": 1125, "H20": 4817}}
CALIBRATION_MODELS = {"MFA": "Step-3", "MLA": "DeepSeek-V3"}
CALIBRATION_PER_GPU, CALIBRATION_KV_BYTES = 64, 2.0
STEP3_PAPER = {"ctx": 4096, "tpot_s": 0.05, "x": 2, "y": 2, "m": 3, "batch": 6144, "tok_s_per_gpu": 4039}


@dataclass(frozen=True)
class LayerTimes:
    """Seconds per layer for one micro-batch; comm_s is one direction."""
    attention_s: float
    ffn_s: float
    comm_s: float


@dataclass(frozen=True)
class Options:
    kv_efficiency: float = 1.0  # fraction of the bandwidth roofline the attention kernels reach on KV
    realistic_net: bool = False  # DeepEP's 40 GB/s per NIC instead of 50
    ffn_hw: Hardware | None = None  # FFN instances on another card (default: the attention card)
    memory_bytes: float | None = None  # per attention GPU (default: MEMORY_BYTES; unknown card: unchecked)


@dataclass(frozen=True)
class Plan:
    x: int
    y: int
    m: int
    batch: int  # sequences in flight, all attention instances
    micro_batch: int  # sequences per micro-batch, all attention instances (the FFN's B)
    times: LayerTimes
    tpot_s: float
    tok_s: float
    tok_s_per_gpu: float  # per worker core in the measured mode
    bound: str  # attention, ffn, comm or round-trip
    kv_gb_per_gpu: float | None = None
    tokens_per_usd: float | None = None


def _per_layer(model: CostModel, ctx: int) -> dict:
    """Per token per layer: the model's per-token sums over its layers, and the weight bytes one layer reads."""
    q = {k.removesuffix("_per_token"): v / model.layers for k, v in model.per_token(ctx).items()}
    q["attn_weight_bytes"] = WEIGHT_BYTES * sum(a.count * a.proj_params for a in model.attention) / model.layers
    q["expert_bytes"] = WEIGHT_BYTES * model.ffn_params / model.layers / model.experts_active
    return q


def _attention_parts(model: CostModel, hw: Hardware, ctx: int, per_gpu: float) -> tuple[float, float, float]:
    """Seconds for (core attention FLOPs, KV read at the roofline, linear FLOPs + projection weights) on one GPU."""
    q, f, w = _per_layer(model, ctx), hw.peak_flops, hw.mem_bw
    return (per_gpu * q["attn_flops"] / f, per_gpu * q["kv_bytes"] / w,
            per_gpu * q["linear_flops"] / f + q["attn_weight_bytes"] / w)


def attention_time(model: CostModel, hw: Hardware, ctx: int, b: float, kv_efficiency: float = 1.0) -> float:
    """One layer of b sequences on one attention instance (b/8 per GPU)."""
    flops, kv, linear = _attention_parts(model, hw, ctx, b / GPUS)
    return max(flops, kv / kv_efficiency) + linear


def expected_distinct_experts(k: int, e: int, tokens: float) -> float:
    """Experts B tokens touch on average when each picks k of e uniformly: e (1 - (1 - k/e)^B)."""
    return e * (1 - (1 - k / e) ** tokens)


def ffn_time(model: CostModel, hw: Hardware, tokens: float, y: int) -> float:
    """One layer of `tokens` on y FFN instances: FLOPs or the touched experts' weights, whichever takes longer."""
    q, gpus = _per_layer(model, 1), GPUS * y
    experts = expected_distinct_experts(model.experts_active, model.experts_total, tokens)
    return max(tokens * q["ffn_flops"] / (gpus * hw.peak_flops), experts * q["expert_bytes"] / (gpus * hw.mem_bw))


def comm_time(model: CostModel, attn_hw: Hardware, ffn_hw: Hardware, tokens: float, x: int, y: int,
              realistic_net: bool = False) -> float:
    """One direction (the F->A one, BF16) of one layer's micro-batch, at the busier side's NICs."""
    share = DEEPEP_NIC_SHARE if realistic_net else 1.0
    return 2 * model.hidden * tokens * max(1 / ffn_hw.net_bw, y / (x * attn_hw.net_bw)) / share


def layer_times(model: CostModel, hw: Hardware, ctx: int, x: int, y: int, b: float,
                opts: Options = Options()) -> LayerTimes:
    """b sequences per attention instance per micro-batch; the FFN side gets all x b."""
    ffn_hw = opts.ffn_hw or hw
    return LayerTimes(attention_time(model, hw, ctx, b, opts.kv_efficiency), ffn_time(model, ffn_hw, x * b, y),
                      comm_time(model, hw, ffn_hw, x * b, x, y, opts.realistic_net))


def pipeline_latency(t: LayerTimes, m: int, layers: int) -> tuple[float, str]:
    """(T_total, bound) of m micro-batches through `layers` layers of the A -> link -> F -> link ping-pong."""
    round_trip = t.attention_s + t.ffn_s + 2 * t.comm_s
    stage = max(t.attention_s, t.ffn_s, t.comm_s)
    total = round_trip + (m - 1) * stage + (layers - 1) * max(round_trip, m * stage)
    if m * stage < round_trip:
        return total, "round-trip"
    return total, ("attention" if stage == t.attention_s else "ffn" if stage == t.ffn_s else "comm")


def largest_feasible(ok: Callable[[int], bool], limit: int = 1 << 24) -> int:
    """The largest n in 1..limit with ok(n), for an ok that holds up to some n and fails beyond; 0 if ok(1) fails."""
    if limit < 1 or not ok(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and ok(hi):
        lo, hi = hi, 2 * hi
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def kv_capacity_bytes(model: CostModel, hw: Hardware, opts: Options = Options()) -> float | None:
    """KV bytes an attention GPU can hold: its memory less the attention weights; None for an unknown card."""
    memory = opts.memory_bytes or MEMORY_BYTES.get(hw.name)
    return None if memory is None else memory - model.layers * _per_layer(model, 1)["attn_weight_bytes"]


def evaluate(model: CostModel, hw: Hardware, ctx: int, x: int, y: int, m: int, batch: int,
             opts: Options = Options()) -> Plan:
    """A deployment at a given batch (a multiple of m x), whether or not it meets any SLA or fits memory."""
    times = layer_times(model, hw, ctx, x, y, batch / (m * x), opts)
    tpot, bound = pipeline_latency(times, m, model.layers)
    tok_s = batch / tpot
    kv_gb = batch / (GPUS * x) * model.per_token(ctx)["kv_bytes_per_token"] / 1e9
    ffn_hw = opts.ffn_hw or hw
    usd_per_s = None if hw.usd_per_hour is None or ffn_hw.usd_per_hour is None else \
        GPUS * (x * hw.usd_per_hour + y * ffn_hw.usd_per_hour) / 3600
    return Plan(x, y, m, batch, batch // m, times, tpot, tok_s, tok_s / (GPUS * (x + y)), bound, kv_gb,
                tok_s / usd_per_s if usd_per_s else None)


def predict_fixed(model: CostModel, hw: Hardware, ctx: int, tpot_s: float, x: int, y: int, m: int,
                  opts: Options = Options()) -> Plan | None:
    """The largest batch of xAyF with m micro-batches that meets the TPOT SLA and fits KV; None if none does."""
    capacity = kv_capacity_bytes(model, hw, opts)
    seq_bytes = model.per_token(ctx)["kv_bytes_per_token"]
    limit = 1 << 24 if capacity is None else int(max(capacity, 0) * GPUS * x / seq_bytes) // (m * x)
    b = largest_feasible(lambda b: evaluate(model, hw, ctx, x, y, m, m * x * b, opts).tpot_s <= tpot_s, limit)
    return evaluate(model, hw, ctx, x, y, m, m * x * b, opts) if b else None


def plan(model: CostModel | str, hardware: Hardware | str, ctx: int, tpot_s: float, opts: Options = Options(),
         x_max: int = X_MAX, y_max: int = Y_MAX, m_max: int = M_MAX, top: int = 10, by: str = "gpu") -> list[Plan]:
    """The best deployments (by tokens/s per GPU, or by="usd" tokens per USD) over x, y and m."""
    model = CATALOG[model] if isinstance(model, str) else model
    hw = HARDWARE[hardware] if isinstance(hardware, str) else hardware
    found = [p for x in range(1, x_max + 1) for y in range(1, y_max + 1) for m in range(1, m_max + 1)
             if (p := predict_fixed(model, hw, ctx, tpot_s, x, y, m, opts))]
    key = (lambda p: p.tokens_per_usd or 0.0) if by == "usd" else (lambda p: p.tok_s_per_gpu)
    return sorted(found, key=key, reverse=True)[:top]


def _with_kv_bytes(model: CostModel, kv_bytes: float) -> CostModel:
    return replace(model, attention=tuple(replace(a, kv_bytes=kv_bytes) for a in model.attention))


def kv_efficiency(card: str, ctx: int = 8192, kind: str = "MFA", kv_only: bool = False) -> float | None:
    """The fraction of the KV-bandwidth roofline that reproduces Table 9's latency for `card`: the one that makes
    attention_time() equal the measurement (or, kv_only, the KV read alone against the whole latency, which charges
    the linear part to the KV). None where the row is FLOP-bound at the roofline and says nothing about bandwidth."""
    model = _with_kv_bytes(CATALOG[CALIBRATION_MODELS[kind]], CALIBRATION_KV_BYTES)
    measured = CALIBRATION[(kind, ctx)][card] * 1e-6
    flops, kv, linear = _attention_parts(model, HARDWARE[card], ctx, CALIBRATION_PER_GPU)
    if kv_only:
        return kv / measured
    return kv / (measured - linear) if kv >= flops and measured > linear else None


def step3_2a2f(opts: Options = Options()) -> dict:
    """The paper's headline deployment against this model: at its batch and at the best batch under its SLA."""
    p, model, hw = STEP3_PAPER, CATALOG["Step-3"], HARDWARE["H800"]
    at_paper = evaluate(model, hw, p["ctx"], p["x"], p["y"], p["m"], p["batch"], opts)
    best = predict_fixed(model, hw, p["ctx"], p["tpot_s"], p["x"], p["y"], p["m"], opts)
    return {"paper": p, "paper_tpot_s": p["batch"] / (GPUS * (p["x"] + p["y"]) * p["tok_s_per_gpu"]),
            "at_paper_batch": at_paper, "best": best, "ratio": best.tok_s_per_gpu / p["tok_s_per_gpu"]}


@dataclass(frozen=True)
class MeasuredProfile:
    """Per layer and micro-batch on this engine's workers (seconds): t_A(b) = k1 b + k2, t_F(B) = (k3 B + k4) / y,
    t_C(B) = kc B max(1, y/x); per step outside the layers o1 n + o0 (n sequences per attention worker)."""
    k1: float
    k2: float
    k3: float
    k4: float
    kc: float
    o1: float
    o0: float
    runs: int
    notes: tuple[str, ...] = ()


def _fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares slope and intercept; with one distinct x, the line through the origin and the mean point."""
    if len(set(xs)) >= 2:
        slope, intercept = np.polyfit(xs, ys, 1)
        return float(slope), float(intercept)
    return float(np.mean(ys) / np.mean(xs)), 0.0


def fit_measured(results: list[dict], layers: int | None = None) -> MeasuredProfile:
    """MSI's linear model from `bench throughput --afd --json` results; runs without AFD stage times are skipped.
    `layers` (or the workers' raw counts) is needed to fit the per-step overhead; without it o1 = o0 = 0."""
    runs = [r for r in results if r.get("afd") and r.get("afd_stage_times")]
    if not runs:
        raise ValueError("no result has afd_stage_times (run `afdserve bench throughput --afd 1A1F --json F`)")
    notes = [f"skipped {len(results) - len(runs)} result(s) without AFD stage times"] if len(runs) < len(results) \
        else []
    pts = []
    for r in runs:
        t, m, (x, y), n = r["afd_stage_times"], r["micro_batches"], parse_afd_ratio(r["afd"]), r["spec"]["concurrency"]
        workers = t.get("workers", {}).get("attention") or [{}]
        depth = layers or (workers[0]["layers"] // workers[0]["steps"] if workers[0].get("steps") else None)
        transfer = t.get("transfer_ms_per_layer")
        pts.append({"b": n / (x * m), "B": n / m, "x": x, "y": y, "m": m, "n": n / x, "layers": depth,
                    "tA": t["attention_ms_per_layer"] / 1e3 / m, "tF": t["ffn_ms_per_layer"] / 1e3 / m * y,
                    "tC": None if transfer is None else transfer / 1e3 / (2 * m), "tpot": r["tpot"]["mean_ms"] / 1e3})
    if len({p["b"] for p in pts}) < 2:
        notes.append("one batch size: proportional model through the measured point (k2 = k4 = o0 = 0)")
    k1, k2 = _fit_line([p["b"] for p in pts], [p["tA"] for p in pts])
    k3, k4 = _fit_line([p["B"] for p in pts], [p["tF"] for p in pts])
    comm = [p for p in pts if p["tC"] is not None]
    kc = sum(p["tC"] * p["B"] for p in comm) / sum(p["B"] ** 2 for p in comm) if comm else 0.0
    if not comm:
        notes.append("no transfer times in the results: t_C = 0")
    o1 = o0 = 0.0
    timed = [p for p in pts if p["layers"]]
    if timed:
        def model_tpot(p):
            times = LayerTimes(k1 * p["b"] + k2, (k3 * p["B"] + k4) / p["y"], kc * p["B"] * max(1, p["y"] / p["x"]))
            return pipeline_latency(times, p["m"], p["layers"])[0]
        o1, o0 = _fit_line([p["n"] for p in timed], [p["tpot"] - model_tpot(p) for p in timed])
    else:
        notes.append("layer count unknown: no per-step overhead fitted (give layers=)")
    return MeasuredProfile(k1, k2, k3, k4, kc, o1, o0, len(pts), tuple(notes))


def measured_tpot(profile: MeasuredProfile, layers: int, x: int, y: int, m: int,
                  b: float) -> tuple[float, LayerTimes, str]:
    """TPOT of xAyF with b sequences per attention worker per micro-batch, on the fitted profile."""
    p, big_b = profile, x * b
    times = LayerTimes(p.k1 * b + p.k2, (p.k3 * big_b + p.k4) / y, p.kc * big_b * max(1, y / x))
    total, bound = pipeline_latency(times, m, layers)
    return total + max(0.0, p.o1 * m * b + p.o0), times, bound


def plan_measured(profile: MeasuredProfile, layers: int, tpot_s: float, cores: int, m_max: int = M_MAX,
                  max_concurrency: int = 4096, top: int = 10) -> list[Plan]:
    """Deployments of this engine's CPU workers (one core each: x + y <= cores) at their largest concurrency under
    the SLA, best total tokens/s first: the first is the recommendation."""
    found = []
    for x in range(1, cores):
        for y in range(1, cores - x + 1):
            for m in range(1, m_max + 1):
                b = largest_feasible(lambda b: measured_tpot(profile, layers, x, y, m, b)[0] <= tpot_s,
                                     max_concurrency // (m * x))
                if b:
                    tpot, times, bound = measured_tpot(profile, layers, x, y, m, b)
                    n = m * x * b
                    found.append(Plan(x, y, m, n, x * b, times, tpot, n / tpot, n / tpot / (x + y), bound))
    return sorted(found, key=lambda p: (p.tok_s, -p.m), reverse=True)[:top]


def format_plan(plans: list[Plan], title: str = "", unit: str = "GPU") -> str:
    head = (f"{'plan':>6} {'m':>2} {'batch':>7} {'micro':>6} {'t_A us':>8} {'t_F us':>8} {'t_C us':>8} "
            f"{'TPOT ms':>8} {'tok/s':>10} {'tok/s/' + unit:>11} {'bound':>10} {'KV GB/GPU':>9} {'tok/USD':>9}")
    lines = ([title] if title else []) + [head, "-" * len(head)]
    for p in plans:
        kv = f"{p.kv_gb_per_gpu:>9.1f}" if p.kv_gb_per_gpu is not None else f"{'-':>9}"
        usd = f"{p.tokens_per_usd:>9.0f}" if p.tokens_per_usd is not None else f"{'-':>9}"
        t = p.times
        lines.append(f"{f'{p.x}A{p.y}F':>6} {p.m:>2} {p.batch:>7} {p.micro_batch:>6} {t.attention_s * 1e6:>8.1f} "
                     f"{t.ffn_s * 1e6:>8.1f} {t.comm_s * 1e6:>8.1f} {p.tpot_s * 1e3:>8.2f} {p.tok_s:>10.1f} "
                     f"{p.tok_s_per_gpu:>11.1f} {p.bound:>10} {kv} {usd}")
    return "\n".join(lines)
