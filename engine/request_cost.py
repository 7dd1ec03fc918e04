"""What a request cost the engine: FLOPs, KV bytes read and eFLOPs, counted per scheduled chunk as it runs.

For a chunk of t tokens at positions p .. p+t-1 (the tokens before p already have KV), in a model of L layers with
n_q query heads of size d:
    linear FLOPs     2 (attention + FFN weights a token passes) t  +  2 (LM head) (positions with logits)
    attention FLOPs  4 n_q d L  sum over the chunk's positions i of the keys i attends (i + 1: causal)
    KV bytes read    (KV bytes per token) x (p + t: the chunk reads every key once, its own included)
    eFLOPs           linear + attention FLOPs + I x KV bytes read,  I = 562.5 (Kinetics, arXiv 2506.05333: B200's
                     FP8 FLOP/s over its HBM bytes/s; parameter reads are left out, as Kinetics leaves them out)
Only computed chunks are charged, so prompt tokens found in the prefix cache cost nothing, and the n samples of a
request share the full blocks of their prompt when they are scheduled together (the KV cache manager finds blocks in
the step that writes them): the prompt is paid once, the last partial block once per sample. A preempted request
that recomputes pays again: the work was done. The count is the causal attention a request needs, not the padding
a kernel may compute. KV bytes per token are the cache format's stored bytes (scales included; for int4 / saq the
floor format's, though recent blocks sit in the wider window)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from afdserve.models.hf_config import TransformerConfig
from afdserve.models.param_count import active_params, attention_flops_per_key

KINETICS_INTENSITY = 562.5  # eFLOPs per byte: 4.5 PFLOP/s over 8 TB/s (B200), Kinetics' constant I


@dataclass
class RequestCost:
    linear_flops: int = 0
    attention_flops: int = 0
    kv_bytes_read: float = 0.0

    @property
    def eflops(self) -> float:
        return self.linear_flops + self.attention_flops + KINETICS_INTENSITY * self.kv_bytes_read

    def add(self, other: "RequestCost") -> None:
        self.linear_flops += other.linear_flops
        self.attention_flops += other.attention_flops
        self.kv_bytes_read += other.kv_bytes_read

    def as_dict(self) -> dict:
        return {**asdict(self), "eflops": self.eflops}


def total_cost(costs) -> RequestCost | None:
    """The sum of the given costs that are known (not None); None when none is."""
    known = [c for c in costs if c is not None]
    if not known:
        return None
    total = RequestCost()
    for cost in known:
        total.add(cost)
    return total


@dataclass(frozen=True)
class CostMeter:
    """The per-token rates of one model and KV format; `chunk_cost` prices one scheduled chunk."""
    linear_flops_per_token: int
    lm_head_flops_per_row: int
    attention_flops_per_key: int  # per query position, per key it attends, over all layers
    kv_bytes_per_token: float  # over all layers

    @classmethod
    def for_model(cls, cfg: TransformerConfig, kv_bytes_per_token: float) -> "CostMeter":
        params = active_params(cfg)
        return cls(2 * params.per_token, 2 * params.lm_head, attention_flops_per_key(cfg), kv_bytes_per_token)

    def chunk_cost(self, start: int, num_tokens: int, logits_rows: int) -> RequestCost:
        """Positions start .. start+num_tokens-1, each attending every key up to itself (no sliding window: the
        engine caps the context at a model's window, engine/llm_engine.py)."""
        end = start + num_tokens
        keys_attended = end * (end + 1) // 2 - start * (start + 1) // 2
        return RequestCost(self.linear_flops_per_token * num_tokens + self.lm_head_flops_per_row * logits_rows,
                           self.attention_flops_per_key * keys_attended, self.kv_bytes_per_token * end)
