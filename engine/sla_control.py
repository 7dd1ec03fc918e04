"""TPOT SLA control: hold the step time, which every running request sees as its TPOT, under an SLO.

A step's wall time grows with the decode rows it computes and with the prompt tokens prefilled beside them.
`StepTimeModel` fits

    t = a + b * decode_rows + c * prefill_tokens

by least squares over the step shapes the engine has run (each step timed from schedule to update; a moving
average per shape), refitted after every step so it follows the host and the context lengths. `TPOTController`
turns the fit into the scheduler's limits for the next step: the most sequences whose decode step, with the
smallest prefill chunk beside it, fits the target, and the prompt tokens that fit beside the decodes running now.
Requests beyond that wait in the queue (their TTFT grows) instead of every running request slowing down: the trade
DistServe (Zhong et al., OSDI 2024) makes for goodput. The scheduler never preempts for the SLO; it
stops admitting and shrinks prefill chunks, so a batch that is over the cap drains as its requests finish.

Plain floats only: the scheduler that reads the limits holds no tensors.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

# The step time is what the engine measures; a client's TPOT also holds the output path (detokenize, stream).
# Aim below the SLO by this factor so the client's percentile, not only the engine's mean, meets it.
HEADROOM = 0.85
MIN_STEPS = 8  # steps seen before the fit is trusted; until then the batch grows by one a step
MIN_PREFILL_CHUNK = 16  # prompt tokens a step still takes under a tight SLO, so admitted prefills finish
PREFILL_BIN = 64  # prompt tokens per bin of a step shape (StepTimeModel)
SMOOTHING = 0.2  # weight of a new step in its shape's moving average: follows the context growing, damps noise
MAX_SHAPES = 512


@dataclass(frozen=True)
class StepLimits:
    """What the SLO allows the next step; None: no limit from the SLO."""
    max_seqs: int | None = None
    prefill_tokens: int | None = None


NO_LIMITS = StepLimits()


@dataclass(frozen=True)
class SLAStats:
    """The controller's state for /metrics."""
    target_s: float
    base_s: float  # a
    per_decode_s: float  # b
    per_prefill_token_s: float  # c
    max_seqs: int | None
    held_steps: int  # steps in which waiting requests stayed waiting because the SLO had no room for them


class StepTimeModel:
    """Least squares of step time on (1, decode rows, prefill tokens), every coefficient kept >= 0 (a negative slope
    would promise endless room).

    The points are not the last steps but one per step shape seen: (decode rows, prompt tokens in bins of
    PREFILL_BIN), each a moving average of its steps' times. Under the cap the batch stays at a few sizes near it;
    a window of recent steps then holds one batch size, which cannot tell a per-row cost from a fixed one (measured:
    the intercept took the whole step and the cap fell to one sequence). Shapes seen earlier keep their point, so
    the line stays anchored; the least recently seen are dropped beyond MAX_SHAPES."""

    def __init__(self):
        self.shapes: OrderedDict[tuple[int, int], list[float]] = OrderedDict()  # -> [mean prompt tokens, mean s]
        self.num_steps = 0
        self.coef = (0.0, 0.0, 0.0)

    @property
    def fitted(self) -> bool:
        return self.num_steps >= MIN_STEPS and len(self.shapes) >= 3

    def observe(self, decode_rows: int, prefill_tokens: int, seconds: float) -> None:
        self.num_steps += 1
        key = (decode_rows, 0 if prefill_tokens == 0 else 1 + prefill_tokens // PREFILL_BIN)
        point = self.shapes.get(key)
        if point is None:
            self.shapes[key] = [float(prefill_tokens), seconds]
            if len(self.shapes) > MAX_SHAPES:
                self.shapes.popitem(last=False)
        else:
            point[0] += SMOOTHING * (prefill_tokens - point[0])
            point[1] += SMOOTHING * (seconds - point[1])
            self.shapes.move_to_end(key)
        if self.fitted:
            self.coef = _nonnegative_least_squares([(d, p, t) for (d, _), (p, t) in self.shapes.items()])

    def predict(self, decode_rows: int, prefill_tokens: int) -> float:
        a, b, c = self.coef
        return a + b * decode_rows + c * prefill_tokens


def _nonnegative_least_squares(samples) -> tuple[float, float, float]:
    """Solves the normal equations on the terms still free; a term whose coefficient comes out negative is fixed at
    0 and the rest refitted (at most three rounds). A term that never varies (all decode steps carry no prefill)
    is singular: it is dropped too, which predicts no cost for it until steps show one."""
    rows = [(1.0, float(d), float(p)) for d, p, _ in samples]
    times = [t for _, _, t in samples]
    free = [0, 1, 2]
    while free:
        solution = _solve([[sum(r[i] * r[j] for r in rows) for j in free] for i in free],
                          [sum(r[i] * t for r, t in zip(rows, times)) for i in free])
        if solution is None:
            free.pop()  # singular: drop the last term (prefill, then decode) and retry
            continue
        negative = [term for term, value in zip(free, solution) if value < 0]
        if not negative:
            coef = [0.0, 0.0, 0.0]
            for term, value in zip(free, solution):
                coef[term] = value
            return coef[0], coef[1], coef[2]
        free.remove(negative[-1])
    return 0.0, 0.0, 0.0


def _solve(matrix: list[list[float]], rhs: list[float]) -> list[float] | None:
    """Gaussian elimination with partial pivoting; None when the system is (nearly) singular."""
    n = len(rhs)
    m = [row[:] + [value] for row, value in zip(matrix, rhs)]
    scale = max(abs(v) for row in matrix for v in row) or 1.0
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        if abs(m[pivot][col]) < 1e-12 * scale:
            return None
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(col + 1, n):
            factor = m[r][col] / m[col][col]
            for k in range(col, n + 1):
                m[r][k] -= factor * m[col][k]
    x = [0.0] * n
    for r in reversed(range(n)):
        x[r] = (m[r][n] - sum(m[r][k] * x[k] for k in range(r + 1, n))) / m[r][r]
    return x


class TPOTController:
    def __init__(self, tpot_slo_s: float):
        self.target_s = tpot_slo_s * HEADROOM
        self.model = StepTimeModel()
        self.held_steps = 0
        self._last_max_seqs: int | None = None

    def observe(self, decode_rows: int, prefill_tokens: int, seconds: float) -> None:
        self.model.observe(decode_rows, prefill_tokens, seconds)

    def limits(self, num_decodes: int) -> StepLimits:
        """Limits for a step whose running batch holds `num_decodes` sequences decoding."""
        if not self.model.fitted:
            # Start slow, one more sequence per step: the batch would otherwise fill before the model can cap it,
            # and the steps of a growing batch are what the fit needs to tell a per-row cost from a fixed one.
            return StepLimits(max_seqs=max(1, self.model.num_steps))
        a, b, c = self.model.coef
        room = self.target_s - a
        # The cap leaves room for the smallest prefill chunk beside a full batch, so admitting keeps the SLO too.
        max_seqs = max(1, math.floor((room - c * MIN_PREFILL_CHUNK) / b)) if b > 0 else None
        prefill = None  # with no decodes nobody's TPOT is at stake: a prefill-only step costs only TTFT
        if num_decodes and c > 0:
            prefill = max(MIN_PREFILL_CHUNK, math.floor((room - b * num_decodes) / c))
        self._last_max_seqs = max_seqs
        return StepLimits(max_seqs, prefill)

    def note_held(self) -> None:
        self.held_steps += 1

    def stats(self) -> SLAStats:
        a, b, c = self.model.coef
        return SLAStats(self.target_s, a, b, c, self._last_max_seqs, self.held_steps)
