"""Kinetics' eFLOPs cost model of test-time scaling (Kinetics, arXiv 2506.05333) on the dense Qwen3 models: costs,
Pareto frontiers of accuracy against cost, an analytic sweep on an accuracy proxy, and a loader for measured traces.

eFLOPs = compute FLOPs + I x memory bytes, added rather than overlapped; I = 562.5 FLOP/byte (B200: 4.5 PFLOP/s dense
FP8 over 8 TB/s), and eFLOPs / 4.5e15 reads as B200 seconds. Costs are in eFLOPs (SI; Kinetics' code reports
Tera-eFLOPs, 1e-12 of them). One problem, N trials, a prompt of L_in tokens, L_out generated per trial, P parameters,
H_q / H_kv heads and d_L = head_dim x layers, BF16 K and V:
    dense    compute = N [2 P L_out + 2 (2 L_in + L_out) L_out H_q d_L]
             memory  = I 2 (2 L_in + N L_out) L_out H_kv d_L      the prompt's KV is read once for all N trials
    sparse   kvf     = B L_out + sign 1/2 max(0, B - L_in)^2      token-steps attended under a KV budget B
             compute = N [2 P L_out + 4 kvf H_q d_L],  memory = I 4 kvf H_kv d_L N   (no prefix sharing)
    block    B = bs k (k blocks of bs tokens), plus a search that scores one mean key per block:
             compute += N ((2 L_in + L_out) // bs) L_out H_q d_L,  memory += I ((2 L_in + N L_out) // bs) L_out H_kv d_L
Parameter reads are left out (amortised over large batches). A configuration's cost on a problem is the mean over its
trials' lengths. The frontier at a budget is the mean over problems of the best score among configurations costing no
more; with `by` (e.g. "model") it is the best such frontier of one group, as Kinetics takes the max over models.

Decisions where Kinetics' code is ambiguous:
- The sign of 1/2 (B - L_in)^2: the code adds it for oracle top-k and subtracts it for block top-k. sign=-1 (default)
  is the count: the integral over the decode of min(B, L_in + t), min(B - L_in, L_out) / 2 token-steps short of the
  discrete sum over t = 1..L_out. sign=+1 reproduces the repository's oracle top-k costs.
- With sign=-1 the budget is capped at L_in + L_out: a budget the sequence never fills costs what dense attention costs
  (uncapped, the formula drops below dense and eventually below zero). sign=+1 keeps the repository's form uncapped.
- P are the Kinetics scripts' counts: tied embeddings are counted twice for 0.6B and 1.7B, once for 4B.
"""
from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import NormalDist

import numpy as np

from afdserve.bench.plot import pyplot, save_figure
from afdserve.engine.request_cost import KINETICS_INTENSITY as I_B200  # eFLOPs per byte; the engine charges the same

B200_FLOPS = 4.5e15  # eFLOPs per B200 second
FAMILIES = {"dense": "dense", "block": "block top-k", "topk": "oracle top-k"}
TASKS = {"bestofn": "Best-of-N", "longcot": "Long-CoT"}
TRACE_COLUMNS = ("problem", "config", "model", "input_len", "output_lens", "correct")


@dataclass(frozen=True)
class KineticsModel:
    name: str
    params: float
    layers: int
    q_heads: int
    kv_heads: int
    head_dim: int = 128

    @property
    def d_l(self) -> int:
        return self.head_dim * self.layers


QWEN3 = {m.name: m for m in [
    KineticsModel("Qwen3-0.6B", 0.752e9, 28, 16, 8),
    KineticsModel("Qwen3-1.7B", 2.03e9, 28, 16, 8),
    KineticsModel("Qwen3-4B", 4.02e9, 36, 32, 8),
    KineticsModel("Qwen3-8B", 8.19e9, 36, 32, 8),
    KineticsModel("Qwen3-14B", 14.77e9, 40, 40, 8),
    KineticsModel("Qwen3-32B", 32.76e9, 64, 64, 8),
]}
AIME24_LITESYS = {"Qwen3-0.6B": 0.115, "Qwen3-1.7B": 0.459, "Qwen3-4B": 0.717, "Qwen3-8B": 0.752,
                  "Qwen3-14B": 0.796, "Qwen3-32B": 0.821}  # LiteSys' mean accuracy over 32 runs


