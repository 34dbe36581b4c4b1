"""Model families: building, running and loading spans of decoder blocks and the client-side parts."""

from swarmtune.models.checkpoint import (
    CheckpointError,
    ClientParts,
    load_client_parts,
    load_config,
    load_span,
    parse_dtype,
)
from swarmtune.models.family import Family
from swarmtune.models.kv_cache import SpanKVCache
from swarmtune.models.registry import get_family, supported_model_types
from swarmtune.models.span import SpanModel

__all__ = ["CheckpointError", "ClientParts", "Family", "SpanKVCache", "SpanModel", "get_family",
           "load_client_parts", "load_config", "load_span", "parse_dtype", "supported_model_types"]
