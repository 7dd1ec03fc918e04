"""AttentionWorker: an actor (Ray, or a local process: cluster/actors.py) that owns the KV cache and runs everything
but the FFN halves.

It is a ModelRunner whose forward pass is the one layer loop (models/layer_loop.run_layers) with a remote FFN port:
each layer's FFN input goes to the FFN workers. The step's batch splits into m micro-batches kept in flight, so the
FFN workers compute micro-batch j while this worker runs attention for j+1:

    layer l:  recv F(l-1, j) -> attn_half(l, j) -> send A->F(l, j)      for j = 0..m-1

With y > 1 FFN workers every one gets the same input and returns a partial sum (its experts, its slice of the MLP);
this worker adds the partials up in fp32 (Step-3's "reduction module" on the attention side).
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from afdserve.cluster.micro_batch import split_micro_batches
from afdserve.cluster.stage_timer import StageTimer
from afdserve.cluster.step_header import STEP, STOP, encode_header
from afdserve.cluster.wire import ActivationWire
from afdserve.cluster.worker_common import build_transport, free_port, node_ip
from afdserve.engine.config import EngineConfig
from afdserve.engine.model_runner import FlatBatch, ModelRunner, ModelRunnerOutput
from afdserve.engine.scheduler import SchedulerOutput
from afdserve.models.hf_config import TransformerConfig
from afdserve.models.layer_loop import run_layers
from afdserve.models.loader import weight_bytes


class AFDModelRunner(ModelRunner):
    model_role = "attention"  # embeddings, attention, norms, routers, LM head: the FFN workers hold the rest
    def __init__(self, config: EngineConfig, model_dir: Path, model_config: TransformerConfig, num_kv_blocks: int,
                 max_model_len: int, rank: int):
        super().__init__(config, model_dir, model_config, num_kv_blocks, max_model_len, rank)
        self.micro_batches = config.parallel.micro_batches
        self.wire = ActivationWire(config.parallel.afd_wire)
        self.transport = None
        self.ffn_ranks: list[int] = []
        self.timer = StageTimer()

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        self.requests.update(sched)
        kv_plan = self.plan_kv_moves(sched)  # one per step: every micro-batch reads the same view
        groups = split_micro_batches(sched.scheduled, self.micro_batches)
        batches = [self.build_batch([sched.scheduled[i] for i in g], kv_plan) for g in groups]
        hiddens = self.pipelined_forward(batches)
        out = ModelRunnerOutput.empty(len(sched.scheduled))
        for group, batch, hidden in zip(groups, batches, hiddens):
            out.fill_from(self.sample([sched.scheduled[i] for i in group], batch, self.compute_logits(batch, hidden)),
                          group)
        return out

    def pipelined_forward(self, batches: list[FlatBatch]) -> list[torch.Tensor]:
        """Runs the step (possibly no batches: a data-parallel rank with nothing scheduled still tells the FFN
        workers so, since they serve every rank each step)."""
        header = encode_header(STEP, [len(b.input_ids) for b in batches])
        for ffn in self.ffn_ranks:
            self.timer.send(self.transport.send, header, ffn)
        port = RemoteFFN(self.transport, self.ffn_ranks, self.timer, self.wire)
        hidden = run_layers(self.model, batches, self.kv_caches, port, compute=self.timer.compute)
        self.transport.flush()
        if batches:
            self.timer.step_done(len(self.model.layers))
        return hidden


class RemoteFFN:
    """The FFN port of an attention worker (models/layer_loop.py): each FFN input, with the routing of an MoE layer,
    goes to every FFN worker; a result is the one worker's output, or the fp32 sum of every worker's partial."""

    def __init__(self, transport, ffn_ranks: list[int], timer: StageTimer, wire: ActivationWire):
        self.transport, self.ffn_ranks, self.timer, self.wire = transport, ffn_ranks, timer, wire

    def submit(self, layer, ffn_input: torch.Tensor, routing) -> None:
        send = functools.partial(self.timer.send, self.transport.send)
        messages = self.wire.encode(ffn_input)
        for ffn in self.ffn_ranks:
            for message in messages:
                send(message, ffn)
            if routing is not None:
                send(routing.topk_ids, ffn)
                send(routing.topk_weights, ffn)

    def result(self, like: torch.Tensor) -> torch.Tensor:
        recv = self.transport.recv
        if len(self.ffn_ranks) == 1:
            return self.timer.wait(recv, torch.empty_like(like), self.ffn_ranks[0])
        total = torch.zeros(like.shape, dtype=torch.float32, device=like.device)
        for ffn in self.ffn_ranks:
            total += self.timer.wait(recv, torch.empty_like(like), ffn)
        return total.to(like.dtype)


class AttentionWorker:
    def __init__(self, config: EngineConfig, model_dir: Path, model_config: TransformerConfig, num_kv_blocks: int,
                 max_model_len: int, rank: int, threads: int):
        torch.set_num_threads(threads)
        self.threads = threads
        self.rank = rank
        self.runner = AFDModelRunner(config, model_dir, model_config, num_kv_blocks, max_model_len, rank)

    def node_ip(self) -> str:
        return node_ip()

    def node_id(self) -> str:
        import ray
        return ray.get_runtime_context().get_node_id()

    def free_port(self) -> int:
        return free_port()

    def init_transport(self, kind: str, ffn_ranks: list[int], **kwargs) -> None:
        self.runner.transport = build_transport(kind, self.rank, self.runner.device, **kwargs)
        self.runner.ffn_ranks = ffn_ranks

    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        torch.set_num_threads(self.threads)  # per calling thread (OpenMP); Ray may run methods off the init thread
        return self.runner.execute(sched)

    def stage_times(self) -> dict:
        return self.runner.timer.times.as_dict()

    def weight_bytes(self) -> int:
        return weight_bytes(self.runner.model)

    def stop_ffn(self) -> None:
        for ffn in self.runner.ffn_ranks:
            self.runner.transport.send(encode_header(STOP, []), ffn)
        self.runner.transport.flush()
