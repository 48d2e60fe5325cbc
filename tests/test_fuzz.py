"""A bounded fuzz of the control protocol (bench/fuzz_protocol.py runs the long one): every
message gets an error reply or a closed connection, the service keeps serving, and it holds no
more fds than it did before."""

from __future__ import annotations

from bench import fuzz_protocol
from syscalls import protocol

from .conftest import ServiceUnderTest

MESSAGES = 2000
SEED = 13


def test_fuzz_protocol(service: ServiceUnderTest) -> None:
    r = fuzz_protocol.run(service.proc, service.socket, service.log, MESSAGES, SEED,
                          handle_share=0.3)
    f = r.found
    assert not r.crashes, "\n".join(r.crashes[:20])
    assert service.alive()
    # It covered what it claims to: every op, every kind of fd, every outcome.
    assert set(f.ops) >= set(protocol.REQUESTS), set(protocol.REQUESTS) - set(f.ops)
    assert set(f.fd_kinds) >= {*fuzz_protocol.FD_KINDS, "handle"}
    assert f.sent >= MESSAGES and f.closed and f.silent and f.successes
    # What the service makes lazily was made before the first count (run() creates, forks and
    # kills once first). At the end it holds what it held: a dead container keeps no fd.
    assert not r.leaks, r.leaks
    assert r.containers > 0 and r.roots == 0
    assert r.fds[1] == r.fds[0]
