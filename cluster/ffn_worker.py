"""FFNWorker: a Ray actor that holds the FFN halves (MLP or MoE experts) and serves one attention worker.

Per step it reads a header (how many micro-batches, how many tokens each), then for every layer and micro-batch
receives `ffn_input` (and, on MoE layers, the top-k ids and weights the attention side routed), runs the layer's
FFN half, and sends `ffn_out` back — in the same order the attention worker sends.
"""
from __future__ import annotations

import threading
from pathlib import Path

import torch

from cluster.stage_timer import StageTimer
from cluster.step_header import STOP, decode_header, empty_header
from cluster.worker_common import build_transport, load_worker_model
from engine.config import EngineConfig
from models.hf_config import TransformerConfig
from models.layers.moe_router import Routing


class FFNWorker:
    def __init__(self, config: EngineConfig, model_dir: Path, model_config: TransformerConfig, max_model_len: int,
                 rank: int, threads: int):
        torch.set_num_threads(threads)
        self.threads = threads
        self.rank = rank
        self.model = load_worker_model(config, model_dir, model_config, max_model_len)
        self.hidden_size = model_config.hidden_size
        self.transport = None
        self._thread: threading.Thread | None = None
        self.timer = StageTimer()

    def init_transport(self, kind: str, **kwargs) -> None:
        self.transport = build_transport(kind, self.rank, **kwargs)

    def start(self, attention_rank: int) -> None:
        self._thread = threading.Thread(target=self._serve, args=(attention_rank,), daemon=True)
        self._thread.start()

    def stage_times(self) -> dict:
        return self.timer.times.as_dict()

    @torch.inference_mode()
    def _serve(self, peer: int) -> None:
        torch.set_num_threads(self.threads)  # OpenMP's thread count is per calling thread: set it in this one too
        header = empty_header()
        while True:
            op, tokens = decode_header(self.transport.recv(header, peer))
            if op == STOP:
                return
            self._step(peer, tokens)

    def _step(self, peer: int, tokens_per_micro_batch: list[int]) -> None:
        dtype = self.model.embed_tokens.weight.dtype
        timer = self.timer

        def recv(shape, dtype) -> torch.Tensor:
            return timer.wait(self.transport.recv, torch.empty(shape, dtype=dtype), peer)

        for layer in self.model.layers:
            for num_tokens in tokens_per_micro_batch:
                ffn_input = recv((num_tokens, self.hidden_size), dtype)
                routing = None
                if layer.router is not None:
                    k = layer.router.top_k
                    routing = Routing(recv((num_tokens, k), torch.int64), recv((num_tokens, k), torch.float32))
                self.transport.send(timer.compute(layer.ffn_half, ffn_input, routing), peer)
        self.transport.flush()
        timer.step_done(len(self.model.layers))
