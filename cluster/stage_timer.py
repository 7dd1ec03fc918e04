"""Where an AFD worker's time goes: computing its halves, sending, or waiting for the other side (the bubble).

Transfer is the time inside send calls (the message copied into the shared-memory ring, or handed to gloo's sender);
the receive side's share of a transfer cannot be told apart from waiting for the peer, so it counts as waiting."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field


@dataclass
class StageTimes:
    steps: int = 0
    layers: int = 0  # layer passes, summed over steps (one per layer per step)
    compute_s: float = 0.0  # inside this worker's halves
    send_s: float = 0.0  # inside send calls
    wait_s: float = 0.0  # blocked in recv: the other side's compute plus the transfer
    moe_ep_passes: int = 0  # sharded MoE layer passes run expert-parallel / expert-sliced (FFN workers, y > 1)
    moe_sliced_passes: int = 0
    moe_ep_s: float = 0.0  # time in those passes, by mode (an expert-parallel pass includes its weight gather)
    moe_sliced_s: float = 0.0
    moe_gathered_bytes: int = 0  # expert weight bytes received from the peers for expert-parallel passes
    expert_cache: dict | None = None  # FFN workers with --expert-cache-size: ExpertCacheTotals as a dict
    # FFN workers: per MoE layer (its index, as a string key), the token rows routed to each expert so far. Every
    # FFN worker receives the whole routing, so each holds the same counts.
    expert_tokens: dict[str, list[int]] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


class StageTimer:
    def __init__(self):
        self.times = StageTimes()
        self._clock = time.perf_counter

    def compute(self, fn, *args):
        start = self._clock()
        out = fn(*args)
        self.times.compute_s += self._clock() - start
        return out

    def send(self, fn, *args):
        start = self._clock()
        out = fn(*args)
        self.times.send_s += self._clock() - start
        return out

    def wait(self, fn, *args):
        start = self._clock()
        out = fn(*args)
        self.times.wait_s += self._clock() - start
        return out

    def moe_pass(self, expert_sliced: bool, fn, *args):
        """A sharded MoE layer's pass: compute time, also counted by the mode it ran in."""
        start = self._clock()
        out = self.compute(fn, *args)
        seconds = self._clock() - start
        if expert_sliced:
            self.times.moe_sliced_passes += 1
            self.times.moe_sliced_s += seconds
        else:
            self.times.moe_ep_passes += 1
            self.times.moe_ep_s += seconds
        return out

    def count_expert_tokens(self, layer: int, topk_ids, num_experts: int) -> None:
        counts = topk_ids.reshape(-1).bincount(minlength=num_experts).tolist()
        total = self.times.expert_tokens.setdefault(str(layer), [0] * num_experts)
        for expert, count in enumerate(counts):
            total[expert] += count

    def step_done(self, num_layers: int) -> None:
        self.times.steps += 1
        self.times.layers += num_layers


def summarize(attention: dict, ffn: dict, workers: dict[str, list[dict]] | None = None) -> dict:
    """Per-layer averages and the bubble (the fraction of busy time spent waiting) of attention worker 0 and FFN
    worker 0; with `workers` (role -> every worker's times), the same per worker under "per_worker"."""
    def per_layer_ms(t: dict, key: str) -> float:
        return 1000 * t[key] / max(t["layers"], 1)

    def bubble(t: dict) -> float:
        total = t["compute_s"] + t["send_s"] + t["wait_s"]
        return t["wait_s"] / total if total else 0.0

    return {
        "steps": attention["steps"],
        "attention_ms_per_layer": per_layer_ms(attention, "compute_s"),
        "ffn_ms_per_layer": per_layer_ms(ffn, "compute_s"),
        "transfer_ms_per_layer": per_layer_ms(attention, "send_s") + per_layer_ms(ffn, "send_s"),
        "attention_wait_ms_per_layer": per_layer_ms(attention, "wait_s"),
        "ffn_wait_ms_per_layer": per_layer_ms(ffn, "wait_s"),
        "attention_bubble": bubble(attention),
        "ffn_bubble": bubble(ffn),
        "moe_ep_passes": ffn["moe_ep_passes"],
        "moe_sliced_passes": ffn["moe_sliced_passes"],
        "moe_ep_s": ffn["moe_ep_s"],
        "moe_sliced_s": ffn["moe_sliced_s"],
        "moe_gathered_bytes": ffn["moe_gathered_bytes"],
        "expert_cache": ffn.get("expert_cache"),
        "expert_tokens": ffn.get("expert_tokens", {}),
        "per_worker": [{"role": role, "rank": rank, "compute_ms_per_layer": per_layer_ms(t, "compute_s"),
                        "wait_ms_per_layer": per_layer_ms(t, "wait_s"), "bubble": bubble(t)}
                       for role, times in (workers or {}).items() for rank, t in enumerate(times)],
    }
