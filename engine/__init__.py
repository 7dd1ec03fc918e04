"""afdserve's engine: requests, scheduler, KV block manager, sampler, executors, and the offline/online APIs."""
from engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from engine.llm import LLM
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "EngineConfig", "ModelConfig",
           "CacheConfig", "SchedulerConfig"]
