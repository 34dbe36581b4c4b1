"""swarmtune: fine-tune and run large language models whose frozen blocks are served by a swarm."""

from swarmtune.version import __version__

_EXPORTS = {
    "SwarmForCausalLM": "swarmtune.client.model",
    "ClientConfig": "swarmtune.client.config",
    "LocalSwarm": "swarmtune.swarm",
}


def __getattr__(name: str):
    """Import the heavy parts (torch, hivemind) only when they are used."""
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'swarmtune' has no attribute {name!r}")


__all__ = ["ClientConfig", "LocalSwarm", "SwarmForCausalLM", "__version__"]
