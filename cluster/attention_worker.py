"""AttentionWorker: a Ray actor that owns the KV cache and runs everything but the FFN halves.

It is a ModelRunner whose forward pass sends each layer's FFN input to the FFN worker. The step's batch splits into
m micro-batches kept in flight, so the FFN worker computes micro-batch j while this worker runs attention for j+1:

    layer l:  recv F(l-1, j) -> attn_half(l, j) -> send A->F(l, j)      for j = 0..m-1
"""
from __future__ import annotations

from pathlib import Path

import torch

from cluster.micro_batch import split_micro_batches
from cluster.stage_timer import StageTimer
from cluster.step_header import STEP, STOP, encode_header
from cluster.worker_common import build_transport
from engine.config import EngineConfig
from engine.model_runner import FlatBatch, ModelRunner, ModelRunnerOutput
from engine.scheduler import SchedulerOutput
from models.hf_config import TransformerConfig


class AFDModelRunner(ModelRunner):
    def __init__(self, config: EngineConfig, model_dir: Path, model_config: TransformerConfig, num_kv_blocks: int,
                 max_model_len: int):
        super().__init__(config, model_dir, model_config, num_kv_blocks, max_model_len)
        self.micro_batches = config.parallel.micro_batches
        self.transport = None
        self.ffn_rank: int | None = None
        self.timer = StageTimer()

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        self.forget(sched.finished_request_ids)
        groups = split_micro_batches(sched.scheduled, self.micro_batches)
        batches = [self.build_batch([sched.scheduled[i] for i in g]) for g in groups]
        hiddens = self.pipelined_forward(batches)
        out = ModelRunnerOutput([None] * len(sched.scheduled), [None] * len(sched.scheduled))
        for group, batch, hidden in zip(groups, batches, hiddens):
            part = self.sample([sched.scheduled[i] for i in group], batch, self.compute_logits(batch, hidden))
            for local, i in enumerate(group):
                out.sampled[i], out.logprobs[i] = part.sampled[local], part.logprobs[local]
            out.prompt_logprobs.update(part.prompt_logprobs)
        return out

    def pipelined_forward(self, batches: list[FlatBatch]) -> list[torch.Tensor]:
        model, ffn, send, timer = self.model, self.ffn_rank, self.transport.send, self.timer

        def recv(out: torch.Tensor, peer: int) -> torch.Tensor:
            return timer.wait(self.transport.recv, out, peer)

        send(encode_header(STEP, [len(b.input_ids) for b in batches]), ffn)
        hidden = [model.embed_tokens(b.input_ids) for b in batches]
        residual: list[torch.Tensor | None] = [None] * len(batches)
        rope = [model.rotary.tables(b.positions, hidden[0].dtype) for b in batches]
        for index, layer in enumerate(model.layers):
            for j, batch in enumerate(batches):
                if index > 0:
                    hidden[j] = recv(torch.empty_like(residual[j]), ffn)  # F's output for layer index - 1
                ffn_input, residual[j], routing = timer.compute(layer.attn_half, hidden[j], residual[j], rope[j],
                                                                batch.meta, self.kv_caches[index])
                send(ffn_input, ffn)
                if routing is not None:
                    send(routing.topk_ids, ffn)
                    send(routing.topk_weights, ffn)
        hidden = [recv(torch.empty_like(r), ffn) for r in residual]
        self.transport.flush()
        timer.step_done(len(model.layers))
        return [model.norm(h, r)[0] for h, r in zip(hidden, residual)]


class AttentionWorker:
    def __init__(self, config: EngineConfig, model_dir: Path, model_config: TransformerConfig, num_kv_blocks: int,
                 max_model_len: int, rank: int, threads: int):
        torch.set_num_threads(threads)
        self.threads = threads
        self.rank = rank
        self.runner = AFDModelRunner(config, model_dir, model_config, num_kv_blocks, max_model_len)

    def node_ip(self) -> str:
        import ray
        return ray.util.get_node_ip_address()

    def free_port(self) -> int:
        import socket
        with socket.socket() as s:
            s.bind(("", 0))
            return s.getsockname()[1]

    def init_transport(self, kind: str, ffn_rank: int, **kwargs) -> None:
        self.runner.transport = build_transport(kind, self.rank, **kwargs)
        self.runner.ffn_rank = ffn_rank

    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        torch.set_num_threads(self.threads)  # per calling thread (OpenMP); Ray may run methods off the init thread
        return self.runner.execute(sched)

    def stage_times(self) -> dict:
        return self.runner.timer.times.as_dict()

    def stop_ffn(self) -> None:
        self.runner.transport.send(encode_header(STOP, []), self.runner.ffn_rank)
        self.runner.transport.flush()
