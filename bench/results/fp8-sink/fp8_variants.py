"""Issue 19, item 13: what would buy fp8_e4m3 KV margin at 4,096 tokens. Perplexity of SmolLM2 fp32 on
pydoc_data.topics (chunks of 256, prefix caching off, max_num_seqs 4) with the token-scaled fp8 store patched:
    auto  full-precision KV (the reference)
    fp8   the store as built (keys in a Walsh-Hadamard basis, per-(token, head) scales)
    sink  fp8, with the first token written (position 0: the attention sink) kept exact
    vrot  fp8, with values rotated like the keys
Usage: python fp8_variants.py VARIANT NUM_TOKENS (results.jsonl: one line per run, 2026-12-04, AMD EPYC AVX-512)."""
import json
import sys

import torch

from afdserve.kernels.attention import kv_quant as kq
from afdserve.bench.kv_quant import english_text, perplexity
from afdserve import LLM
variant = sys.argv[1]; n = int(sys.argv[2])
orig_write, orig_load = kq.TokenScaledStore.write_tokens, kq.TokenScaledStore.load
if variant == "sink":
    def write(self, k, v, slot_mapping):
        orig_write(self, k, v, slot_mapping)
        if not hasattr(self, "exact"):
            self.exact = (int(slot_mapping[0]), k[0].clone(), v[0].clone())  # [kvh, hd]
    def load(self, slots):
        out = orig_load(self, slots)  # [2, h, n, bs, hd]
        if hasattr(self, "exact"):
            s, k0, v0 = self.exact; bs = self.shape.block_size
            hit = (slots == s // bs).nonzero().flatten()
            for i in hit.tolist():
                out[0, :, i, s % bs] = k0.to(out.dtype); out[1, :, i, s % bs] = v0.to(out.dtype)
        return out
    kq.TokenScaledStore.write_tokens, kq.TokenScaledStore.load = write, load
elif variant == "vrot":
    def write(self, k, v, slot_mapping):
        q, scale = kq.absmax_quant(torch.stack([kq.rotate_keys(k), kq.rotate_keys(v)]).transpose(1, 2), self.fmt)
        _, h, nn, bs, hd = self.data.shape
        self.data.view(2, h, nn * bs, hd).index_copy_(2, slot_mapping, q)
        self.scale.view(2, h, nn * bs, 1).index_copy_(2, slot_mapping, scale)
    def load(self, slots):
        kv = kq.absmax_dequant(self.data.index_select(2, slots), self.scale.index_select(2, slots), self.fmt, torch.float32)
        return torch.stack([kq.rotate_keys(kv[0]), kq.rotate_keys(kv[1])]).to(self.shape.dtype)
    kq.TokenScaledStore.write_tokens, kq.TokenScaledStore.load = write, load
kv_dtype = "auto" if variant == "auto" else "fp8_e4m3"
llm = LLM("smollm2", dtype="float32", kv_cache_dtype=kv_dtype, enable_prefix_caching=False, max_num_batched_tokens=256, max_num_seqs=4)
ids = llm.tokenizer.encode(english_text())[:n]
print(json.dumps(dict(variant=variant, tokens=n, ppl=perplexity(llm, ids))))
