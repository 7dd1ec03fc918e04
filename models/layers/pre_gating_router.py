"""Read-ME's pre-gating router (Cai, Ro et al., NeurIPS 2024, arXiv 2410.19123): one router for the whole network
that sees only token ids, so every token's experts are known before the backbone runs, and the same choice serves
every MoE layer.

Ours is the paper's non-autoregressive variant (a per-token MLP; the paper's default adds two small causal attention
blocks over the token history): a token's experts then depend on its id alone, so whoever knows the token (the
scheduler, at sampling or prompt arrival) can route it without router state.

    e = embed(token);  e = e + down(silu(up(norm1(e))));  logits = head(norm2(e))  [T, E]
    routing: the top_k experts by logit (ties to the lowest id), each with weight 1 (the chosen experts' outputs
    are added to the shared channels' output as they are, as Read-ME's MLP does); top_k = E: every expert.
Plain nn.Linear layers: the router is tiny and stays exact under --quantization.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from afdserve.models.layers.moe_router import Routing
from afdserve.models.layers.norm import RMSNorm


class PreGatingRouter(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int,
                 eps: float = 1e-6):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"pre-gating router: top_k must be in [1, {num_experts}], got {top_k}")
        self.num_experts, self.top_k = num_experts, top_k
        self.embed = nn.Embedding(vocab_size, hidden_size)
        self.mlp_norm = RMSNorm(hidden_size, eps)
        self.up = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.norm = RMSNorm(hidden_size, eps)
        self.head = nn.Linear(hidden_size, num_experts, bias=False)

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[T] token ids -> [T, E] fp32 expert logits."""
        x = self.embed(input_ids)
        x = x + self.down(F.silu(self.up(self.mlp_norm(x))))
        return self.head(self.norm(x)).float()

    def forward(self, input_ids: torch.Tensor) -> Routing:
        num_tokens = input_ids.shape[0]
        weights = torch.ones(num_tokens, self.top_k, dtype=torch.float32, device=input_ids.device)
        if self.top_k == self.num_experts:  # every expert: the router's choice does not matter
            ids = torch.arange(self.num_experts, device=input_ids.device).expand(num_tokens, -1).contiguous()
            return Routing(ids, weights)
        order = torch.sort(self.logits(input_ids), dim=-1, descending=True, stable=True).indices
        return Routing(order[:, :self.top_k].contiguous(), weights)
