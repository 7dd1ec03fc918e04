"""The Triton paged attention (kernels/attention/triton_paged.py) on CPU, under the Triton interpreter.

Two oracles: the torch backend (decode_attention / prefill_attention in torch_paged.py) and a dense softmax written
here from the math in float64, which reads each token straight from (block_tables[s, t // P], t % P).
- decode: head_dim 64/128/256, GQA 1/3/8/64, block size 16/32, lengths 1, block boundaries and ragged ones, 1 split,
  several splits and more splits than a sequence has keys (empty splits), fp32 and bf16;
- prefill chunks with and without a cached prefix, one-token chunks, with and without split-K;
- an int8 / fp8_e4m3 cache (kv_quant.TokenScaledStore: codes, per-token scales, rotated keys) dequantized in the
  kernel, against both oracles run on the store's dequantized K/V;
- the backend on a real step's metadata: a tiny random Llama generates the same greedy tokens with Triton forced
  under the interpreter as with the torch backend (prefill chunks with a cached prefix, decodes and both mixed),
  with a full-precision and with an fp8 KV cache;
- attention policies (kernels/attention/sparse): a decode through per-(sequence, KV head) block tables and page
  log-weights against the torch backend and a float64 softmax over the kept tokens; each policy on a one-page
  budget giving the torch backend's tokens; every policy on a covering budget giving transformers' tokens;
- num_kv_splits against hand-worked cases of the split rule, select_attention_backend, and bad input.

TRITON_INTERPRET is set only around this module's import of triton_paged and around its tests, as in
test_triton_moe.py. With CUDA the compiled kernels run on the GPU (bench/gpu/attention_kernel_check.py runs this file
there) and the engine test, which runs the CPU engine, is skipped.
"""

import pytest
import torch

pytest.importorskip("triton")
from afdserve.kernels.triton_interpret import DEVICE, INTERPRET, import_triton_module, interpreter_env  # noqa: E402

triton_paged = import_triton_module("afdserve.kernels.attention.triton_paged")

from afdserve.kernels.attention import TorchPagedAttention, select_attention_backend  # noqa: E402
from afdserve.kernels.attention.kv_quant import KVShape, TokenScaledStore, rotate_keys  # noqa: E402
from afdserve.kernels.attention.torch_paged import decode_attention, decode_mask_bias, prefill_attention  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _interpret():
    with interpreter_env():
        yield


def _tol(dtype):
    return dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)


def _paged_cache(kv_heads, head_dim, block_size, seq_lens, dtype, seed):
    """A cache in which each sequence owns shuffled blocks (logical order is not physical order); block tables are
    padded with block 0, which belongs to some sequence, so reading past a sequence's end changes the result."""
    g = torch.Generator().manual_seed(seed)
    per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(per_seq) + 1
    kv = torch.randn(2, kv_heads, num_blocks, block_size, head_dim, generator=g).to(dtype)
    ids = torch.randperm(num_blocks, generator=g).tolist()
    tables = torch.zeros(len(seq_lens), max(per_seq), dtype=torch.long)
    for s, count in enumerate(per_seq):
        tables[s, :count] = torch.tensor([ids.pop() for _ in range(count)])
    return kv, tables