@dataclass(frozen=True)
class Cost:
    compute: float  # eFLOPs
    memory: float  # eFLOPs: I x bytes

    @property
    def total(self) -> float:
        return self.compute + self.memory


def dense_cost(model: KineticsModel, n: int, input_len: int, output_len: int, intensity: float = I_B200) -> Cost:
    attn = 2 * (2 * input_len + output_len) * output_len * model.q_heads * model.d_l
    compute = n * (2 * model.params * output_len + attn)
    memory = intensity * 2 * (2 * input_len + n * output_len) * output_len * model.kv_heads * model.d_l
    return Cost(compute, memory)


def attended_token_steps(input_len: int, output_len: int, budget: int, sign: int = -1) -> float:
    """kvf of the module docstring; with sign=-1 the budget is capped at the final context."""
    if sign not in (-1, 1):
        raise ValueError(f"sign must be -1 (the count) or +1 (the repository's oracle top-k), not {sign!r}")
    if sign < 0:
        budget = min(budget, input_len + output_len)
    return budget * output_len + sign * 0.5 * max(0, budget - input_len) ** 2


def sparse_cost(model: KineticsModel, n: int, input_len: int, output_len: int, budget: int,
                block_size: int | None = None, sign: int = -1, intensity: float = I_B200) -> Cost:
    """Oracle top-k with a KV budget of `budget` tokens, or block top-k of budget // block_size blocks."""
    kvf = attended_token_steps(input_len, output_len, budget, sign)
    compute = n * (2 * model.params * output_len + 4 * kvf * model.q_heads * model.d_l)
    memory = 4 * kvf * model.kv_heads * model.d_l * n
    if block_size is not None:
        if block_size <= 0 or budget % block_size:
            raise ValueError(f"budget {budget} is not a whole number of blocks of {block_size}")
        compute += n * ((2 * input_len + output_len) // block_size) * output_len * model.q_heads * model.d_l
        memory += ((2 * input_len + n * output_len) // block_size) * output_len * model.kv_heads * model.d_l
    return Cost(compute, intensity * memory)


def expected_cost(model: KineticsModel, n: int, input_len: int, output_lens, cost_fn=dense_cost, **kwargs) -> Cost:
    """The mean of cost_fn(model, n, input_len, L) over the trials' lengths L (Kinetics' expected_cost)."""
    if not len(output_lens):
        raise ValueError("expected_cost needs at least one output length")
    costs = [cost_fn(model, n, input_len, length, **kwargs) for length in output_lens]
    return Cost(sum(c.compute for c in costs) / len(costs), sum(c.memory for c in costs) / len(costs))


def _mean_best(records: list[dict], budgets: np.ndarray, problems: list) -> np.ndarray:
    """Mean over `problems` of the best score affordable at each budget (0 for a problem with nothing affordable;
    nan where no problem has anything affordable)."""
    table, by_problem = np.full((len(problems), len(budgets)), np.nan), {}
    for r in records:
        by_problem.setdefault(r["problem"], []).append((float(r["cost"]), float(r["score"])))
    for i, problem in enumerate(problems):
        pairs = sorted(by_problem.get(problem, []))
        if not pairs:
            continue
        costs, best = np.array([c for c, _ in pairs]), np.maximum.accumulate([s for _, s in pairs])
        idx = np.searchsorted(costs, budgets, side="right") - 1
        table[i] = np.where(idx >= 0, best[np.maximum(idx, 0)], np.nan)
    return np.where(np.isnan(table).all(axis=0), np.nan, np.nan_to_num(table).mean(axis=0))


def _grouped(records: list[dict], budgets: np.ndarray, by: str) -> tuple[list, np.ndarray]:
    problems = list(dict.fromkeys(r["problem"] for r in records))
    groups: dict = {}
    for r in records:
        groups.setdefault(r[by], []).append(r)
    return list(groups), np.array([_mean_best(rs, budgets, problems) for rs in groups.values()])


def _uniform3(y: np.ndarray) -> np.ndarray:
    """A mean over a window of 3 with mirrored edges (scipy's uniform_filter1d, mode reflect)."""
    return np.convolve(np.pad(y, 1, mode="symmetric"), np.ones(3) / 3, mode="valid")


def pareto_frontier(records: list[dict], budgets, by: str | None = None,
                    smooth: bool = False) -> list[tuple[float, float]]:
    """(budget, mean over problems of the best score at cost <= budget) per budget. records: dicts with problem,
    config, cost, score. by=None lets each problem pick its own configuration; by="model" (Kinetics) keeps one group
    for all problems and takes the best group. smooth: Kinetics' window-3 mean, which can lift a point above what any
    configuration reaches at that budget (a step shows as a ramp), so it is off by default."""
    if not records:
        raise ValueError("pareto_frontier needs at least one record")
    budgets = np.asarray(budgets, dtype=float)
    if by is None:
        scores = _mean_best(records, budgets, list(dict.fromkeys(r["problem"] for r in records)))
    else:
        scores = np.fmax.reduce(_grouped(records, budgets, by)[1], axis=0)
    scores = np.nan_to_num(scores)
    if smooth:
        scores = _uniform3(scores)
    return [(float(b), float(s)) for b, s in zip(budgets, scores)]


def frontier_configs(records: list[dict], budgets, by: str = "config") -> list[tuple[float, str | None]]:
    """(budget, the value of `by` whose group frontier is highest there; None if nothing is affordable), ties to the
    group seen first. Changes along the list are the switch points Kinetics marks."""
    budgets = np.asarray(budgets, dtype=float)
    names, table = _grouped(records, budgets, by)
    return [(float(b), None if np.isnan(table[:, j]).all() else names[int(np.nanargmax(table[:, j]))])
            for j, b in enumerate(budgets)]


@dataclass(frozen=True)
class AccuracyProxy:
    """Stands in for traces: per model a single-trial accuracy mu, per-problem solve rates p ~ Beta(mu c, (1 - mu) c),
    so Best-of-N coverage = 1 - E[(1 - p)^N] = 1 - B(a, b + N) / B(a, b); trace lengths lognormal (median, sigma) for
    every model, and a long-CoT trace cut at its budget scores only if it had finished: mu P(length <= budget)."""
    accuracy: dict[str, float] = field(default_factory=lambda: dict(AIME24_LITESYS))
    concentration: float = 1.0  # c = a + b; below 2 the Beta is U-shaped: problems mostly always or never solved
    median_len: float = 12000.0
    sigma: float = 0.6
    max_len: int = 32768  # Best-of-N traces are cut here, as the reference accuracies were measured
    quantiles: int = 32  # the length distribution as this many mid-quantiles

    def coverage(self, model: str, n: int) -> float:
        mu = self.accuracy[model]
        if not 0 < mu < 1:
            return float(mu)
        a, b = mu * self.concentration, (1 - mu) * self.concentration  # B(a, b + n) / B(a, b) through lgamma:
        return 1 - math.exp(math.lgamma(b + n) + math.lgamma(a + b) - math.lgamma(b) - math.lgamma(a + b + n))

    def finish_prob(self, budget: float) -> float:
        return NormalDist().cdf(math.log(budget / self.median_len) / self.sigma)

    def lengths(self, cap: int) -> list[int]:
        z = NormalDist()
        return [max(1, min(cap, round(self.median_len * math.exp(self.sigma * z.inv_cdf((i + 0.5) / self.quantiles)))))
                for i in range(self.quantiles)]

    def describe(self) -> dict:
        return {**asdict(self), "assumptions": [
            "no traces: scores are a proxy, not measurements",
            "accuracy: single-trial AIME24 accuracy per model (LiteSys' reference runs)",
            "Best-of-N: per-problem solve rates ~ Beta(mu c, (1 - mu) c); coverage = 1 - B(a, b + N) / B(a, b)",
            "trace lengths: lognormal(median_len, sigma) for every model, as `quantiles` mid-quantiles; cost is the"
            " mean over them (Best-of-N capped at max_len, long-CoT at the generation budget)",
            "long-CoT: score = accuracy x P(length <= budget); a truncated trace is wrong",
            "the frontier is over configurations of one average problem: a lower bound on the per-problem maximum",
            "upper bound: sparse attention assumed lossless (sparse variants keep the dense accuracy)"]}


@dataclass(frozen=True)
class KineticsSpec:
    models: tuple[str, ...] = tuple(QWEN3)
    trials: tuple[int, ...] = (1, 2, 4, 8, 16, 32)  # Best-of-N
    gen_budgets: tuple[int, ...] = tuple(range(2048, 32768 + 1, 2048))  # long-CoT
    kv_budgets: tuple[int, ...] = (128, 256, 512, 1024, 2048)  # sparse; block bs = 16384 // B, k = B // bs (B <= 16384)
    input_len: int = 128
    bestofn_output_len: int | None = None  # None: the proxy's length quantiles capped at max_len
    intensity: float = I_B200
    sign: int = -1
    frontier_points: int = 100
    smooth: bool = False
    proxy: AccuracyProxy = field(default_factory=AccuracyProxy)


def _variants(spec: KineticsSpec) -> list[tuple[str, str, dict]]:
    """(variant, family, the cost function's arguments); block bs = 16384 // B (Kinetics' file tags)."""
    blocks = [(16384 // b, b // (16384 // b)) for b in spec.kv_budgets if b <= 16384]
    return [("dense", "dense", {"cost_fn": dense_cost})] \
        + [(f"topk{b}", "topk", {"cost_fn": sparse_cost, "budget": b, "sign": spec.sign}) for b in spec.kv_budgets] \
        + [(f"block{bs}x{k}", "block", {"cost_fn": sparse_cost, "budget": bs * k, "block_size": bs, "sign": spec.sign})
           for bs, k in blocks]


def _record(spec: KineticsSpec, model: str, variant: tuple, lengths: list, n: int, score: float, key: dict) -> dict:
    name, family, kwargs = variant
    cost = expected_cost(QWEN3[model], n, spec.input_len, lengths, intensity=spec.intensity, **kwargs)
    config = f"{model} {name} " + " ".join(f"{k}={v}" for k, v in key.items())
    return {"problem": "proxy", "config": config, "model": model, "variant": name, "family": family, **key,
            "compute": cost.compute, "memory": cost.memory, "cost": cost.total, "score": score}


def run_analytic_sweep(spec: KineticsSpec = KineticsSpec()) -> dict:
    unknown = [m for m in spec.models if m not in QWEN3 or m not in spec.proxy.accuracy]
    if unknown:
        raise ValueError(f"no Qwen3 configuration or proxy accuracy for {', '.join(unknown)}")
    proxy, variants = spec.proxy, _variants(spec)
    bon_lens = [spec.bestofn_output_len] if spec.bestofn_output_len else proxy.lengths(proxy.max_len)
    records: dict[str, list] = {"bestofn": [], "longcot": []}
    for model in spec.models:
        for variant in variants:
            records["bestofn"] += [_record(spec, model, variant, bon_lens, n, proxy.coverage(model, n), {"n": n})
                                   for n in spec.trials]
            records["longcot"] += [_record(spec, model, variant, proxy.lengths(g), 1,
                                           proxy.accuracy[model] * proxy.finish_prob(g), {"gen_budget": g})
                                   for g in spec.gen_budgets]
    result = {"spec": {k: v for k, v in asdict(spec).items() if k != "proxy"}, "proxy": proxy.describe(),
              "constants": {"intensity": spec.intensity, "b200_flops": B200_FLOPS}, **records,
              "frontier": {}, "winner": {}}
    for task, recs in records.items():
        if not recs:
            continue
        costs = [r["cost"] for r in recs]
        budgets = np.geomspace(min(costs), max(costs), spec.frontier_points)
        result["frontier"][task], result["winner"][task] = {}, {}
        for family in FAMILIES:
            fam = [r for r in recs if r["family"] == family]
            if fam:
                points = pareto_frontier(fam, budgets, by="model", smooth=spec.smooth)
                result["frontier"][task][family] = [list(p) for p in points]
                result["winner"][task][family] = [w for _, w in frontier_configs(fam, budgets, by="model")]
    return result


def _number(where: str, column: str, text, kind=float):
    try:
        return kind(text.strip())
    except (ValueError, AttributeError):
        raise ValueError(f"{where}, column {column!r}: {text!r} is not {'an integer' if kind is int else 'a number'}"
                         ) from None


def _trace_row(where: str, raw: dict) -> dict:
    lens = [_number(where, "output_lens", t, int) for t in (raw["output_lens"] or "").split(";") if t.strip()]
    if not lens:
        raise ValueError(f"{where}, column 'output_lens': no lengths (';'-separated integers, one per trial)")
    row = {"problem": raw["problem"], "config": raw["config"], "model": raw["model"],
           "input_len": _number(where, "input_len", raw["input_len"], int), "output_lens": lens,
           "correct": _number(where, "correct", raw["correct"]), "wall_s": None}
    if not 0 <= row["correct"] <= 1:
        raise ValueError(f"{where}, column 'correct': {row['correct']} is not in [0, 1]")
    if (raw.get("wall_s") or "").strip():
        row["wall_s"] = _number(where, "wall_s", raw["wall_s"])
    if (raw.get("eflops") or "").strip():
        row["eflops"], row["eflops_source"] = _number(where, "eflops", raw["eflops"]), "csv"
    elif row["model"] in QWEN3:
        cost = expected_cost(QWEN3[row["model"]], len(lens), row["input_len"], lens)
        row["eflops"], row["eflops_source"] = cost.total, "analytic dense"
    else:
        raise ValueError(f"{where}, column 'model': {row['model']!r} is none of {', '.join(QWEN3)}, and the row "
                         f"has no eflops to use instead")
    return row


def load_trace_csv(path: str | Path) -> list[dict]:
    """Rows of a trace CSV: problem,config,model,input_len,output_lens,correct[,eflops][,wall_s], one per
    (problem, configuration); output_lens ';'-separated, one per trial; correct the score in [0, 1]."""
    path = Path(path)
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            raise ValueError(f"{path} is empty: expected the header {','.join(TRACE_COLUMNS)}[,eflops][,wall_s]")
        missing = [c for c in TRACE_COLUMNS if c not in reader.fieldnames]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; the header needs "
                             f"{','.join(TRACE_COLUMNS)}[,eflops][,wall_s]")
        rows = [_trace_row(f"{path} line {reader.line_num}", raw) for raw in reader]
    if not rows:
        raise ValueError(f"{path} has a header but no rows")
    return rows


def frontier_from_traces(rows: list[dict], cost: str = "eflops", budgets=None, by: str | None = None,
                         smooth: bool = False) -> list[tuple[float, float]]:
    """The frontier of load_trace_csv rows against eFLOPs or measured seconds (60 log-spaced budgets by default)."""
    if cost not in ("eflops", "wall_s"):
        raise ValueError(f"cost must be 'eflops' or 'wall_s', not {cost!r}")
    lacking = [r for r in rows if r.get(cost) is None]
    if lacking:
        raise ValueError(f"{len(lacking)} row(s) have no {cost}, e.g. problem {lacking[0]['problem']!r} config "
                         f"{lacking[0]['config']!r}")
    records = [{"problem": r["problem"], "config": r["config"], "model": r["model"], "cost": r[cost],
                "score": r["correct"]} for r in rows]
    if budgets is None:
        costs = [r["cost"] for r in records]
        if min(costs) <= 0:
            raise ValueError(f"log-spaced budgets need positive costs; the cheapest {cost} is {min(costs)}")
        budgets = np.geomspace(min(costs), max(costs), 60)
    return pareto_frontier(records, budgets, by=by, smooth=smooth)


def plot_frontiers(frontiers: dict[str, list[tuple[float, float]]], path: str | Path, xlabel: str = "cost (eFLOPs)",
                   title: str = "Accuracy against cost") -> Path:
    """One line per label of (budget, score) points, log x axis; written to `path` (.png, .svg, .pdf)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for label, points in frontiers.items():
        ax.plot([b for b, _ in points], [s for _, s in points], label=label)
    ax.set(xscale="log", xlabel=xlabel, ylabel="accuracy", title=title, ylim=(0, 1.02))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(plt, fig, path)


def plot_analytic(result: dict, path: str | Path) -> Path:
    """Best-of-N and long-CoT panels of run_analytic_sweep: each family's frontier against B200 seconds, with a dot
    and the model's size where the winning model changes."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    for ax, (task, title) in zip(axes, TASKS.items()):
        for family, points in result["frontier"].get(task, {}).items():
            xs, ys = [b / B200_FLOPS for b, _ in points], [s for _, s in points]
            line, = ax.plot(xs, ys, label=FAMILIES[family])
            winners = result["winner"][task][family]
            for i, w in enumerate(winners):
                if w is not None and (i == 0 or w != winners[i - 1]):
                    ax.plot(xs[i], ys[i], "o", ms=4, color=line.get_color())
                    ax.annotate(w.removeprefix("Qwen3-"), (xs[i], ys[i]), fontsize=7, textcoords="offset points",
                                xytext=(2, 4), color=line.get_color())
        ax.set(xscale="log", xlabel="B200 seconds (eFLOPs / 4.5e15)", ylabel="accuracy proxy", title=title,
               ylim=(0, 1.02))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Kinetics eFLOPs frontiers on an AIME24 accuracy proxy (upper bound: sparse attention assumed "
                 "lossless)", fontsize=10)
    return save_figure(plt, fig, path)


def format_kinetics_result(result: dict) -> str:
    lines = ["Kinetics eFLOPs frontiers at each budget decade (B200 s = eFLOPs / 4.5e15); scores are the accuracy "
             "proxy, sparse assumed lossless (an upper bound)"]
    for task, title in TASKS.items():
        frontier, winner = result["frontier"].get(task), result["winner"].get(task)
        if not frontier:
            continue
        seconds = np.array([b for b, _ in next(iter(frontier.values()))]) / B200_FLOPS
        decades = 10.0 ** np.arange(math.ceil(math.log10(seconds[0])), math.floor(math.log10(seconds[-1])) + 1)
        picks = dict.fromkeys([int(np.searchsorted(seconds, d * (1 + 1e-9), side="right")) - 1 for d in decades]
                              + [len(seconds) - 1])
        cols = [f for f in FAMILIES if f in frontier]
        lines.append(f"{title:<10} {'B200 s':>9} " + " ".join(f"{FAMILIES[f]:>12} {'winner':>10}" for f in cols))
        for i in picks:
            cells = " ".join(f"{frontier[f][i][1]:>12.3f} {(winner[f][i] or '-').removeprefix('Qwen3-'):>10}"
                             for f in cols)
            lines.append(f"{'':<10} {seconds[i]:>9.3g} {cells}")
    return "\n".join(lines)
