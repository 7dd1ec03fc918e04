"""MoE routers: router logits [T, E] -> Routing(topk_ids [T, k] int64, topk_weights [T, k] fp32).

Routing runs on the attention side of the layer split (docs/architecture.md, seam 1): the decoder layer's `attn_half`
returns a `Routing` next to `ffn_input`, and the FFN half (in-process or in an FFN worker) only consumes it.

Semantics, as in the families' reference implementations (DeepSeek-V2 arXiv:2405.04434, DeepSeek-V3
arXiv:2412.19437; scores and weights in fp32):

    scores    = softmax(logits) | sigmoid(logits)                     RouterConfig.scoring
    choice    = scores (+ e_score_correction_bias, noaux_tc only: the bias steers selection, never the weights)
    groups    greedy:               none
              group_limited_greedy: group score = max of the group's choice scores   (DeepSeek-V2)
              noaux_tc:             group score = sum of the group's top-2 choices   (DeepSeek-V3)
              keep the `topk_group` best of `n_group` groups; the others' experts cannot be chosen
    topk_ids  = top-k of choice;  topk_weights = scores at topk_ids
    if renormalize: topk_weights /= sum(topk_weights)
    topk_weights *= routed_scaling_factor

The family rules (which of renormalize / scale apply) are resolved when the config is parsed (models/moe_config.py):
Mixtral always renormalizes; Qwen2/3-MoE iff `norm_topk_prob`; DeepSeek-V2 either renormalizes (norm_topk_prob and
k > 1) or scales, never both; DeepSeek-V3 renormalizes iff `norm_topk_prob` and always scales.

Ties: equal choice scores are resolved deterministically, **lowest expert id first** (and lowest group id first among
equal group scores). torch.topk gives no such guarantee, so selection is a stable descending sort. The k ids of a
token come out in descending choice-score order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from afdserve.models.layers.linear import Linear

SCORING_FUNCS = ("softmax", "sigmoid")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")


class Routing(NamedTuple):
    """What the attention half hands the FFN half of an MoE layer (the A->F message's routing part)."""
    topk_ids: torch.Tensor  # [T, k] int64 expert ids
    topk_weights: torch.Tensor  # [T, k] fp32 combine weights


@dataclass(frozen=True)
class RouterConfig:
    num_experts: int
    top_k: int
    scoring: str = "softmax"
    topk_method: str = "greedy"
    n_group: int = 1
    topk_group: int = 1
    renormalize: bool = False
    routed_scaling_factor: float = 1.0

    def __post_init__(self):
        if self.scoring not in SCORING_FUNCS:
            raise ValueError(f"unsupported scoring function {self.scoring!r}; supported: {SCORING_FUNCS}")
        if self.topk_method not in TOPK_METHODS:
            raise ValueError(f"unsupported topk_method {self.topk_method!r}; supported: {TOPK_METHODS}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k={self.top_k} must be in [1, num_experts={self.num_experts}]")
        if self.grouped:
            if self.n_group < 1 or self.num_experts % self.n_group:
                raise ValueError(f"n_group={self.n_group} must divide num_experts={self.num_experts}")
            if not 1 <= self.topk_group <= self.n_group:
                raise ValueError(f"topk_group={self.topk_group} must be in [1, n_group={self.n_group}]")
            if self.top_k > self.topk_group * self.group_size:
                raise ValueError(f"top_k={self.top_k} exceeds the {self.topk_group * self.group_size} experts "
                                 f"of the {self.topk_group} kept groups")
            if self.topk_method == "noaux_tc" and self.group_size < 2:
                raise ValueError("noaux_tc scores a group by its top-2 experts: groups need at least 2 experts")

    @property
    def grouped(self) -> bool:
        return self.topk_method != "greedy"

    @property
    def group_size(self) -> int:
        return self.num_experts // self.n_group

    @property
    def uses_correction_bias(self) -> bool:
        return self.topk_method == "noaux_tc"


def stable_topk_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries of each row, ties to the lowest index, in descending order."""
    return torch.sort(x, dim=-1, descending=True, stable=True).indices[..., :k]


def select_experts(logits: torch.Tensor, cfg: RouterConfig,
                   correction_bias: torch.Tensor | None = None) -> Routing:
    """Routes each of the T tokens to cfg.top_k experts (see the module docstring for the exact semantics)."""
    logits = logits.float()
    scores = logits.softmax(dim=-1) if cfg.scoring == "softmax" else logits.sigmoid()
    choice = scores
    if cfg.uses_correction_bias:
        if correction_bias is None:
            raise ValueError("noaux_tc routing needs e_score_correction_bias")
        choice = scores + correction_bias.float()
    if cfg.grouped:
        choice = _mask_to_best_groups(choice, cfg)
    topk_ids = stable_topk_indices(choice, cfg.top_k)
    topk_weights = scores.gather(-1, topk_ids)
    if cfg.renormalize:
        topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
    if cfg.routed_scaling_factor != 1.0:
        topk_weights = topk_weights * cfg.routed_scaling_factor
    return Routing(topk_ids, topk_weights)


def _mask_to_best_groups(choice: torch.Tensor, cfg: RouterConfig) -> torch.Tensor:
    """choice with the experts outside each token's `topk_group` best groups set to -inf."""
    grouped = choice.view(-1, cfg.n_group, cfg.group_size)
    if cfg.topk_method == "noaux_tc":
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
    else:
        group_scores = grouped.amax(dim=-1)
    keep_groups = stable_topk_indices(group_scores, cfg.topk_group)
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep_groups, True)
    return grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view_as(choice)


class Router(nn.Module):
    """The gate linear [E, H] (no bias) plus, for noaux_tc, the per-expert selection bias.

    fp32_logits: the logits are x.float() @ gate.float() (DeepSeek-V2/V3, whose gate transformers keeps in fp32; the
    model then lists the gate among its `fp32_params`); otherwise the gate runs in the model dtype (Mixtral, Qwen).
    """

    def __init__(self, hidden_size: int, cfg: RouterConfig, fp32_logits: bool = False):
        super().__init__()
        self.cfg = cfg
        self.fp32_logits = fp32_logits
        self.gate = Linear(hidden_size, cfg.num_experts, bias=False)
        # Never quantized (as in vLLM): a rounded gate flips near-tie expert choices, and the fp32 path reads the
        # gate as a plain weight, which codes would not be.
        self.gate.quantizable = False
        self.e_score_correction_bias = (nn.Parameter(torch.zeros(cfg.num_experts), requires_grad=False)
                                        if cfg.uses_correction_bias else None)

    @property
    def top_k(self) -> int:
        return self.cfg.top_k

    @property
    def num_experts(self) -> int:
        return self.cfg.num_experts

    def forward(self, x: torch.Tensor) -> Routing:
        logits = F.linear(x.float(), self.gate.weight.float()) if self.fp32_logits else self.gate(x)
        return select_experts(logits, self.cfg, self.e_score_correction_bias)
