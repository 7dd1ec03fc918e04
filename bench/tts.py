"""A measured test-time-scaling sweep on this engine: Best-of-N and majority vote on a task with checkable answers
made at run time, accuracy against the eFLOPs the engine charged (usage.afdserve_cost) and the wall time.

The task: few-shot addition of a two-digit and a one-digit number ("34 + 7 ="), within reach of a 135M model but
not always right, so sampling more helps. Each problem is asked once per N with n = N samples in one request: the
samples share the prompt's KV (prefix caching), so the cost of N samples is what the engine computed for them. The
prefix cache is emptied between N's, so no N inherits another's prompt; within one N the problems share the few-shot
block, and the problem scheduled first pays for it. Sharing is by full KV blocks: a problem's own tokens sit in the
prompt's last, partial block, which every sample computes; and eFLOPs are dominated by the decode's KV reads
(562.5 per byte), which are not shared: each sample's decode reads the prompt's KV itself (Kinetics' model reads it
once for all N, as a shared-prefix attention kernel would). Per problem and N:
    best-of-N    correct if any sample is (an oracle verifier: Kinetics' coverage, pass@N)
    majority     correct if the most frequent answer is (ties: the answer seen first)
    eFLOPs       the request's usage.afdserve_cost eflops (linear + attention FLOPs + 562.5 x KV bytes)
    wall_s       the N's batch wall time over its problems (all problems run as one batch: a served load's time)
Rows are written in bench/kinetics.py's trace CSV format, so `afdserve bench kinetics --traces` draws the frontiers.
"""
from __future__ import annotations

import csv
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from afdserve.bench.kinetics import TRACE_COLUMNS
from afdserve.engine.sampling_params import SamplingParams

SHOTS = [(12, 5), (31, 7), (24, 3), (40, 8)]


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str


@dataclass(frozen=True)
class TTSSpec:
    num_problems: int = 40
    trials: tuple[int, ...] = (1, 2, 4, 8, 16)
    temperature: float = 0.8
    max_tokens: int = 5
    seed: int = 0


def addition_problems(num: int, seed: int) -> list[Problem]:
    rng = random.Random(seed)
    shots = "".join(f"{a} + {b} = {a + b}\n" for a, b in SHOTS)
    pairs = [(rng.randint(10, 89), rng.randint(1, 9)) for _ in range(num)]
    return [Problem(shots + f"{a} + {b} =", str(a + b)) for a, b in pairs]


def first_word(text: str) -> str:
    """The answer a sample gives: its first whitespace-separated word."""
    words = text.split()
    return words[0] if words else ""


def majority(answers: list[str]) -> str:
    """The most frequent answer; among equals, the one seen first (Counter keeps insertion order)."""
    return Counter(answers).most_common(1)[0][0]


def run_tts_sweep(llm, spec: TTSSpec) -> dict:
    """`llm`: an afdserve LLM. Returns per-N accuracy and cost, and the per-(problem, config) trace rows."""
    problems = addition_problems(spec.num_problems, spec.seed)
    model = Path(str(llm.engine.config.model.model)).name
    rows, summary = [], []
    llm.generate([problems[0].prompt], SamplingParams(max_tokens=2), use_tqdm=False)  # warm-up, out of the timings
    for n in tqdm(spec.trials, desc="bench tts"):
        llm.reset_prefix_cache()
        params = SamplingParams(n=n, temperature=spec.temperature, max_tokens=spec.max_tokens, seed=spec.seed)
        start = time.perf_counter()
        outs = llm.generate([p.prompt for p in problems], params, use_tqdm=False)
        wall_per_problem = (time.perf_counter() - start) / len(problems)
        scores = {"best_of_n": [], "majority": []}
        eflops = []
        for i, (problem, out) in enumerate(zip(problems, outs)):
            answers = [first_word(c.text) for c in out.outputs]
            lens = ";".join(str(len(c.token_ids)) for c in out.outputs)
            correct = {"best_of_n": problem.answer in answers, "majority": majority(answers) == problem.answer}
            eflops.append(out.cost.eflops)
            for rule, ok in correct.items():
                scores[rule].append(ok)
                rows.append({"problem": i, "config": f"{rule} N={n}", "model": model,
                             "input_len": len(out.prompt_token_ids), "output_lens": lens, "correct": int(ok),
                             "eflops": out.cost.eflops, "wall_s": wall_per_problem})
        summary.append({"n": n, "best_of_n": sum(scores["best_of_n"]) / len(problems),
                        "majority": sum(scores["majority"]) / len(problems),
                        "eflops_per_problem": sum(eflops) / len(eflops), "wall_s_per_problem": wall_per_problem})
    return {"spec": asdict(spec), "model": model, "task": "two-digit + one-digit addition, 4-shot",
            "summary": summary, "rows": rows}


def write_trace_csv(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*TRACE_COLUMNS, "eflops", "wall_s"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def format_tts_result(result: dict) -> str:
    lines = [f"{result['model']}: {result['task']}, {result['spec']['num_problems']} problems, temperature "
             f"{result['spec']['temperature']}",
             f"{'N':>3} {'best-of-N':>10} {'majority':>9} {'eFLOPs/problem':>15} {'wall s/problem':>15}"]
    for s in result["summary"]:
        lines.append(f"{s['n']:>3} {s['best_of_n']:>10.3f} {s['majority']:>9.3f} {s['eflops_per_problem']:>15.3g} "
                     f"{s['wall_s_per_problem']:>15.3f}")
    return "\n".join(lines)
