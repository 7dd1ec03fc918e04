"""The Triton MoE path (kernels/moe/triton_moe.py) on CPU, under the Triton interpreter.

- moe_align_block_size equals a per-expert Python loop (sorted copies, padding sentinel, block experts, padded total).
- fused_experts_triton equals the naive per-token reference and the torch path, fp32 and bf16: T=1, T*k not a
  multiple of BLOCK_M, N and K not multiples of BLOCK_N / BLOCK_K, experts with no tokens, tied router scores.
- select_moe_impl keeps torch on CPU.

Without CUDA the kernel runs under the Triton interpreter. TRITON_INTERPRET is read by triton.jit when a kernel is
decorated and by the interpreter while it runs, so it is set only around this module's import of triton_moe (and of
triton, if this is the first import) and around its tests; other modules see the environment unchanged. With CUDA the
variable is never set and the compiled kernel runs on the GPU (bench/gpu/moe_kernel_check.py adds timings).
"""

import pytest
import torch

pytest.importorskip("triton")
from afdserve.kernels.triton_interpret import DEVICE, import_triton_module, interpreter_env  # noqa: E402

triton_moe = import_triton_module("afdserve.kernels.moe.triton_moe")

from afdserve.kernels.moe import fused_experts_torch, moe_reference, select_moe_impl  # noqa: E402
from afdserve.models.layers.moe_router import RouterConfig, select_experts  # noqa: E402

H, I = 32, 24
SMALL = triton_moe.MoEBlockConfig(block_m=16, block_n=32, block_k=16)  # N=48 / K=24 and H=32 / K=24: ragged tiles


@pytest.fixture(autouse=True, scope="module")
def _interpret():
    with interpreter_env():
        yield


def _weights(num_experts: int, dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(num_experts, 2 * I, H, generator=g) * 0.2
    w2 = torch.randn(num_experts, H, I, generator=g) * 0.2
    return w13.to(dtype), w2.to(dtype)


def _tol(dtype):
    return dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)


# ---- block alignment -----------------------------------------------------------------------------------------


