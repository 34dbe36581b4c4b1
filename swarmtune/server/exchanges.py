"""Streams that carry requests answered one by one: a single large request, or a client's channel of them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from hivemind.proto import runtime_pb2

from swarmtune import wire
from swarmtune.server.admission import Gate, Handler, error_reply
from swarmtune.server.receiving import Intake
from swarmtune.server.requests import RequestError, need
from swarmtune.server.streams import Frames, drain, frame, read_message, replies


async def serve_one(gate: Gate, handler: Handler, requests: Frames, peer: str, timeout: float
                    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
    """One message, too large for a unary call, answered by `handler`."""
    intake = Intake(gate.receiving, peer, timeout)
    try:
        try:
            data = await asyncio.wait_for(
                read_message(requests, wire.Reassembler(gate.limits.max_message_bytes),
                             gate.message_check(peer, member=False), intake),
                timeout)
            need(data is not None, "the stream ended before a whole message arrived")
            reply = await gate.guarded(handler, data, peer, None)
            del data
        except asyncio.TimeoutError:
            reply = error_reply(intake.timed_out(f"no whole message within {timeout:.0f} s"), retry=True)
        except (RequestError, wire.WireError) as e:
            reply = await gate.refused(peer, e)
        for response in replies(reply):
            yield response
    finally:  # the request's bytes stay charged until its reply has gone
        intake.release()
    await drain(requests)


async def serve_channel(gate: Gate, handler: Handler, requests: Frames, peer: str, timeout: float
                        ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
    """A client's long-lived channel of requests, answered in order by `handler`.

    Reusing one stream saves opening a libp2p stream per request, and lets its flow-control
    window grow once instead of for every large request over a slow link.
    """
    reassembler = wire.Reassembler(gate.limits.max_message_bytes)
    check = None
    intake = Intake(gate.receiving, peer, timeout)
    try:
        while True:
            check = check or gate.message_check(peer, member=False)
            data = await asyncio.wait_for(read_message(requests, reassembler, check, intake), timeout)
            if data is None:
                return
            check = gate.message_check(peer)  # a member now: later messages only count toward its rate
            reply = await gate.guarded(handler, data, peer, None)
            del data
            for response in replies(reply):
                yield response
            intake.release()
    except asyncio.TimeoutError:  # idle: the client opens a new channel when it needs one
        if intake.short_of_room is not None:  # or stuck: say why
            yield frame(error_reply(intake.timed_out(f"no whole message within {timeout:.0f} s"), retry=True))
    except (RequestError, wire.WireError) as e:  # refused on a first frame, or the framing is broken
        yield frame(await gate.refused(peer, e))
        await drain(requests)
    finally:
        intake.release()
