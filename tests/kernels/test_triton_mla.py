"""The Triton MLA decode (kernels/attention/triton_mla.py) on CPU under the Triton interpreter, against two oracles:
the torch path (mla_paged.mla_decode_attention) and a float64 softmax written here from the math, reading each
token straight from (block_tables[s, t // P], t % P): scores = q . entry over the whole entry, values = the entry's
first `latent` values. Lengths 1, a block boundary and ragged ones; head counts below, at and above one 16-head tile;
DeepSeek's 512 + 64 entry and a small one; fp32 and bf16."""
import pytest
import torch

pytest.importorskip("triton")
from afdserve.kernels.triton_interpret import DEVICE, import_triton_module, interpreter_env  # noqa: E402

triton_mla = import_triton_module("afdserve.kernels.attention.triton_mla")

from afdserve.kernels.attention.mla_paged import mla_decode_attention  # noqa: E402
from afdserve.kernels.attention.torch_paged import decode_mask_bias  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _interpret():
    with interpreter_env():
        yield


def _case(seq_lens, heads, latent, rope, page, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    blocks_each = [-(-n // page) for n in seq_lens]
    num_blocks = sum(blocks_each) + 3
    cache = torch.randn(1, 1, num_blocks, page, latent + rope, generator=gen).to(dtype)
    ids = torch.randperm(num_blocks, generator=gen).tolist()  # scattered, not in order
    width = max(blocks_each)
    tables, taken = [], 0
    for n in blocks_each:
        tables.append(ids[taken:taken + n] + [0] * (width - n))
        taken += n
    q = torch.randn(len(seq_lens), heads, latent + rope, generator=gen).to(dtype)
    return (q.to(DEVICE), cache.to(DEVICE), torch.tensor(tables, device=DEVICE),
            torch.tensor(seq_lens, device=DEVICE))


def _float64_oracle(q, cache, tables, seq_lens, scale, latent):
    out = []
    for b, n in enumerate(seq_lens.tolist()):
        entries = torch.stack([cache[0, 0, tables[b, t // cache.shape[3]], t % cache.shape[3]] for t in range(n)])
        entries = entries.double()
        probs = (q[b].double() @ entries.T * scale).softmax(-1)
        out.append(probs @ entries[:, :latent])
    return torch.stack(out)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("heads, latent, rope, page", [(4, 32, 16, 16), (20, 64, 16, 8), (16, 512, 64, 16)])
def test_decode_equals_the_torch_path_and_the_float64_softmax(dtype, tol, heads, latent, rope, page):
    seq_lens = [1, page, 2 * page + 3, 37]
    q, cache, tables, lens = _case(seq_lens, heads, latent, rope, page, dtype)
    scale = (latent + rope) ** -0.5
    got = triton_mla.mla_paged_decode(q, cache, tables, lens, scale, latent, block_n=16)
    assert got.shape == (len(seq_lens), heads, latent) and got.dtype == dtype
    oracle = _float64_oracle(q.cpu(), cache.cpu(), tables.cpu(), lens.cpu(), scale, latent)
    torch_path = mla_decode_attention(q, cache, tables, decode_mask_bias(lens, tables.shape[1] * page), scale, latent)
    assert (got.double().cpu() - oracle).abs().max() < tol
    assert (got.double() - torch_path.double()).abs().max().item() < tol


def test_a_cache_that_is_not_an_mla_cache_is_named():
    q, cache, tables, lens = _case([5], 4, 32, 16, 16, torch.float32)
    with pytest.raises(ValueError, match=r"an MLA cache is \[1, 1, blocks, block_size, 48\]"):
        triton_mla.mla_paged_decode(q, cache.expand(2, 1, -1, -1, -1), tables, lens, 0.1, 32)
    with pytest.raises(ValueError, match="value_dim must be the latent part of the 48-wide entry"):
        triton_mla.mla_paged_decode(q, cache, tables, lens, 0.1, 48)


def test_deepseek_v3_with_the_triton_backend_gives_transformers_tokens(tmp_path):
    """The engine with attention_backend triton: MLA decodes through the kernel (prefill chunks in torch), greedy
    tokens and logprobs of a tiny random DeepseekV3ForCausalLM equal transformers' (under the interpreter on CPU)."""
    if DEVICE != "cpu":
        pytest.skip("the engine test runs the CPU engine with the kernel interpreted")
    from afdserve import LLM
    from afdserve.kernels.attention.mla_paged import MLAPagedAttention
    from conftest import generate_and_compare, make_tiny_model
    hf = make_tiny_model(tmp_path, "deepseek_v3", mlp_std=0.1, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=16,
                         qk_nope_head_dim=24, v_head_dim=20, first_k_dense_replace=1, moe_intermediate_size=32,
                         n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1)
    with LLM(str(tmp_path), dtype="float32", block_size=16, attention_backend="triton") as llm:
        attn = llm.engine.core.executor.runner.model.layers[0].self_attn.attn
        assert isinstance(attn, MLAPagedAttention) and attn.decode.__name__ == "_triton_decode"
        generate_and_compare(llm, hf, [[5, 17, 99, 3, 250, 41, 8], list(range(10, 40))], new_tokens=8, top=3)
