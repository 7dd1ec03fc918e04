"""llama.cpp's batch-1 decode on the same GGUF the engine serves, as the issue's peer (run with the peer venv's
python: `pip install llama-cpp-python`, built from source here; never a project dependency).

Same load as `afdserve bench throughput --concurrency 1 --num-requests 4`: 4 requests of 128 random-token prompts
and 128 output tokens (EOS ignored), one at a time; TPOT = (end - first token) / (tokens - 1) per request.
Prints one JSON line: the host, each request's TPOT and their median.
"""
import argparse
import json
import os
import platform
import random
import statistics
import time

import llama_cpp


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--num-requests", type=int, default=4)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    args = parser.parse_args()
    llm = llama_cpp.Llama(model_path=args.gguf, n_ctx=1024, n_threads=args.threads, n_batch=512, verbose=False,
                          seed=0)
    vocab = llm.n_vocab()
    rng = random.Random(0)
    tpots = []
    for _ in range(args.num_requests):
        llm.reset()
        prompt = [rng.randrange(1000, vocab - 1) for _ in range(args.input_len)]
        times = []
        start = time.perf_counter()
        for _token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            times.append(time.perf_counter())
            if len(times) == args.output_len:
                break
        tpots.append((times[-1] - times[0]) / (len(times) - 1) * 1000)
        print(f"request: TTFT {1000 * (times[0] - start):.1f} ms, TPOT {tpots[-1]:.2f} ms", flush=True)
    flags = open("/proc/cpuinfo").read()
    print(json.dumps({
        "peer": f"llama-cpp-python {llama_cpp.__version__}", "gguf": os.path.basename(args.gguf),
        "threads": args.threads, "num_requests": args.num_requests, "input_len": args.input_len,
        "output_len": args.output_len, "tpot_ms": [round(t, 3) for t in tpots],
        "tpot_median_ms": round(statistics.median(tpots), 3),
        "host": {"cpu": cpu_model(), "amx": "amx_bf16" in flags, "avx512_bf16": "avx512_bf16" in flags,
                 "cpu_count": os.cpu_count()},
    }))


if __name__ == "__main__":
    main()
