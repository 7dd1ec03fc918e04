"""The one loop over a decoder's layers, shared by every way of running a step: the whole model in one process,
an AFD attention worker, and an AFD FFN worker.

A step's batch runs as m micro-batches (m = 1 in one process) through the layers in pipeline order, layer-major:

    for layer l, micro-batch j:   x[j] = FFN output of layer l-1 for j   (l > 0)
                                  ffn_input, routing = attn_half(l, j)
                                  hand (ffn_input, routing) to the FFN port

so while the FFN side computes micro-batch j of layer l, the attention side runs micro-batch j+1. The FFN half
runs behind a port (docs/architecture.md, seam 1): LocalFFN calls the layer's `ffn_half` in place; the AFD attention
worker's port sends the input to the FFN workers and receives their outputs (cluster/attention_worker.py). The FFN
worker walks the same `pipeline_order` from the other end of the transport (cluster/ffn_worker.py).

A model offers: `embed(input_ids, positions) -> (hidden, context)`, `layers` (each with `attn_half` and `ffn_half`),
`final_norm(hidden, residual)` and `compute_logits(hidden)` (models/llama.py).
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch


def pipeline_order(num_layers: int, num_micro_batches: int) -> Iterator[tuple[int, int]]:
    """(layer index, micro-batch index) in the order both sides of the A<->F pipeline process them."""
    for index in range(num_layers):
        for j in range(num_micro_batches):
            yield index, j


class FFNPort(Protocol):
    """Where a layer's FFN half runs. Results come back in the order inputs were submitted."""

    def submit(self, layer: Any, ffn_input: torch.Tensor, routing: Any) -> None: ...

    def result(self, like: torch.Tensor) -> torch.Tensor:
        """The next FFN output, shaped and typed like `like` (the residual stream)."""


class LocalFFN:
    """The FFN half in this process, at once."""

    def __init__(self):
        self._outputs: deque[torch.Tensor] = deque()

    def submit(self, layer: Any, ffn_input: torch.Tensor, routing: Any) -> None:
        self._outputs.append(layer.ffn_half(ffn_input, routing))

    def result(self, like: torch.Tensor) -> torch.Tensor:
        return self._outputs.popleft()


def _call(fn: Callable, *args):
    return fn(*args)


def run_layers(model: Any, batches: list[Any], kv_caches: list, ffn: FFNPort,
               compute: Callable = _call) -> list[torch.Tensor]:
    """The final hidden states of each micro-batch. `batches[j]` has `input_ids`, `positions` and `meta` (its
    attention metadata); `compute(fn, *args)` runs each attention half (a stage timer wraps it on AFD workers)."""
    hidden, context = [], []
    for batch in batches:
        h, c = model.embed(batch.input_ids, batch.positions)
        hidden.append(h)
        context.append(c)
    residual: list[torch.Tensor | None] = [None] * len(batches)
    for index, j in pipeline_order(len(model.layers), len(batches)):
        layer = model.layers[index]
        if index > 0:
            hidden[j] = ffn.result(residual[j])  # the FFN output of layer index - 1
        ffn_input, residual[j], routing = compute(layer.attn_half, hidden[j], residual[j], context[j],
                                                  batches[j].meta, kv_caches[index])
        ffn.submit(layer, ffn_input, routing)
    hidden = [ffn.result(r) for r in residual]
    return [model.final_norm(h, r) for h, r in zip(hidden, residual)]
