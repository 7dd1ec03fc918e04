"""Where an AFD worker's time goes: computing its halves, sending, or waiting for the other side (the bubble).

Transfer is the time inside send calls (the message copied into the shared-memory ring, or handed to gloo's sender);
the receive side's share of a transfer cannot be told apart from waiting for the peer, so it counts as waiting."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass


@dataclass
class StageTimes:
    steps: int = 0
    layers: int = 0  # layer passes, summed over steps (one per layer per step)
    compute_s: float = 0.0  # inside this worker's halves
    send_s: float = 0.0  # inside send calls
    wait_s: float = 0.0  # blocked in recv: the other side's compute plus the transfer
    moe_ep_passes: int = 0  # sharded MoE layer passes run expert-parallel / expert-sliced (FFN workers, y > 1)
    moe_sliced_passes: int = 0

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

    def count_moe_pass(self, expert_sliced: bool) -> None:
        if expert_sliced:
            self.times.moe_sliced_passes += 1
        else:
            self.times.moe_ep_passes += 1

    def step_done(self, num_layers: int) -> None:
        self.times.steps += 1
        self.times.layers += num_layers


def summarize(attention: dict, ffn: dict) -> dict:
    """Per-layer averages and each worker's bubble (the fraction of its busy time spent waiting)."""
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
    }
