"""The transports behind cluster/transport.py in two spawned processes (bench/transport.py, which is also
bench/gpu/transport_check.py's dry run on a CPU, gloo standing in for NCCL): one AFD layer's messages (bf16
activation, its fp8 wire form, int64 routing ids, fp32 weights, a bf16 result) arrive byte for byte over gloo and
shared memory, then round trips are timed; NCCL's row is skipped without two GPUs, and NCCL on a CPU device is
refused by name."""
import json

import pytest

from afdserve.bench.gpu import transport_check
from afdserve.bench.transport import run_transport_bench
from afdserve.cluster.transport import ProcessGroupTransport


def test_gpu_script_dry_run_checks_gloo_and_waits_for_two_gpus_for_nccl(tmp_path):
    out = tmp_path / "transport.json"
    rc = transport_check.main(["--transports", "gloo,nccl", "--device", "cpu", "--tokens", "8", "--hidden", "64",
                               "--top-k", "2", "--layers", "3", "--steps", "5", "--check-rounds", "3",
                               "--out", str(out)])
    rows = {row["transport"]: row for row in json.loads(out.read_text())["rows"]}
    assert rc == 0
    assert rows["gloo"]["bytes_checked"] and rows["gloo"]["mismatches"] == []
    assert rows["gloo"]["round_trip_us_median"] > 0
    assert "nccl needs one GPU per rank" in rows["nccl"]["skipped"]


def test_shared_memory_moves_every_message_kind_byte_for_byte():
    row = run_transport_bench("shm", steps=5, layers=3, tokens=8, hidden=64, dtype="bfloat16", top_k=2)
    assert row["bytes_checked"] and row["round_trip_us_median"] > 0


def test_nccl_on_a_cpu_device_is_refused_before_any_connection():
    with pytest.raises(ValueError, match="the nccl transport moves GPU tensors; this worker's device is cpu"):
        ProcessGroupTransport(0, 2, "tcp://127.0.0.1:1", backend="nccl", device="cpu")
    with pytest.raises(ValueError, match="runs gloo or nccl, got 'mpi'"):
        ProcessGroupTransport(0, 2, "tcp://127.0.0.1:1", backend="mpi")
