"""Training Read-ME's pre-gating router (Cai, Ro et al., NeurIPS 2024, arXiv 2410.19123, §4.2 of its code's
`train_red.py`) against per-layer oracle labels from the dense model's own activations.

Oracle, per layer and token: rank the token's expert channels by |a| (a = the MLP's intermediate activation); a
channel scores one point for each of the 5 cuts N, 4N/5, ..., N/5 (N = one expert's width) whose top channels hold
it; an expert scores the points of its channels, and the token's label is the best-scoring expert.
Loss: for every layer, 0.75 * cross-entropy against the label (label smoothing 0.5) + 0.25 * cross-entropy against
softmax(scores), summed over the layers, all against the router's one prediction per token.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from afdserve.models.layers.pre_gating_router import PreGatingRouter

CUTS = 5


def oracle_scores(activations: torch.Tensor, experts: list[list[int]]) -> torch.Tensor:
    """activations [T, I] and each expert's channels -> each token's expert scores [T, E]."""
    expert_channels = torch.tensor(sum(experts, []))
    magnitude = activations.abs()[:, expert_channels]  # [T, E * N], expert e's channels at [e * N, (e + 1) * N)
    width = len(experts[0])
    rank = magnitude.argsort(dim=1, descending=True, stable=True).argsort(dim=1)  # 0: the token's top channel
    points = torch.zeros_like(magnitude)
    for cut in range(1, CUTS + 1):
        points += (rank < width * cut // CUTS).float()
    return points.view(len(points), len(experts), width).sum(-1)


@dataclass
class RouterTraining:
    losses: list[float]  # per step
    accuracy: float  # the router's choice against the oracle labels, over tokens and layers, after training


def train_pre_gating_router(router: PreGatingRouter, token_ids: torch.Tensor, scores: list[torch.Tensor],
                            steps: int, lr: float = 1e-2, progress=None) -> RouterTraining:
    """Trains `router` (fp32) in place on the tokens' per-layer oracle scores [T, E], full batch with Adam."""
    labels = [s.argmax(-1) for s in scores]
    targets = [s.float().softmax(-1) for s in scores]
    optimizer = torch.optim.Adam(router.parameters(), lr=lr)
    losses = []
    router.train()
    for _ in range(steps):
        logits = router.logits(token_ids)
        loss = sum(0.75 * F.cross_entropy(logits, label, label_smoothing=0.5) + 0.25 * F.cross_entropy(logits, target)
                   for label, target in zip(labels, targets))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if progress is not None:
            progress.update()
    router.eval()
    with torch.no_grad():
        choice = router.logits(token_ids).argmax(-1)
    accuracy = sum((choice == label).float().mean().item() for label in labels) / len(labels)
    return RouterTraining(losses, accuracy)
