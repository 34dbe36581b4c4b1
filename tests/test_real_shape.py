"""One Llama-2-70B-shaped block (hidden 8192, 1.7 GB in bf16) through a real server process: what
benchmarks/real_shape.py checks with four blocks and two servers (slow: about a minute, 4 GiB)."""

from __future__ import annotations

import pytest

from benchmarks import real_shape

pytestmark = pytest.mark.slow


def test_a_real_shaped_block_is_served_exactly_and_without_a_second_copy():
    shapes = real_shape.Shapes(blocks=1, servers=1, tokens=16, prompt=8, decode_steps=4, activation=(2, 256))
    rows = real_shape.run(shapes)
    failed = [(r.section, r.name, r.value, r.note) for r in rows if r.ok is False]
    assert not failed
    checked = {r.section for r in rows if r.check}
    assert checked == {"load", "memory", "forward", "backward", "decode", "stream"}
