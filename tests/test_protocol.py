"""The wire protocol in memory: every request round-trips; no bytes make decode crash."""

from __future__ import annotations

import json
import random

import pytest

from syscalls import protocol


@pytest.mark.parametrize("req", [
    protocol.Create(name="a\udcff", flags=0x1ff), protocol.Fork(), protocol.Started(pid=7),
    protocol.ForkFailed(errno=5), protocol.Status(), protocol.Kill(id=3), protocol.List(),
])
def test_round_trip(req: protocol.Request) -> None:
    assert protocol.decode_request(protocol.encode(req)) == req


@pytest.mark.parametrize("data", [
    b"", b"\x00", b"\xff\xfe", b"null", b"[]", b"{}", b'{"op": 1}', b'{"op": "nope"}',
    b'{"op": "create", "name": "x"}', b'{"op": "create", "name": "x", "flags": "1"}',
    b'{"op": "create", "name": "x", "flags": true}', b'{"op": "kill", "id": 1.5}',
    b'{"op": "started", "pid": 1, "extra": 2}', b"[" * 100000, b'{"op": "list"' * 3,
    b'{"op": ["list"]}', b'{"op": {"list": 1}}', b'{"op": "create", "name": "\\ud800", "flags": 0}',
    b'{"op": "create", "name": "a\\u0000", "flags": 0}', b'{"op": "mount_at", "path": "\\udfffx"}',
])
def test_malformed_is_protocol_error(data: bytes) -> None:
    with pytest.raises(protocol.ProtocolError):
        protocol.decode_request(data)


def test_random_bytes_never_crash() -> None:
    rng = random.Random(1234)
    valid = protocol.encode(protocol.Create(name="x", flags=1))
    for _ in range(3000):
        data = bytearray(valid)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        try:
            req = protocol.decode_request(bytes(data))
        except protocol.ProtocolError:
            continue
        assert isinstance(req, protocol.Request)


def test_oversized_message_refused() -> None:
    with pytest.raises(protocol.ProtocolError):
        protocol.encode({"x": "y" * protocol.MAX_MESSAGE})
    assert json.loads(protocol.encode({"errno": 1}))["errno"] == 1
