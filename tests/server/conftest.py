"""`api_server`: one real server process per session, shared by the HTTP test files. Tests that need a process
of their own (an API key, SIGTERM) start one with `ServerProcess`."""
from __future__ import annotations

import pytest

from .server_process import ServerProcess


@pytest.fixture(scope="session")
def api_server(smollm2_dir, tmp_path_factory):
    # 512 blocks x 16 tokens: room for the 128-client load test with the context capped at MAX_MODEL_LEN.
    with ServerProcess(smollm2_dir, tmp_path_factory.mktemp("api-server") / "server.log",
                       "--num-kv-blocks", "512") as server:
        yield server
