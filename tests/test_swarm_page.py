"""The swarm page of the OpenAI-compatible server: its JSON, and in a headless browser, a killed server's gap.

A swarm of its own (one server is killed): blocks 0:3 held by two servers, 3:6 by one. The page is served
by uvicorn on 127.0.0.1 in a thread; the browser may contact nothing else.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
import types
import urllib.request

import fastapi
import pytest
import uvicorn

from swarmtune.api.swarm_page import Health, SwarmMonitor, public_id, swarm_router
from swarmtune.client.bans import Bans
from swarmtune.client.config import ClientConfig
from swarmtune.client.connection import SwarmConnection
from swarmtune.directory import SwarmView
from swarmtune.local_swarm import LocalSwarm
from swarmtune.records import ServerInfo

REFRESH_S = 2.0
MARGIN_S = 3.0  # beyond one refresh: the monitor's round (half a refresh), a failed ping, the browser's fetch


def test_servers_that_do_not_answer_pings_do_not_cover_their_blocks():
    """Coverage counts online records, less the servers whose latest ping failed (not yet pinged: counted)."""
    servers = [ServerInfo("peer-a", 0, 2), ServerInfo("peer-b", 2, 4), ServerInfo("peer-c", 2, 4),
               ServerInfo("peer-d", 0, 4, state="joining")]
    connection = types.SimpleNamespace(view=SwarmView(4, {s.peer_id: s for s in servers}), prefix="model",
                                       rtts={"peer-a": 0.02}, bans=Bans())
    monitor = SwarmMonitor(connection, period=1.0, ping_timeout=1.0)
    monitor.health = {"peer-a": Health(True, 0.01, time.monotonic()),
                      "peer-b": Health(False, None, time.monotonic(), "timeout after 1 s")}
    state = monitor.snapshot("org/model", 2.0)
    assert [(b["count"], b["servers"]) for b in state["blocks"]] == [(1, ["peer-a"])] * 2 + [(1, ["peer-c"])] * 2
    assert state["covered"] and state["model"]["num_blocks"] == 4 and state["model"]["model_id"] is None
    monitor.health["peer-c"] = Health(False, None, time.monotonic(), "P2PDaemonError: failed to dial")
    state = monitor.snapshot("org/model", 2.0)
    assert not state["covered"] and state["uncovered_blocks"] == [2, 3]
    assert [b["covered"] for b in state["blocks"]] == [True, True, False, False]
    rows = {x["peer_id"]: x for x in state["servers"]}
    assert rows["peer-a"]["reachable"] and rows["peer-a"]["covering"] and rows["peer-a"]["client_rtt_ms"] == 20.0
    assert rows["peer-b"]["reachable"] is False and not rows["peer-b"]["covering"] and rows["peer-b"]["ping_error"]
    assert rows["peer-d"]["reachable"] is None and not rows["peer-d"]["covering"]  # joining: not serving yet
    json.dumps(state)  # what the endpoint returns must be plain JSON


@pytest.fixture(scope="module")
def swarm(tiny_llama):
    # an announced throughput: measuring it would cost each server seconds of start-up
    with LocalSwarm(tiny_llama, spans=[(0, 3), (0, 3), (3, 6)], throughput=100.0) as swarm:
        yield swarm


@pytest.fixture(scope="module")
def page_url(swarm, tiny_llama):
    """The app's address: uvicorn serving the router, over a SwarmConnection, on a socket bound here."""
    connection = SwarmConnection(ClientConfig(initial_peers=swarm.initial_peers), swarm.dht_prefix)
    app = fastapi.FastAPI()
    app.include_router(swarm_router(connection, tiny_llama, refresh_s=REFRESH_S))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start within 20 s"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()
        connection.close()
        assert not thread.is_alive(), "uvicorn did not stop within 15 s"


def get_swarm(page_url: str) -> dict:
    with urllib.request.urlopen(page_url + "api/swarm", timeout=10) as reply:
        return json.load(reply)


