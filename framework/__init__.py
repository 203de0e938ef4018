"""tokenmill: a pure-PyTorch LLM inference framework assembled from pluggy plugins and YAML pipelines."""
from tokenmill.engine.outputs import RequestOutput, StreamChunk
from tokenmill.errors import ModelLoadError, PipelineError, RequestError
from tokenmill.params import SamplingParams
from tokenmill.pipeline import Pipeline
from tokenmill.plugin import Plugin, hookimpl
from tokenmill.spec import PipelineSpec, load_spec

__version__ = "0.1.0"
__all__ = [
    "ModelLoadError", "Pipeline", "PipelineError", "PipelineSpec", "Plugin", "RequestError", "RequestOutput",
    "SamplingParams", "StreamChunk", "__version__", "hookimpl", "load_spec",
]
