"""The micro-batch pipeline overlaps: with an FFN side as slow as the attention side, the attention side's wait (the
bubble the AFD workers report) falls as the step is split into more micro-batches.

The layer loop (models/layer_loop.run_layers) runs against an FFN port whose FFN halves run on another thread, as on
an FFN worker, and both halves take a time proportional to their rows (sleeps, so the result does not depend on
the cores free). The wait is measured by the AFD workers' own StageTimer. Expected, from the pipeline's schedule
with equal halves of F seconds per layer over L layers: m = 1 waits about L * F (every FFN half in full); m >= 2
waits about F / m (only the last micro-batch's FFN half of the last layer is not hidden behind attention)."""
import queue
import threading
import time
from types import SimpleNamespace

import torch

from afdserve.cluster.stage_timer import StageTimer
from afdserve.models.layer_loop import run_layers

LAYERS = 4
ROWS = 12
HALF_S = 0.03  # per layer, for all ROWS rows, each side


def _sleep_for(rows: int) -> None:
    time.sleep(HALF_S * rows / ROWS)


class SlowLayer:
    def attn_half(self, hidden, residual, rope, meta, kv_cache):
        _sleep_for(hidden.shape[0])
        return hidden, hidden if residual is None else residual, None

    def ffn_half(self, ffn_input, routing):
        _sleep_for(ffn_input.shape[0])
        return ffn_input + 1


class SlowModel:
    layers = [SlowLayer() for _ in range(LAYERS)]

    def embed(self, input_ids, positions):
        return input_ids.float()[:, None], None

    def final_norm(self, hidden, residual):
        return hidden


class ThreadFFN:
    """An FFN port whose halves run in submission order on their own thread, like an FFN worker across a transport;
    `result` blocks in the timer's wait, as RemoteFFN does."""

    def __init__(self, timer: StageTimer):
        self.timer = timer
        self.inputs: queue.Queue = queue.Queue()
        self.outputs: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while (item := self.inputs.get()) is not None:
            layer, ffn_input, routing = item
            self.outputs.put(layer.ffn_half(ffn_input, routing))

    def submit(self, layer, ffn_input, routing):
        self.inputs.put((layer, ffn_input, routing))

    def result(self, like):
        return self.timer.wait(self.outputs.get, True, 10)

    def close(self):
        self.inputs.put(None)
        self.thread.join()


def _attention_wait_s(micro_batches: int) -> tuple[float, list[torch.Tensor]]:
    timer = StageTimer()
    ffn = ThreadFFN(timer)
    ids = torch.arange(ROWS)
    batches = [SimpleNamespace(input_ids=part, positions=part, meta=None) for part in ids.chunk(micro_batches)]
    try:
        hidden = run_layers(SlowModel(), batches, [None] * LAYERS, ffn, compute=timer.compute)
    finally:
        ffn.close()
    return timer.times.wait_s, hidden


def test_attention_side_waits_less_as_micro_batches_grow():
    waits = {}
    for m in (1, 2, 4):
        waits[m], hidden = _attention_wait_s(m)
        # Every micro-batch went through every layer's FFN half once, in order.
        assert torch.equal(torch.cat(hidden).squeeze(1), torch.arange(ROWS).float() + LAYERS)
    # Expected ~0.12 s, ~0.015 s and ~0.008 s (module docstring).
    assert waits[1] > 0.8 * LAYERS * HALF_S, waits
    assert waits[2] < 0.4 * waits[1], waits
    assert waits[4] < waits[2], waits