def wait_json(page_url: str, ok, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        state = get_swarm(page_url)
        if ok(state):
            return state
        assert time.monotonic() < deadline, f"not within {timeout:.0f} s: {json.dumps(state, indent=1)}"
        time.sleep(0.2)


def test_the_json_shows_every_block_covered_and_every_server(swarm, page_url, tiny_llama):
    # once every server answered a ping and the model records were read
    state = wait_json(page_url, lambda s: s["servers"] and all(x["reachable"] for x in s["servers"])
                      and s["model"]["model_id"], 30)
    assert state["refresh_s"] == REFRESH_S and abs(state["time"] - time.time()) < 60
    local = os.path.basename(tiny_llama)  # the servers announce their checkpoint's path: only its name is shown
    assert state["model"] == {"name": tiny_llama, "dht_prefix": swarm.dht_prefix, "num_blocks": 6,
                              "model_id": local, "model_type": "llama"}
    assert state["models"] == [{"dht_prefix": swarm.dht_prefix, "num_blocks": 6, "model_id": local,
                                "model_type": "llama"}]
    assert state["covered"] and state["uncovered_blocks"] == []
    held = {s.peer_id: s.span for s in swarm.servers}
    assert [b["count"] for b in state["blocks"]] == [2, 2, 2, 1, 1, 1]
    for b in state["blocks"]:
        assert b["covered"] and all(held[p][0] <= b["block"] < held[p][1] for p in b["servers"])
    assert {x["peer_id"]: (x["start"], x["end"]) for x in state["servers"]} == held
    for x in state["servers"]:
        assert x["state"] == "online" and x["covering"] and x["ping_ms"] > 0 and x["dtype"] and x["version"]
        assert x["cache_tokens_left"] >= 0 and x["throughput"] > 0 and x["expires_in_s"] > 0


def test_public_ids_name_no_local_path(tmp_path, monkeypatch):
    assert public_id("meta-llama/Llama-2-70b-hf") == "meta-llama/Llama-2-70b-hf"
    assert public_id("gpt2") == "gpt2"
    for path in ("/home/me/ckpt/llama-6-64", "./llama-6-64", "../x/llama-6-64/", "C:\\models\\llama-6-64"):
        assert public_id(path) == "llama-6-64"
    (tmp_path / "a" / "llama-6-64").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert public_id("a/llama-6-64") == "llama-6-64"  # relative, but a directory here: not a hub id


def test_the_page_arrives_with_data_and_fits_1280_px(swarm, page_url, tmp_path):
    """The first paint shows the swarm (its state is in the HTML; JavaScript off here), and at 1280 px the
    server table fits the window, long fields cut with their full text on hover."""
    with urllib.request.urlopen(page_url, timeout=10) as reply:
        html = reply.read().decode()
    assert "loading" not in html and html.count('class="block"') == 6 and html.count("<tr data-peer=") == 3
    assert 'data-covered="true"' in html and "every block is served" in html
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium is not on PATH (Debian: apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True)
        try:
            for javascript in (False, True):
                page = browser.new_context(java_script_enabled=javascript,
                                           viewport={"width": 1280, "height": 600}).new_page()
                page.goto(page_url, timeout=15_000)
                assert page.locator("#coverage .block").count() == 6
                assert page.locator("#servers tbody tr").count() == 3
                table = page.evaluate("[document.querySelector('#servers').getBoundingClientRect().right, "
                                      "document.documentElement.clientWidth, document.documentElement.scrollWidth]")
                assert table[0] <= table[1] and table[2] <= table[1], table
                cut = page.evaluate("[...document.querySelectorAll('#servers td')].filter(td => "
                                    "td.scrollWidth > td.clientWidth && td.title !== td.textContent).length")
                assert cut == 0  # whatever an ellipsis cuts is in the title
                page.screenshot(path=str(tmp_path / f"swarm-page-1280-js-{javascript}.png"), full_page=True)
        finally:
            browser.close()
    if os.environ.get("SWARMTUNE_TEST_ARTIFACTS"):
        os.makedirs(os.environ["SWARMTUNE_TEST_ARTIFACTS"], exist_ok=True)
        shutil.copy(tmp_path / "swarm-page-1280-js-True.png", os.environ["SWARMTUNE_TEST_ARTIFACTS"])


def test_the_page_shows_a_killed_servers_gap_within_a_refresh(swarm, page_url, tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium is not on PATH (Debian: apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    wait_json(page_url, lambda s: s["covered"] and all(x["reachable"] for x in s["servers"]), 30)
    outside: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 500})

            def local_only(route):
                if route.request.url.startswith("http://127.0.0.1:"):
                    route.continue_()
                else:
                    outside.append(route.request.url)
                    route.abort()

            page.route("**/*", local_only)
            page.goto(page_url, timeout=15_000)
            blocks = page.locator("#coverage .block")
            page.wait_for_function("document.querySelectorAll('#coverage .block[data-covered=true]').length == 6",
                                   timeout=10_000)
            assert blocks.count() == 6
            assert page.locator("#summary").get_attribute("data-covered") == "true"
            assert page.locator("#servers tbody tr[data-reachable=true]").count() == 3

            victim = next(s for s in swarm.servers if s.span == (3, 6))
            killed = time.monotonic()
            victim.kill()  # SIGKILL, by PID, the server and its p2pd: its "online" record outlives it
            page.wait_for_function(
                "[3, 4, 5].every(b => document.querySelector(`.block[data-block='${b}']`).dataset.covered == 'false')",
                timeout=(REFRESH_S + MARGIN_S) * 1000)
            took = time.monotonic() - killed
            print(f"the page showed the gap {took:.2f} s after the kill")
            assert [blocks.nth(b).get_attribute("data-covered") for b in range(3)] == ["true"] * 3
            assert page.locator("#summary").get_attribute("data-uncovered") == "3,4,5"
            row = page.locator(f"#servers tbody tr[data-peer='{victim.peer_id}']")
            assert row.get_attribute("data-reachable") == "false"  # its record still says online
            shot = tmp_path / "swarm-page-gap.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    if os.environ.get("SWARMTUNE_TEST_ARTIFACTS"):
        os.makedirs(os.environ["SWARMTUNE_TEST_ARTIFACTS"], exist_ok=True)
        shutil.copy(shot, os.environ["SWARMTUNE_TEST_ARTIFACTS"])
    assert not outside, f"the page contacted more than 127.0.0.1: {outside}"
    state = get_swarm(page_url)
    assert state["uncovered_blocks"] == [3, 4, 5] and not state["covered"]
    gone = next(x for x in state["servers"] if x["peer_id"] == victim.peer_id)
    assert gone["state"] == "online" and gone["reachable"] is False and not gone["covering"]
