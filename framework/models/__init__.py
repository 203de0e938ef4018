"""Finding, converting and loading models."""
from tokenmill.models.loader import LoadedModel, load_model
from tokenmill.models.resolve import ALIASES, cache_dir, resolve_model

__all__ = ["ALIASES", "LoadedModel", "cache_dir", "load_model", "resolve_model"]
