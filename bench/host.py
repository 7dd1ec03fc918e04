"""What machine a benchmark ran on, recorded in every result: the development machine's host CPU varies between
sessions (AMX, AVX-512 BF16 or only AVX2), and a bf16 number means little without it."""
from __future__ import annotations

import os
import platform

import torch

_ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def _cpu_model_and_flags() -> tuple[str, list[str]]:
    model, flags = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = [flag for flag in _ISA_FLAGS if flag in value.split()]
                    break
    except OSError:
        pass
    return model, flags


def host_info(device: str | torch.device = "cpu") -> dict:
    model, flags = _cpu_model_and_flags()
    info = {
        "cpu": model, "cpu_isa": flags, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "onednn_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"), "device": str(device),
    }
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = torch.version.cuda
    return info


def format_host(info: dict) -> str:
    gpu = f", {info['gpu']} (CUDA {info['cuda']})" if "gpu" in info else ""
    return (f"host: {info['cpu']} [{' '.join(info['cpu_isa']) or 'no AVX2'}], {info['cpu_count']} cores, torch "
            f"{info['torch']} ({info['torch_cpu_capability']}, {info['torch_threads']} threads){gpu}")
