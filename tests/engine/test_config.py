"""The engine's arguments are declared once (the fields of engine/config.py); the LLM keywords and the CLI flags
are derived from them. The expectations here are written out by hand, as users know the flags, not read back
from the config classes."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from afdserve.engine.arg_utils import add_engine_args, engine_config_from_args
from afdserve.engine.config import CacheConfig, ParallelConfig
from afdserve.engine.llm import LLM, engine_config

# Every engine flag of `afdserve serve --help` with its default, by help group.
ENGINE_FLAGS = {
    "--model": "smollm2", "--dtype": "auto", "--max-model-len": None, "--seed": 0, "--block-size": 16,
    "--kv-cache-memory-gb": 1.0, "--num-kv-blocks": None, "--enable-prefix-caching": True,
    "--kv-cache-dtype": "auto", "--kv-window": 128, "--kv-staircase": "128:16,512:8,inf:4",
    "--max-num-seqs": 256, "--max-num-batched-tokens": 2048, "--tpot-slo-ms": None, "--cache-dir": None,
    "--attention-backend": "auto", "--device": "auto", "--quantization": None, "--attention-policy": "dense",
    "--attention-policy-config": None, "--cuda-graph-sizes": None, "--enforce-eager": False,
    "--expert-cache-size": None, "--expert-cache-policy": "belady", "--expert-batch-size": None,
    "--expert-batch-max-wait": 4,
}
AFD_FLAGS = {"--afd": None, "--micro-batches": 2, "--distributed-executor-backend": "ray", "--ray-address": None,
             "--afd-transport": "gloo",
             "--afd-wire": "auto", "--moe-parallel": "adaptive", "--threads-per-worker": None}

# One value off the default for every flag, as a command line and as LLM / engine_config keywords.
ARGV = ["--model", "tiny", "--dtype", "float32", "--max-model-len", "512", "--seed", "7", "--block-size", "32",
        "--kv-cache-memory-gb", "0.5", "--num-kv-blocks", "64", "--no-enable-prefix-caching",
        "--kv-cache-dtype", "int4", "--kv-window", "64", "--max-num-seqs", "8",
        "--max-num-batched-tokens", "256", "--tpot-slo-ms", "150", "--cache-dir", "/tmp/models",
        "--attention-backend", "torch", "--device", "cpu", "--quantization", "int8", "--afd", "1A2F",
        "--micro-batches", "3", "--ray-address", "auto", "--afd-transport", "shm", "--afd-wire", "fp8",
        "--moe-parallel", "ep",
        "--threads-per-worker", "2", "--cuda-graph-sizes", "1,2", "--enforce-eager",
        "--expert-batch-size", "4", "--expert-batch-max-wait", "2"]
KWARGS = dict(model="tiny", dtype="float32", max_model_len=512, seed=7, block_size=32, kv_cache_memory_gb=0.5,
              num_kv_blocks=64, enable_prefix_caching=False, kv_cache_dtype="int4", kv_window=64,
              max_num_seqs=8, max_num_batched_tokens=256, tpot_slo_ms=150.0,
              cache_dir=Path("/tmp/models"), attention_backend="torch", device="cpu", quantization="int8", afd="1A2F",
              micro_batches=3, ray_address="auto", afd_transport="shm", afd_wire="fp8", moe_parallel="ep",
              threads_per_worker=2,
              cuda_graph_sizes="1,2", enforce_eager=True, expert_batch_size=4, expert_batch_max_wait=2)


def one_line_help(prog: str) -> argparse.HelpFormatter:
    # Each flag's help on its own line, unwrapped (textwrap would break "--num-kv-blocks" at its hyphens).
    return argparse.HelpFormatter(prog, max_help_position=200, width=1000)


def engine_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="afdserve serve", formatter_class=one_line_help)
    add_engine_args(parser)
    return parser


def help_lines() -> dict[str, str]:
    """--flag -> its line of --help."""
    lines = engine_parser().format_help().splitlines()
    return {m.group(1): line for line in lines if (m := re.match(r"\s+(--[a-z-]+)[ ,]", line))}


def test_every_flag_is_there_with_its_default_in_its_group():
    text = engine_parser().format_help()
    engine_part, afd_part = text.split("\nattention-FFN disaggregation:\n")
    assert set(help_lines()) == set(ENGINE_FLAGS) | set(AFD_FLAGS)
    for flags, part in ((ENGINE_FLAGS, engine_part), (AFD_FLAGS, afd_part)):
        for flag in flags:
            assert re.search(rf"^\s+{flag}[ ,]", part, re.MULTILINE), f"{flag} is not in its group"
    defaults = vars(engine_parser().parse_args([]))
    assert defaults == {flag[2:].replace("-", "_"): default for flag, default in {**ENGINE_FLAGS, **AFD_FLAGS}.items()}
    assert "--no-enable-prefix-caching" in help_lines()["--enable-prefix-caching"]


def test_a_command_line_gives_the_config_its_keywords_give():
    # --kv-staircase is saq's, --kv-window int4's: one config cannot set both (the saq case is below); an attention
    # policy does not run on int4's staircase, an expert cache not with 1A2F's sharded experts, local processes not
    # with a Ray address (cases below)
    off_default = {**ENGINE_FLAGS, **AFD_FLAGS}
    for flag in ("--kv-staircase", "--attention-policy", "--attention-policy-config", "--expert-cache-size",
                 "--expert-cache-policy", "--distributed-executor-backend"):
        del off_default[flag]
    assert all(KWARGS[flag[2:].replace("-", "_")] != default for flag, default in off_default.items())
    from_cli = engine_config_from_args(engine_parser().parse_args(ARGV))
    assert from_cli == engine_config(**KWARGS)
    assert (from_cli.parallel.afd_transport, from_cli.cache.enable_prefix_caching, from_cli.model.cache_dir,
            from_cli.scheduler.max_num_batched_tokens) == ("shm", False, Path("/tmp/models"), 256)
    assert (from_cli.parallel.num_attention_workers, from_cli.parallel.num_ffn_workers) == (1, 2)
    saq = engine_config_from_args(engine_parser().parse_args(["--kv-cache-dtype", "saq", "--kv-staircase",
                                                              "32:16,64:4,inf:2"]))
    assert saq == engine_config(kv_cache_dtype="saq", kv_staircase="32:16,64:4,inf:2")
    assert saq.cache.stairs == [(32, 16), (64, 4), (float("inf"), 2)]
    delta = engine_config_from_args(engine_parser().parse_args(["--attention-policy", "delta",
                                                                "--attention-policy-config", '{"budget_pages": 8}']))
    assert delta == engine_config(attention_policy="delta", attention_policy_config='{"budget_pages": 8}')
    cached = engine_config_from_args(engine_parser().parse_args(["--expert-cache-size", "2",
                                                                 "--expert-cache-policy", "lru"]))
    assert cached == engine_config(expert_cache_size=2, expert_cache_policy="lru")
    assert cached.model.expert_cache == (2, "lru")
    processes = engine_config_from_args(engine_parser().parse_args(["--afd", "1A1F", "--distributed-executor-backend",
                                                                    "mp"]))
    assert processes == engine_config(afd="1A1F", distributed_executor_backend="mp")
    assert processes.parallel.distributed_executor_backend == "mp"


@pytest.mark.parametrize("kwargs, words", [
    (dict(kv_window=64), "kv_window: set, but read only with kv_cache_dtype 'int4' (got 'auto')"),
    (dict(kv_cache_dtype="saq", kv_window=64), "kv_window: set, but read only with kv_cache_dtype 'int4'"),
    (dict(kv_cache_dtype="int4", kv_staircase="32:16,inf:4"), "kv_staircase: set, but read only with kv_cache_dtype "
                                                              "'saq' (got 'int4')"),
    (dict(kv_cache_dtype="int8", kv_staircase="32:16,inf:4"), "kv_staircase: set"),
])
def test_a_kv_setting_its_format_does_not_read_is_refused(kwargs, words):
    with pytest.raises(ValueError) as info:
        engine_config(**kwargs)
    assert words in str(info.value)


def test_model_stays_the_one_positional_argument():
    assert engine_config("some/model").model.model == "some/model"
    assert engine_config().model.model == "smollm2"


@pytest.mark.parametrize("name", ["afd_transprot", "transport", "num_attention_workers"])
def test_an_unknown_keyword_is_refused_naming_it(name):
    with pytest.raises(TypeError, match=f"unknown engine argument.*'{name}'"):
        engine_config(**{name: "shm"})
    with pytest.raises(TypeError, match=f"'{name}'"):
        LLM("smollm2", **{name: "shm"})  # before any model is loaded


def test_a_bad_value_fails_on_the_command_line_and_in_the_config(capsys):
    with pytest.raises(SystemExit):
        engine_parser().parse_args(["--afd-transport", "tcp"])
    assert "invalid choice: 'tcp'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="afd_transport must be one of gloo, shm, nccl, got 'tcp'"):
        engine_config(afd_transport="tcp")
    with pytest.raises(ValueError, match="afd must look like 1A1F"):
        engine_config(afd="1A")


@pytest.mark.parametrize("flag, words", [
    ("--model", ".gguf file"), ("--device", "cuda:N"), ("--kv-cache-dtype", "int4 (KIVI)"),
    ("--num-kv-blocks", "overrides --kv-cache-memory-gb"), ("--afd", "xAyF"), ("--afd-transport", "shared memory"),
    ("--moe-parallel", "expert-parallel"), ("--ray-address", "'auto' joins a running one"),
    ("--distributed-executor-backend", "local processes, one host, no Ray"), ("--afd-transport", "one GPU per worker"),
])
def test_help_says_what_a_flag_does(flag, words):
    assert words in help_lines()[flag]


def test_every_config_has_the_same_attributes_with_or_without_afd():
    assert (ParallelConfig().num_attention_workers, ParallelConfig().num_ffn_workers) == (0, 0)
    assert (ParallelConfig(afd="3a2f").num_attention_workers, ParallelConfig(afd="3a2f").num_ffn_workers) == (3, 2)
    assert CacheConfig().stairs == [(128, 16), (512, 8), (float("inf"), 4)]


def test_afd_settings_without_afd_are_refused_not_ignored():
    for kwargs in (dict(micro_batches=3), dict(afd_transport="shm"), dict(threads_per_worker=1),
                   dict(moe_parallel="ep"), dict(ray_address="auto"), dict(distributed_executor_backend="mp")):
        (name,) = kwargs
        with pytest.raises(ValueError, match=f"^{name}: set, but used only with afd"):
            engine_config(**kwargs)
    with pytest.raises(ValueError, match="afd 1A1F has one FFN worker"):
        engine_config(afd="1A1F", moe_parallel="sliced")
    assert engine_config(afd="1A2F", moe_parallel="sliced").parallel.moe_parallel == "sliced"
    assert engine_config(afd="1A1F", micro_batches=3, afd_transport="shm").parallel.micro_batches == 3


def test_afd_executor_backend_and_transport_combinations_are_checked():
    with pytest.raises(ValueError, match="ray_address 'auto' joins a Ray cluster, but distributed_executor_backend "
                                         "'mp' runs the workers as local processes"):
        engine_config(afd="1A1F", distributed_executor_backend="mp", ray_address="auto")
    with pytest.raises(ValueError, match="distributed_executor_backend must be one of ray, mp, got 'threads'"):
        engine_config(afd="1A1F", distributed_executor_backend="threads")
    with pytest.raises(ValueError, match="afd_transport 'nccl' needs a GPU per worker .device 'cuda', 3 GPUs for "
                                         "afd 1A2F.; this is device 'cpu' with 0 GPU"):
        engine_config(afd="1A2F", afd_transport="nccl", device="cpu")


def test_afd_on_a_gpu_needs_local_processes_and_nccl_a_gpu_per_worker(monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match="afd on cuda runs its workers as local processes: add "
                                         "distributed_executor_backend 'mp'"):
        engine_config(afd="1A1F", device="cuda")
    assert engine_config(afd="1A1F", device="cuda", distributed_executor_backend="mp",
                         afd_transport="nccl").parallel.afd_transport == "nccl"
    with pytest.raises(ValueError, match="3 GPUs for afd 1A2F.; this is device 'cuda' with 2 GPU"):
        engine_config(afd="1A2F", device="cuda", distributed_executor_backend="mp", afd_transport="nccl")
    with pytest.raises(ValueError, match="this is device 'cuda:1' with 2 GPU"):  # one GPU named: no GPU per worker
        engine_config(afd="1A1F", device="cuda:1", distributed_executor_backend="mp", afd_transport="nccl")
