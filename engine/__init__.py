"""Engines run models: the Engine protocol, its request and output types, the runner around it.

`engine.llama_cpp_engine` (llama.cpp) and `engine.torch_engine` (torch) are imported where used.
"""

from engine.base import Engine
from engine.model_file import ModelFile, ModelFileError, load_model_file
from engine.runner import EngineRunner, QueueFull
from engine.types import (
    Chunk,
    ContextLengthExceeded,
    EngineLoadError,
    FinishReason,
    GenerationRequest,
    SamplingParams,
    Usage,
)

__all__ = [
    "Chunk",
    "ContextLengthExceeded",
    "Engine",
    "EngineLoadError",
    "EngineRunner",
    "FinishReason",
    "GenerationRequest",
    "ModelFile",
    "ModelFileError",
    "QueueFull",
    "SamplingParams",
    "Usage",
    "load_model_file",
]
