from swarmtune.version import __version__  # noqa: F401
