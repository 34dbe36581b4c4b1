"""Hydra configs of swarmtune (installed as swarmtune.conf; a package so pkg:// search paths find it)."""
