"""`afdserve readme-refactor`: a dense Llama-family checkpoint into a Read-ME MoE (models/readme.py; Cai, Ro et al.,
NeurIPS 2024, arXiv 2410.19123, the expert extraction of its code, adapted).

Per decoder layer, on calibration text:
  1. record the MLP's intermediate activations a = silu(gate(x)) * up(x) (the input of down_proj), [T, I];
  2. the shared channels: the `shared_fraction` of channels with the largest mean |a| (Read-ME keeps as shared the
     channels every calibration domain ranks in its top half; we have one text, so we rank it once);
  3. the experts: the other channels cut into E equal groups of channels that fire together, by a balanced k-means
     on each channel's |a| over the calibration tokens (unit-normalized): each round, channels go greedily, most
     similar first, to the nearest centroid with room left; centroids are the groups' means. Channels that do not
     divide by E join the shared ones.
Groups are disjoint, so with every expert on the refactored MLP is the dense one, channel for channel.

The pre-gating router starts with the first `router_hidden_size` columns of the model's embedding (as Read-ME's
code initializes it) and is trained on the calibration tokens against oracle labels from the same activations
(models/readme_router.py).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from afdserve.kernels.attention import AttentionMetadata, PrefillSeq, kv_cache_shape
from afdserve.models.hf_config import load_transformer_config
from afdserve.models.loader import iter_safetensors, load_model
from afdserve.models.layers.pre_gating_router import PreGatingRouter
from afdserve.models.readme import CHANNELS_FILE, READ_ME_ARCHITECTURE
from afdserve.models.readme_router import oracle_scores, train_pre_gating_router

DENSE_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")  # the plain Llama variant Read-ME models are built on


@dataclass(frozen=True)
class RefactorSpec:
    num_experts: int = 8
    shared_fraction: float = 0.25  # of each layer's MLP channels, always on
    # Experts per token in the written config; None: every expert, which is the dense model (the safe default: top-1
    # and top-2 are far from dense without fine-tuning the backbone, bench/results/README.md).
    top_k: int | None = None
    calibration_tokens: int = 2048
    router_hidden_size: int = 64
    router_intermediate_size: int = 64
    kmeans_rounds: int = 10
    router_steps: int = 300  # full-batch Adam steps on the calibration tokens (0: the router stays untrained)
    seed: int = 0

    def __post_init__(self):
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
        if not 0 <= self.shared_fraction < 1:
            raise ValueError(f"shared_fraction must be in [0, 1), got {self.shared_fraction}")
        if self.top_k is not None and not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in [1, num_experts = {self.num_experts}], got {self.top_k}")

    @property
    def experts_per_token(self) -> int:
        return self.num_experts if self.top_k is None else self.top_k


@dataclass(frozen=True)
class ChannelSplit:
    """One layer's MLP channels: the shared ones and each expert's (ascending channel ids)."""
    shared: list[int]
    experts: list[list[int]]


def mlp_activations(model, token_ids: list[int]) -> list[torch.Tensor]:
    """Per layer, the dense MLP's intermediate activations over `token_ids` as one sequence: [T, I] fp32."""
    n = len(token_ids)
    cfg = model.config
    captured: list[torch.Tensor] = [None] * len(model.layers)

    def keep(index):
        return lambda module, inputs: captured.__setitem__(index, inputs[0].float())

    hooks = [layer.mlp.down_proj.register_forward_pre_hook(keep(i)) for i, layer in enumerate(model.layers)]
    # One sequence in one KV block of n slots, prefilled in one chunk.
    meta = AttentionMetadata(slot_mapping=torch.arange(n), block_size=n, num_decodes=0,
                             decode_block_tables=torch.zeros(0, 0, dtype=torch.long),
                             decode_mask_bias=torch.zeros(0, 1, 0), prefills=[PrefillSeq(0, n, n, torch.tensor([0]))])
    dtype = next(model.parameters()).dtype
    kv_caches = [torch.zeros(kv_cache_shape(1, n, cfg.num_kv_heads, cfg.head_dim), dtype=dtype)
                 for _ in model.layers]
    try:
        with torch.inference_mode():
            model(torch.tensor(token_ids), torch.arange(n), meta, kv_caches)
    finally:
        for hook in hooks:
            hook.remove()
    return captured


def split_channels(activations: torch.Tensor, num_experts: int, shared_fraction: float, rounds: int = 10,
                   seed: int = 0) -> ChannelSplit:
    """activations [T, I] -> the shared channels and E equal, disjoint expert groups (module docstring)."""
    magnitude = activations.abs()
    channels = magnitude.shape[1]
    importance = magnitude.mean(0)
    per_expert = int(channels * (1 - shared_fraction)) // num_experts
    if per_expert < 1:
        raise ValueError(f"{channels} channels leave no channel per expert for {num_experts} experts with "
                         f"shared_fraction {shared_fraction}")
    order = torch.sort(importance, descending=True, stable=True).indices
    num_shared = channels - per_expert * num_experts
    shared, rest = order[:num_shared], order[num_shared:]
    features = torch.nn.functional.normalize(magnitude[:, rest].T, dim=1)  # [channels left, T]
    generator = torch.Generator().manual_seed(seed)
    centroids = features[torch.randperm(len(rest), generator=generator)[:num_experts]]
    for _ in range(max(rounds, 1)):
        group = _balanced_assignment(features @ centroids.T, per_expert)
        centroids = torch.stack([torch.nn.functional.normalize(features[group == e].mean(0), dim=0)
                                 for e in range(num_experts)])
    return ChannelSplit(sorted(shared.tolist()), [sorted(rest[group == e].tolist()) for e in range(num_experts)])