def _align_reference(topk_ids, block_size, num_experts):
    flat = topk_ids.flatten().tolist()
    sorted_ids, expert_of_block = [], []
    for e in range(num_experts):
        copies = [i for i, x in enumerate(flat) if x == e]
        padded = -(-len(copies) // block_size) * block_size
        sorted_ids += copies + [len(flat)] * (padded - len(copies))
        expert_of_block += [e] * (padded // block_size)
    return sorted_ids, expert_of_block


@pytest.mark.parametrize("num_tokens,top_k,num_experts,block_size",
                         [(1, 1, 4, 16), (1, 2, 8, 4), (7, 2, 8, 4), (33, 3, 6, 16), (16, 1, 3, 8), (0, 2, 4, 4)])
def test_align_block_size_matches_loop(num_tokens, top_k, num_experts, block_size):
    g = torch.Generator().manual_seed(num_tokens + num_experts)
    # Experts 0 and the last are never chosen (idle experts must get no block).
    topk_ids = torch.randint(1, num_experts - 1, (num_tokens, top_k), generator=g)
    align = triton_moe.moe_align_block_size(topk_ids, block_size, num_experts)
    ref_ids, ref_experts = _align_reference(topk_ids, block_size, num_experts)
    num_post = int(align.num_tokens_post_padded)
    assert num_post == len(ref_ids) and num_post % block_size == 0
    assert align.sorted_token_ids[:num_post].tolist() == ref_ids
    assert (align.sorted_token_ids[num_post:] == num_tokens * top_k).all()
    assert align.sorted_token_ids.numel() == num_tokens * top_k + num_experts * (block_size - 1)
    assert align.expert_ids[:num_post // block_size].tolist() == ref_experts
    assert align.tokens_per_expert.tolist() == torch.bincount(topk_ids.flatten(), minlength=num_experts).tolist()


# ---- expert compute ------------------------------------------------------------------------------------------


def _check_all_paths(x, w13, w2, topk_ids, topk_weights, config=SMALL):
    on_device = [t.to(DEVICE) for t in (x, w13, w2, topk_ids, topk_weights)]
    out, counts = triton_moe.fused_experts_triton(*on_device, config)
    out, counts = out.cpu(), counts.cpu()
    assert out.dtype == x.dtype and out.shape == x.shape
    torch.testing.assert_close(out, moe_reference(x, w13, w2, topk_ids, topk_weights), **_tol(x.dtype))
    torch_out, torch_counts = fused_experts_torch(x, w13, w2, topk_ids, topk_weights)
    torch.testing.assert_close(out, torch_out, **_tol(x.dtype))
    assert counts.tolist() == torch_counts.tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_tokens,top_k", [(1, 1), (1, 2), (7, 2), (19, 3)])
def test_triton_path_matches_reference_with_idle_experts(num_tokens, top_k, dtype):
    num_experts = 8
    g = torch.Generator().manual_seed(num_tokens)
    x = torch.randn(num_tokens, H, generator=g).to(dtype)
    logits = torch.full((num_tokens, num_experts), -30.0)  # only experts 1, 2, 4, 6 are ever chosen
    logits[:, [1, 2, 4, 6]] = torch.randn(num_tokens, 4, generator=g)
    routing = select_experts(logits, RouterConfig(num_experts, top_k, renormalize=True))
    _check_all_paths(x, *_weights(num_experts, dtype), *routing)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_path_with_tied_scores(dtype):
    num_experts, top_k = 6, 2
    x = torch.randn(5, H, generator=torch.Generator().manual_seed(1)).to(dtype)
    logits = torch.tensor([[0.0] * 6, [1.0, 2.0, 2.0, 0.0, 2.0, 1.0], [3.0, 1.0, 3.0, 3.0, 1.0, 0.0],
                           [0.0, 0.0, 0.0, 0.0, 5.0, 5.0], [0.5, 0.5, 0.5, 0.5, 0.5, 0.5]])
    routing = select_experts(logits, RouterConfig(num_experts, top_k))
    assert routing.topk_ids.tolist() == [[0, 1], [1, 2], [0, 2], [4, 5], [0, 1]]
    _check_all_paths(x, *_weights(num_experts, dtype, seed=2), *routing)


@pytest.mark.parametrize("num_tokens", [1, 9, 40, 140])  # 0.5, 4.5, 20 and 70 copies per expert: each tier
def test_triton_path_default_config_and_strided_input(num_tokens):
    """Each tier of the default config, with tiles wider than H and I, and an x that is a non-contiguous view."""
    num_experts, top_k = 4, 2
    tiers = {triton_moe.default_config(t * top_k, num_experts) for t in (1, 9, 40, 140)}
    assert len(tiers) == 4
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2 * H, num_tokens, generator=g).t()[:, :H]  # [T, H], row stride 1
    routing = select_experts(torch.randn(num_tokens, num_experts, generator=g), RouterConfig(num_experts, top_k))
    _check_all_paths(x, *_weights(num_experts, torch.float32, seed=3), *routing, config=None)


def test_select_moe_impl_keeps_torch_on_cpu():
    assert select_moe_impl("cpu") is fused_experts_torch
    assert select_moe_impl("cuda") is triton_moe.fused_experts_cuda


@pytest.mark.parametrize("num_tokens, path", [(9, "triton"), (4 * 64, "triton"), (4 * 64 + 1, "torch")])
def test_cuda_path_takes_torch_past_the_copies_per_expert_bound(num_tokens, path, monkeypatch):
    """4 experts, top-2: 4 * 64 tokens make exactly 128 copies per expert, the last Triton batch; both paths run
    for real (Triton under the interpreter) and match the reference."""
    assert triton_moe.TORCH_ABOVE_COPIES_PER_EXPERT == 128
    calls = []
    for name in ("fused_experts_triton", "fused_experts_torch"):
        real = getattr(triton_moe, name)
        monkeypatch.setattr(triton_moe, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    num_experts, top_k = 4, 2
    g = torch.Generator().manual_seed(4)
    x = torch.randn(num_tokens, H, generator=g)
    routing = select_experts(torch.randn(num_tokens, num_experts, generator=g), RouterConfig(num_experts, top_k))
    w13, w2 = _weights(num_experts, torch.float32, seed=4)
    on_device = [t.to(DEVICE) for t in (x, w13, w2, *routing)]
    out, _ = triton_moe.fused_experts_cuda(*on_device)
    assert calls == [f"fused_experts_{path}"]
    torch.testing.assert_close(out.cpu(), moe_reference(x, w13, w2, *routing), **_tol(torch.float32))