def _dense(q, kv, table, seq_len, scale):
    """Softmax attention from the definition, float64: q [n, heads, hd] are the last n positions of the sequence."""
    n, num_heads, _ = q.shape
    block_size = kv.shape[3]
    pos = torch.arange(seq_len)
    k, v = (kv[i][:, table[pos // block_size], pos % block_size].double() for i in (0, 1))  # [kvh, L, hd]
    group = num_heads // kv.shape[1]
    k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
    scores = torch.einsum("nhd,hld->hnl", q.double(), k) * scale
    future = pos[None, :] > (seq_len - n + torch.arange(n))[:, None]
    probs = scores.masked_fill(future, float("-inf")).softmax(-1)
    return torch.einsum("hnl,hld->nhd", probs, v)


def _decode_oracles(q, kv, tables, seq_lens, scale):
    """One query per sequence: (the torch backend's decode_attention, the float64 dense softmax)."""
    bias = decode_mask_bias(torch.tensor(seq_lens), tables.shape[1] * kv.shape[3])
    torch_out = decode_attention(q, kv, tables, bias, scale)
    dense = torch.cat([_dense(q[s:s + 1], kv, tables[s], n, scale) for s, n in enumerate(seq_lens)])
    return torch_out, dense


def _on_device(*tensors):
    return [t.to(DEVICE) for t in tensors]


DECODE_CASES = {  # head_dim, group, kv_heads, block_size, dtype, seq_lens, split counts
    "mha-d64-p16": (64, 1, 2, 16, torch.float32, [1, 16, 17, 45], (1, 3)),
    "gqa3-d128-p32": (128, 3, 2, 32, torch.bfloat16, [32, 1, 64, 70], (1, 4)),
    "gqa8-d256-p16": (256, 8, 1, 16, torch.float32, [33, 16, 2], (2,)),
    "mqa64-d128-p32": (128, 64, 1, 32, torch.bfloat16, [1, 40], (1, 2)),
}


@pytest.mark.parametrize("case", DECODE_CASES)
def test_decode_matches_torch_and_dense(case):
    head_dim, group, kv_heads, block_size, dtype, seq_lens, split_counts = DECODE_CASES[case]
    kv, tables = _paged_cache(kv_heads, head_dim, block_size, seq_lens, dtype, seed=head_dim + group)
    q = torch.randn(len(seq_lens), kv_heads * group, head_dim, generator=torch.Generator().manual_seed(1)).to(dtype)
    scale = head_dim ** -0.5
    lens = torch.tensor(seq_lens)
    torch_out, dense = _decode_oracles(q, kv, tables, seq_lens, scale)
    d_major = triton_paged.decode_config(group, head_dim)._replace(keys_d_major=True)  # key tiles loaded [hd, N]
    for num_splits, config in [(n, None) for n in split_counts] + [(split_counts[0], d_major)]:
        out = triton_paged.paged_decode(*_on_device(q, kv, tables, lens), scale, num_splits=num_splits,
                                        config=config).cpu()
        assert out.dtype == dtype and out.shape == q.shape
        torch.testing.assert_close(out, torch_out, **_tol(dtype))
        torch.testing.assert_close(out.double(), dense, **_tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_reads_each_heads_own_pages_with_log_weights(dtype):
    """An attention policy's tables (kernels/attention/sparse): each KV head reads its own kept pages, a page's
    log-weight added to its tokens' logits, against the torch backend on the same selection and a float64 softmax
    over exactly the kept tokens."""
    from afdserve.kernels.attention.sparse.selection import DecodeBatch, compact, selected_blocks, selected_mask_bias
    kv_heads, group, head_dim, block_size, seq_lens = 2, 3, 64, 16, [70, 16, 33, 5]
    kv, tables = _paged_cache(kv_heads, head_dim, block_size, seq_lens, dtype, seed=7)
    g = torch.Generator().manual_seed(8)
    decodes = DecodeBatch(tables, torch.tensor(seq_lens), block_size, torch.zeros(len(seq_lens), dtype=torch.long))
    kept = (torch.rand(len(seq_lens), kv_heads, tables.shape[1], generator=g) < 0.5) & decodes.valid_pages()[:, None]
    kept |= torch.arange(tables.shape[1]) == decodes.num_pages[:, None, None] - 1
    log_w = torch.randn(kept.shape, generator=g)
    blocks = selected_blocks(compact(kept, log_w), decodes)
    q = torch.randn(len(seq_lens), kv_heads * group, head_dim, generator=g).to(dtype)
    scale = head_dim ** -0.5
    torch_out = decode_attention(q, kv, blocks.block_tables, selected_mask_bias(blocks, block_size), scale)
    out = triton_paged.paged_decode(*_on_device(q, kv, blocks.block_tables, blocks.seq_lens), scale, num_splits=2,
                                    page_log_weights=blocks.log_weights.to(DEVICE)).cpu()
    torch.testing.assert_close(out, torch_out, **_tol(dtype))
    for s, n in enumerate(seq_lens):
        for h in range(kv_heads * group):
            kvh = h // group
            pos = torch.tensor([t for t in range(n) if kept[s, kvh, t // block_size]])
            k, v = (kv[i][kvh, tables[s, pos // block_size], pos % block_size].double() for i in (0, 1))
            probs = (k @ q[s, h].double() * scale + log_w[s, kvh, pos // block_size].double()).softmax(0)
            torch.testing.assert_close(out[s, h].double(), probs @ v, **_tol(dtype))


PREFILL_CASES = {  # head_dim, group, kv_heads, block_size, dtype, [(new tokens, seq_len)], num_splits
    "no-prefix-gqa3": (64, 3, 2, 16, torch.float32, [(1, 1), (16, 16), (23, 23)], 1),
    "prefix-gqa8-p32": (128, 8, 1, 32, torch.bfloat16, [(5, 37), (32, 64), (1, 20)], 1),
    "prefix-split-mha": (64, 1, 2, 16, torch.float32, [(3, 40), (17, 17)], 2),
    "mqa64-d256": (256, 64, 1, 16, torch.bfloat16, [(2, 18), (4, 4)], 1),
}


@pytest.mark.parametrize("case", PREFILL_CASES)
def test_prefill_chunks_match_torch_and_dense(case):
    head_dim, group, kv_heads, block_size, dtype, chunks, num_splits = PREFILL_CASES[case]
    seq_lens = [n for _, n in chunks]
    kv, tables = _paged_cache(kv_heads, head_dim, block_size, seq_lens, dtype, seed=head_dim + group)
    starts = torch.tensor([0, *torch.tensor([c for c, _ in chunks]).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(starts[-1]), kv_heads * group, head_dim, generator=torch.Generator().manual_seed(2)).to(dtype)
    scale = head_dim ** -0.5
    out = triton_paged.paged_attention(*_on_device(q, kv, tables, torch.tensor(seq_lens), starts),
                                       max(c for c, _ in chunks), scale, num_splits=num_splits).cpu()
    for s, (new, seq_len) in enumerate(chunks):
        rows = slice(int(starts[s]), int(starts[s + 1]))
        blocks = tables[s, :-(-seq_len // block_size)]
        torch.testing.assert_close(out[rows], prefill_attention(q[rows], kv, blocks, seq_len, scale), **_tol(dtype))
        torch.testing.assert_close(out[rows].double(), _dense(q[rows], kv, tables[s], seq_len, scale), **_tol(dtype))


def _quantized_cache(kv_heads, head_dim, block_size, seq_lens, dtype, fmt, seed):
    """_paged_cache's K/V written through a TokenScaledStore; returns the store, its dequantized cache (what the
    oracles read) and the block tables."""
    kv, tables = _paged_cache(kv_heads, head_dim, block_size, seq_lens, dtype, seed)
    num_blocks = kv.shape[2]
    store = TokenScaledStore(KVShape(kv_heads, block_size, head_dim, dtype), num_blocks, fmt)
    k, v = kv.view(2, kv_heads, -1, head_dim).transpose(1, 2)  # each [tokens, kv_heads, hd]
    store.write_tokens(k, v, torch.arange(num_blocks * block_size))
    return store, store.load(torch.arange(num_blocks)), tables


QUANT_CASES = {  # fmt, head_dim, group, kv_heads, block_size, dtype, seq_lens, split counts
    "int8-gqa3-d64-p16": ("int8", 64, 3, 2, 16, torch.float32, [1, 16, 17, 45], (1, 3)),
    "fp8-gqa8-d128-p32": ("fp8_e4m3", 128, 8, 1, 32, torch.bfloat16, [33, 64, 2], (1, 2)),
}


@pytest.mark.parametrize("case", QUANT_CASES)
def test_quantized_cache_dequantized_in_the_kernel(case):
    """Decode (with splits) and prefill chunks over int8 / fp8 codes equal attention over the dequantized cache:
    the kernel's codes x scale is the store's dequantization, and its rotated queries undo the rotated keys."""
    fmt, head_dim, group, kv_heads, block_size, dtype, seq_lens, split_counts = QUANT_CASES[case]
    store, kv, tables = _quantized_cache(kv_heads, head_dim, block_size, seq_lens, dtype, fmt, seed=group)
    codes, scales = _on_device(store.data, store.scale)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(len(seq_lens), kv_heads * group, head_dim, generator=g).to(dtype)
    q_rot = rotate_keys(q).to(dtype)
    scale = head_dim ** -0.5
    lens = torch.tensor(seq_lens)
    torch_out, dense = _decode_oracles(q, kv, tables, seq_lens, scale)
    transposed = triton_paged.decode_config(group, head_dim, quantized=True)._replace(keys_d_major=False)
    for num_splits, config in [(n, None) for n in split_counts] + [(split_counts[-1], transposed)]:
        out = triton_paged.paged_decode(*_on_device(q_rot, codes, tables, lens), scale, num_splits=num_splits,
                                        kv_scale=scales, config=config).cpu()
        assert out.dtype == dtype
        torch.testing.assert_close(out, torch_out, **_tol(dtype))
        torch.testing.assert_close(out.double(), dense, **_tol(dtype))
    # Prefill: the last few tokens of each sequence as a chunk after its cached prefix.
    chunk_lens = [min(n, 5) for n in seq_lens]
    starts = torch.tensor([0, *torch.tensor(chunk_lens).cumsum(0).tolist()], dtype=torch.int32)
    qp = torch.randn(int(starts[-1]), kv_heads * group, head_dim, generator=g).to(dtype)
    out = triton_paged.paged_attention(*_on_device(rotate_keys(qp).to(dtype), codes, tables, lens, starts),
                                       max(chunk_lens), scale, kv_scale=scales).cpu()
    for s, n in enumerate(seq_lens):
        rows = slice(int(starts[s]), int(starts[s + 1]))
        torch.testing.assert_close(out[rows].double(), _dense(qp[rows], kv, tables[s], n, scale), **_tol(dtype))


def test_num_kv_splits_follows_the_wave_rule():
    # Programs fill 80% of the SMs: no split.
    assert triton_paged.num_kv_splits(num_programs=8, num_key_tiles=512, num_sms=10) == 1
    # 4 programs on 10 SMs: s splits fill 0.4 s waves, efficiency 0.4 s / ceil(0.4 s) = .4 .8 .6 .8 1 .8 .93 .8 .9 1
    # for s = 1..10 (100 tiles: every s gives a different tiles-per-split); the first within 85% of 1 is s = 5.
    assert triton_paged.num_kv_splits(num_programs=4, num_key_tiles=100, num_sms=10) == 5
    # With 8 tiles, s = 5..7 take 2 tiles per split like s = 4 and are skipped, leaving s = 1, 2, 3, 4, 8 with
    # efficiencies .4 .8 .6 .8 .8: the first within 85% of .8 is s = 2.
    assert triton_paged.num_kv_splits(num_programs=4, num_key_tiles=8, num_sms=10) == 2


def test_bad_input_is_rejected():
    kv, tables = _paged_cache(2, 64, 16, [5], torch.float32, seed=0)
    lens = torch.tensor([5])
    with pytest.raises(ValueError, match="multiple of kv heads"):
        triton_paged.paged_decode(torch.randn(1, 3, 64), kv, tables, lens, 0.125)
    with pytest.raises(ValueError, match="head_dim"):
        triton_paged.paged_decode(torch.randn(1, 2, 32), kv, tables, lens, 0.125)
    with pytest.raises(ValueError, match="dtype"):
        triton_paged.paged_decode(torch.randn(1, 2, 64).bfloat16(), kv, tables, lens, 0.125)
    with pytest.raises(ValueError, match="seq_lens"):
        triton_paged.paged_decode(torch.randn(1, 2, 64), kv, tables, torch.tensor([5, 5]), 0.125)
    codes = torch.zeros(kv.shape, dtype=torch.int8)
    with pytest.raises(ValueError, match="needs kv_scale of shape"):
        triton_paged.paged_decode(torch.randn(1, 2, 64), codes, tables, lens, 0.125)
    with pytest.raises(ValueError, match="kv_scale goes with"):
        triton_paged.paged_decode(torch.randn(1, 2, 64), kv, tables, lens, 0.125, kv_scale=torch.ones(1))


def test_select_attention_backend(monkeypatch):
    assert isinstance(select_attention_backend("auto", "cpu"), TorchPagedAttention)
    assert isinstance(select_attention_backend("torch", "cuda"), TorchPagedAttention)
    assert isinstance(select_attention_backend("auto", "cuda"), triton_paged.TritonPagedAttention)
    with pytest.raises(ValueError, match="attention backend must be one of"):
        select_attention_backend("flash", "cpu")
    if INTERPRET:
        assert isinstance(select_attention_backend("triton", "cpu"), triton_paged.TritonPagedAttention)
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(ValueError, match="TRITON_INTERPRET"):
            select_attention_backend("triton", "cpu")


@pytest.mark.skipif(not INTERPRET, reason="the engine runs on CPU; on CUDA the kernel tests above cover the kernels")
@pytest.mark.parametrize("kv_cache_dtype, policy", [("auto", None), ("fp8_e4m3", None), ("auto", "delta"),
                                                    ("fp8_e4m3", "quest"), ("auto", "prflash"),
                                                    ("auto", "hyperattention")])
def test_tiny_llama_greedy_tokens_equal_torch_backend(tmp_path, kv_cache_dtype, policy):
    """Prompts of 1, 7 and 40 tokens with 16-token steps: prefill chunks with and without a cached prefix, decodes,
    and steps that mix both, through ModelRunner's real metadata; fp8: the Triton kernel reads the codes that the
    torch backend dequantizes on gather. With an attention policy on a budget of one page (plus the last), so that
    the 40-token prompt's decodes read some pages and not others."""
    from conftest import make_tiny_model  # tests/conftest.py needs gguf; the GPU check runs this file without it
    from afdserve import LLM, SamplingParams

    make_tiny_model(tmp_path, "llama")
    prompts = [[5, 17, 99, 3, 250, 41, 8], list(range(10, 50)), [7]]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    tokens = {}
    for backend in ("torch", "triton"):
        policy_args = {} if policy is None else dict(attention_policy=policy, attention_policy_config={
            "delta": {"budget_pages": 1, "recent_pages": 1, "full_layers": [0]}, "quest": {"budget_pages": 1,
            "dense_layers": 0}, "prflash": {"budget_pages": 1.5, "reweight": True},
            "hyperattention": {"block_tokens": 4, "sample_tokens": 16, "min_seq_len": 0}}[policy])
        with LLM(str(tmp_path), dtype="float32", block_size=16, max_num_batched_tokens=16,
                 attention_backend=backend, kv_cache_dtype=kv_cache_dtype, **policy_args) as llm:
            assert isinstance(llm.engine.core.executor.runner.model.layers[0].self_attn.attn,
                              TorchPagedAttention if backend == "torch" else triton_paged.TritonPagedAttention)
            tokens[backend] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert tokens["triton"] == tokens["torch"]


@pytest.mark.skipif(not INTERPRET, reason="the engine runs on CPU; on CUDA the kernel tests above cover the kernels")
def test_policies_whose_budget_covers_every_page_are_dense_on_triton(tmp_path):
    """One batch, each request under another policy with a budget over all its pages (kernels/attention/sparse),
    through the Triton kernels' per-head tables: every request gets transformers' greedy tokens (dense attention)."""
    from conftest import hf_greedy, make_tiny_model
    from afdserve import LLM, SamplingParams

    hf = make_tiny_model(tmp_path, "llama", num_hidden_layers=3)
    prompt = list(range(10, 50))
    covering = [{"name": "dense"}, {"name": "quest", "dense_layers": 0}, {"name": "delta", "full_layers": [0]},
                {"name": "prflash", "reweight": True}, {"name": "hyperattention", "block_tokens": 512,
                                                        "min_seq_len": 0},
                {"name": "sparsed", "keep_fraction": 1.0, "skip_steps": 1, "refresh_steps": 2}]
    params = [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, attention_policy=p) for p in covering]
    with LLM(str(tmp_path), dtype="float32", block_size=16, attention_backend="triton") as llm:
        outs = llm.generate([prompt] * len(covering), params, use_tqdm=False)
    want = hf_greedy(hf, prompt, 6)
    assert [o.outputs[0].token_ids for o in outs] == [want] * len(covering)
