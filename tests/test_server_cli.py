"""`python -m swarmtune.server`'s flags: their defaults are the config dataclasses' own, written once."""

from __future__ import annotations

import dataclasses

import pytest

from swarmtune.errors import UserError
from swarmtune.p2p import NetworkOptions
from swarmtune.server.__main__ import build_parser, config_from_args
from swarmtune.server.server import ServerConfig


def test_flags_default_to_the_config_dataclasses():
    config = config_from_args(build_parser().parse_args(["--model", "org/model", "--new-swarm", "--blocks", "0:1"]))
    expected = ServerConfig(model="org/model", blocks=(0, 1))
    for field in dataclasses.fields(ServerConfig):
        if field.name != "network":
            assert getattr(config, field.name) == getattr(expected, field.name), field.name
    assert (config.network.host, config.network.port) == (NetworkOptions.host, NetworkOptions.port)
    assert not config.network.public and config.network.initial_peers == []


def test_flags_reach_the_config():
    args = ["--model", "org/model", "--new-swarm", "--num-blocks", "3", "--cache-mb", "64", "--session-timeout", "5",
            "--max-batch", "2", "--activation-cache-mb", "0", "--fault", "delay=1"]
    config = config_from_args(build_parser().parse_args(args))
    assert config.blocks is None and config.num_blocks == 3 and config.cache_bytes == 64 << 20
    handler = config.handler
    assert handler.session_timeout == 5 and handler.limits.max_batch == 2 and handler.graph_bytes == 0
    assert handler.faults.delay == 1


def test_a_bad_fault_adapter_spec_or_address_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="lacks the peer id"):
        config_from_args(build_parser().parse_args(["--model", "org/model", "--blocks", "0:1", "--initial-peers",
                                                    "/ip4/127.0.0.1/tcp/1"]))
    with pytest.raises(UserError, match="--fault"):
        config_from_args(build_parser().parse_args(["--model", "org/model", "--new-swarm", "--blocks", "0:1",
                                                    "--fault", "explode"]))
    with pytest.raises(UserError, match="--adapters"):
        config_from_args(build_parser().parse_args(["--model", "org/model", "--new-swarm", "--blocks", "0:1",
                                                    "--adapters", f"x={tmp_path}/missing"]))