def _balanced_assignment(similarity: torch.Tensor, capacity: int) -> torch.Tensor:
    """similarity [N, E] (N = E * capacity) -> each row's group: rows placed most-similar-first into their most
    similar group that still has room."""
    num_rows, num_groups = similarity.shape
    room = [capacity] * num_groups
    group = torch.full((num_rows,), -1, dtype=torch.long)
    preference = torch.sort(similarity, dim=1, descending=True, stable=True).indices.tolist()
    for row in torch.sort(similarity.max(1).values, descending=True, stable=True).indices.tolist():
        for g in preference[row]:
            if room[g]:
                room[g] -= 1
                group[row] = g
                break
    return group


def refactor_to_readme(model_dir: Path, out_dir: Path, token_ids: list[int], spec: RefactorSpec) -> Path:
    """Writes the Read-ME checkpoint of the dense model in `model_dir` to `out_dir`, its channels split on the
    activations of `token_ids` (calibration text); returns out_dir."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    cfg = load_transformer_config(model_dir)
    if cfg.architecture not in DENSE_ARCHITECTURES:
        raise ValueError(f"readme-refactor takes a dense {' or '.join(DENSE_ARCHITECTURES)}, got "
                         f"{cfg.architecture!r}")
    token_ids = token_ids[:spec.calibration_tokens]
    if len(token_ids) < 2:
        raise ValueError("readme-refactor needs calibration text of at least 2 tokens")
    model = load_model(model_dir, cfg, torch.float32, len(token_ids))
    activations = mlp_activations(model, token_ids)
    router = _new_router(model.embed_tokens.weight.detach(), spec)
    del model
    splits = [split_channels(a, spec.num_experts, spec.shared_fraction, spec.kmeans_rounds, spec.seed + i)
              for i, a in enumerate(tqdm(activations, desc="readme-refactor: splitting layers", leave=False))]
    scores = [oracle_scores(a, split.experts) for a, split in zip(activations, splits)]
    del activations
    with tqdm(total=spec.router_steps, desc="readme-refactor: training the router", leave=False) as progress:
        training = train_pre_gating_router(router, torch.tensor(token_ids), scores, spec.router_steps,
                                           progress=progress)

    out_dir.mkdir(parents=True, exist_ok=True)
    for path in model_dir.iterdir():  # tokenizer, chat template, generation config
        if path.is_file() and path.suffix != ".safetensors" and path.name not in ("config.json",
                                                                                 "model.safetensors.index.json"):
            shutil.copy(path, out_dir / path.name)
    tensors = _readme_tensors(iter_safetensors(model_dir), splits)
    dtype = next(iter(tensors.values())).dtype  # the checkpoint's
    tensors.update({f"model.pre_gating_router.{k}": v.to(dtype).contiguous() for k, v in router.state_dict().items()})
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    raw = dict(cfg.raw)
    raw.update({
        "architectures": [READ_ME_ARCHITECTURE], "model_type": "readme", "num_experts": spec.num_experts,
        "expert_intermediate_size": len(splits[0].experts[0]), "shared_intermediate_size": len(splits[0].shared),
        "moe_top_k": spec.experts_per_token, "router_hidden_size": spec.router_hidden_size,
        "router_intermediate_size": spec.router_intermediate_size, "readme_calibration_tokens": len(token_ids),
        "readme_router_training": {"steps": spec.router_steps, "first_loss": training.losses[0] if training.losses
                                   else None, "last_loss": training.losses[-1] if training.losses else None,
                                   "oracle_accuracy": training.accuracy}})
    (out_dir / "config.json").write_text(json.dumps(raw, indent=1))
    channels = {str(i): {"shared": s.shared, "experts": s.experts} for i, s in enumerate(splits)}
    (out_dir / CHANNELS_FILE).write_text(json.dumps(channels, separators=(",", ":")))
    return out_dir


def _readme_tensors(weights, splits: list[ChannelSplit]) -> dict[str, torch.Tensor]:
    """The dense checkpoint's tensors with each MLP split by channels."""
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in weights:
        parts = name.split(".")
        if ".mlp." not in name:
            tensors[name] = tensor.contiguous()
            continue
        layer = int(parts[parts.index("layers") + 1])
        prefix, proj = name.split(".mlp.")[0], parts[-2]  # gate_proj / up_proj / down_proj
        split = splits[layer]
        groups = [("shared_expert", split.shared)] if split.shared else []
        groups += [(f"experts.{e}", channels) for e, channels in enumerate(split.experts)]
        for group, channels in groups:
            index = torch.tensor(channels)
            part = tensor[:, index] if proj == "down_proj" else tensor[index]
            tensors[f"{prefix}.mlp.{group}.{proj}.weight"] = part.contiguous()
    return tensors


def _new_router(embedding: torch.Tensor, spec: RefactorSpec) -> PreGatingRouter:
    """An fp32 router whose embedding is the model's first router_hidden_size embedding columns (as Read-ME's code
    starts it), its other weights torch's default initialization under spec.seed."""
    vocab, hidden_size = embedding.shape
    if spec.router_hidden_size > hidden_size:
        raise ValueError(f"router_hidden_size {spec.router_hidden_size} is over the model's hidden size {hidden_size}")
    with torch.random.fork_rng():
        torch.manual_seed(spec.seed)
        router = PreGatingRouter(vocab, spec.router_hidden_size, spec.router_intermediate_size, spec.num_experts,
                                 spec.experts_per_token)
    with torch.no_grad():
        router.embed.weight.copy_(embedding[:, :spec.router_hidden_size].float())
    return router
