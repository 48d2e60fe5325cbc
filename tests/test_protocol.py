"""The wire protocol in memory: every request round-trips; no bytes make decode crash."""

from __future__ import annotations

import json
import random

import pytest

from syscalls import protocol, replies


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
        protocol.encode(replies.ErrorReply(1, "y" * protocol.MAX_MESSAGE))
    assert json.loads(protocol.encode(replies.ErrorReply(1, "m")))["errno"] == 1


GRANT = replies.ForkGrant(role="init", fds=["ns:user", "root"], id=2, new_pid_ns=True,
                          proc_paths=[{"path": "proc", "mnt_id": 7, "params": [], "attrs": 0}],
                          keyring={"name": "k", "serial": 9, "owner": 0})


@pytest.mark.parametrize("reply", [
    replies.Reply(), replies.Created(2), replies.Created(3, plan=GRANT), GRANT,
    replies.Reported(12),
    replies.ContainerList([replies.ContainerStatus(2, "a", 0, 0, 0, 1, "running", 5, None,
                                                   [5, 6], False)]),
    replies.NamespaceFds(["user", "net"], pid_pending=True), replies.Mounted(pid_born=True),
    replies.Staged(4), replies.Intercepting(0), replies.Removed(2), replies.Instantiated(8),
    replies.KeyRequest("request", 1, 2, "create", "user", "d", "c", 0, 0, 9),
    replies.UpcallReply(action="reject", reject_errno=13, timeout_ms=5),
])
def test_reply_round_trip(reply: replies.Reply) -> None:
    assert replies.decode(protocol.encode(reply), type(reply)) == reply


def test_an_error_is_an_error_whatever_was_asked() -> None:
    got = replies.decode(protocol.encode(protocol.error_reply(13, "no")), replies.Created)
    assert got == replies.ErrorReply(13, "no")


@pytest.mark.parametrize("cls,data", [
    (replies.Created, b"{}"), (replies.Created, b'{"id": "2"}'), (replies.Created, b'{"id": true}'),
    (replies.Created, b'{"id": 2, "plan": {"role": "init"}}'), (replies.Created, b"[]"),
    (replies.Reported, b'{"pid": 1, "extra": 0}'), (replies.ForkGrant, b'{"role": "x", "fds": "ab", "id": 1}'),
    (replies.ContainerList, b'{"containers": [{"id": 1}]}'), (replies.Mounted, b'{"pid_born": 1}'),
    (replies.Reply, b"not json"), (replies.ErrorReply, b'{"errno": "x", "message": "m"}'),
])
def test_malformed_reply_is_protocol_error(cls: type[replies.Reply], data: bytes) -> None:
    with pytest.raises(protocol.ProtocolError):
        replies.decode(data, cls)
