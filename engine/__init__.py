"""afdserve's engine: requests, scheduler, KV block manager, sampler, executors, and the offline/online APIs."""
from afdserve.engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from afdserve.engine.llm import LLM
from afdserve.engine.outputs import CompletionOutput, RequestOutput
from afdserve.engine.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "EngineConfig", "ModelConfig",
           "CacheConfig", "SchedulerConfig"]
