"""The OpenAI-compatible HTTP server over the swarm (python -m swarmtune.serve) and its swarm page."""
