"""AsyncEngine builds its LLMEngine on the engine thread, where every step runs: torch ops from one thread only, so
OpenMP keeps one thread team (a model loaded on another thread made the server ~35% slower). A constructor error
reaches the caller."""
import threading

import pytest

import afdserve.engine.async_engine as async_engine
from afdserve.engine.config import EngineConfig


class RecordingEngine:
    built_on: str | None = None
    stepped_on: set = set()

    def __init__(self, config):
        RecordingEngine.built_on = threading.current_thread().name
        self.tokenizer, self.max_model_len = None, 16
        self._pending = 0

    def has_unfinished(self) -> bool:
        return self._pending > 0

    def add_request(self, request_id, prompt, params) -> None:
        self._pending += 1

    def step(self):
        RecordingEngine.stepped_on.add(threading.current_thread().name)
        self._pending = 0
        return []

    def shutdown(self) -> None:
        pass


def test_engine_is_built_and_stepped_on_the_engine_thread(monkeypatch):
    monkeypatch.setattr(async_engine, "LLMEngine", RecordingEngine)
    engine = async_engine.AsyncEngine(EngineConfig())
    try:
        engine._commands.put(async_engine._Add("r", [1], None, stream=None))
        for _ in range(200):  # the engine thread picks the request up and steps
            if RecordingEngine.stepped_on:
                break
            threading.Event().wait(0.05)
        assert RecordingEngine.built_on == "afdserve-engine" != threading.current_thread().name
        assert RecordingEngine.stepped_on == {"afdserve-engine"}
        assert engine.max_model_len == 16 and engine.is_alive
    finally:
        engine.shutdown()


def test_a_failing_constructor_raises_in_the_caller(monkeypatch):
    def broken(config):
        raise ValueError("unsupported architecture 'Nope'")
    monkeypatch.setattr(async_engine, "LLMEngine", broken)
    with pytest.raises(ValueError, match="unsupported architecture"):
        async_engine.AsyncEngine(EngineConfig())
