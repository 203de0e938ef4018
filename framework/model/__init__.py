"""``tokenmill.model``: everything between a :class:`ForwardBatch` and logits — architectures, attention
backends, kernels, and finding and loading models."""
from tokenmill.model.archs import supported_model_types
from tokenmill.model.batch import ForwardBatch, build_batch
from tokenmill.model.loader import LoadedModel, load_model
from tokenmill.model.resolve import ALIASES, cache_dir, resolve_model
from tokenmill.model.runner import ModelRunner, RunnerOutput

__all__ = ["ALIASES", "ForwardBatch", "LoadedModel", "ModelRunner", "RunnerOutput", "build_batch", "cache_dir",
           "load_model", "resolve_model", "supported_model_types"]
