"""container_socket and socketns on the real kernel: sockets in a container's network namespace."""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any, Self

import pytest

import syscalls
from syscalls import (
    CONTAINER_NEW_NET_NS,
    CONTAINER_NEW_PID_NS,
    CONTAINER_NEW_UTS_NS,
    linux,
    container_create,
    container_socket,
    socketns,
)

from .conftest import OTHER_GID, OTHER_UID, child_result, in_container, run_as

# ---- minimal rtnetlink, written out with struct ---------------------------------------------

_NLMSGHDR = struct.Struct("=IHHII")    # len, type, flags, seq, pid
_IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
_RTATTR = struct.Struct("=HH")         # len, type
NLMSG_ERROR, NLMSG_DONE = 2, 3
RTM_NEWLINK, RTM_GETLINK = 16, 18
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x4, 0x300
IFLA_IFNAME = 3
IFF_UP = 0x1
SIOCGSKNS = 0x894C  # the network namespace of a socket, as an fd


def _rtnl_request(sock: socket.socket, msg_type: int, flags: int, index: int = 0,
                  ifi_flags: int = 0, change: int = 0) -> list[tuple[int, bytes]]:
    """Send one rtnetlink request; return the (type, payload) answers up to DONE or the ack."""
    body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, ifi_flags, change)
    sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(body), msg_type, flags, 1, 0) + body)
    out: list[tuple[int, bytes]] = []
    while True:
        data = sock.recv(65536)
        pos = 0
        while pos + _NLMSGHDR.size <= len(data):
            length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, pos)
            payload = data[pos + _NLMSGHDR.size:pos + length]
            pos += (length + 3) & ~3
            if kind == NLMSG_DONE:
                return out
            if kind == NLMSG_ERROR:
                (err,) = struct.unpack_from("=i", payload)
                if err:
                    raise OSError(-err, os.strerror(-err))
                return out  # the ack
            out.append((kind, payload))


def rtnl_links(fd: int) -> dict[str, tuple[int, int]]:
    """{name: (index, flags)} of every link, by an RTM_GETLINK dump on netlink socket `fd`."""
    sock = socket.socket(fileno=os.dup(fd))
    try:
        links = {}
        for kind, payload in _rtnl_request(sock, RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP):
            if kind != RTM_NEWLINK:
                continue
            _family, _type, index, flags, _change = _IFINFOMSG.unpack_from(payload)
            pos = _IFINFOMSG.size
            while pos + _RTATTR.size <= len(payload):
                length, attr = _RTATTR.unpack_from(payload, pos)
                if attr == IFLA_IFNAME:
                    name = payload[pos + _RTATTR.size:pos + length].rstrip(b"\0").decode()
                    links[name] = (index, flags)
                pos += (length + 3) & ~3
        return links
    finally:
        sock.close()


def rtnl_set_up(fd: int, index: int) -> None:
    """RTM_NEWLINK with IFF_UP for link `index`; raises the kernel's errno if refused."""
    sock = socket.socket(fileno=os.dup(fd))
    try:
        _rtnl_request(sock, RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, index, IFF_UP, IFF_UP)
    finally:
        sock.close()


def route_socket(cfd: int) -> int:
    return container_socket(cfd, socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)


def bring_up_lo(cfd: int) -> None:
    nl = route_socket(cfd)
    try:
        rtnl_set_up(nl, rtnl_links(nl)["lo"][0])
    finally:
        os.close(nl)


def netns_of(fd: int) -> int:
    """The inode of the network namespace socket `fd` lives in."""
    nsfd = fcntl.ioctl(fd, SIOCGSKNS)
    try:
        return os.fstat(nsfd).st_ino
    finally:
        os.close(nsfd)


def own_netns() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


def run_inside(cfd: int, fn: Callable[[], Any]) -> Any:
    """Run `fn` in a process forked into the container; it must exit 0."""
    pid, got = in_container(cfd, fn)
    assert child_result(pid) == 0
    return got


# ---- the socket lives in the container ------------------------------------------------------

def test_tcp_listener_reached_from_inside_only(service: Any) -> None:
    cfd = container_create("tcp", CONTAINER_NEW_NET_NS | CONTAINER_NEW_PID_NS)
    bring_up_lo(cfd)
    listener = socket.socket(fileno=container_socket(cfd, socket.AF_INET, socket.SOCK_STREAM, 0))
    with listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with socket.socket() as host, pytest.raises(ConnectionRefusedError):
            host.connect(("127.0.0.1", port))

        def connect() -> list[Any]:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"from inside")
                return [own_netns(), s.getsockname()[1]]

        inside_ns, inside_port = run_inside(cfd, connect)
        conn, peer = listener.accept()
        with conn:
            assert conn.recv(64) == b"from inside"
        assert peer == ("127.0.0.1", inside_port)
        assert netns_of(listener.fileno()) == inside_ns != own_netns()
    os.close(cfd)


def test_netlink_lists_links_and_brings_lo_up(service: Any) -> None:
    cfd = container_create("nl", CONTAINER_NEW_NET_NS)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as host:
        host_before = rtnl_links(host.fileno())
    nl = route_socket(cfd)
    links = rtnl_links(nl)
    assert list(links) == ["lo"]
    assert not links["lo"][1] & IFF_UP  # a new network namespace's lo starts down
    rtnl_set_up(nl, links["lo"][0])
    assert rtnl_links(nl)["lo"][1] & IFF_UP
    os.close(nl)

    def seen_inside() -> Any:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as s:
            return rtnl_links(s.fileno())

    inside = run_inside(cfd, seen_inside)
    assert list(inside) == ["lo"] and inside["lo"][1] & IFF_UP
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as host:
        assert rtnl_links(host.fileno()) == host_before
    assert len(host_before) > 1  # the host's links are not the container's
    os.close(cfd)


def test_two_containers_are_isolated(service: Any) -> None:
    a = container_create("a", CONTAINER_NEW_NET_NS)
    b = container_create("b", CONTAINER_NEW_NET_NS)
    bring_up_lo(a)
    bring_up_lo(b)
    la = socket.socket(fileno=container_socket(a, socket.AF_INET, socket.SOCK_STREAM, 0))
    lb = socket.socket(fileno=container_socket(b, socket.AF_INET, socket.SOCK_STREAM, 0))
    ca = socket.socket(fileno=container_socket(a, socket.AF_INET, socket.SOCK_STREAM, 0))
    cb = socket.socket(fileno=container_socket(b, socket.AF_INET, socket.SOCK_STREAM, 0))
    with la, lb, ca, cb:
        la.bind(("127.0.0.1", 0))
        la.listen()
        port = la.getsockname()[1]
        lb.bind(("127.0.0.1", port))  # the same address is free in b: no EADDRINUSE
        with pytest.raises(ConnectionRefusedError):
            cb.connect(("127.0.0.1", port))
        ca.connect(("127.0.0.1", port))
        assert netns_of(la.fileno()) == netns_of(ca.fileno()) != netns_of(lb.fileno())
        assert netns_of(lb.fileno()) == netns_of(cb.fileno())
    os.close(a)
    os.close(b)


def test_socketns_and_container_socket_agree(service: Any) -> None:
    cfd = container_create("ns", CONTAINER_NEW_NET_NS)
    r, w = os.pipe()
    init = syscalls.fork_into_container(cfd)
    if init == 0:
        os.close(w)
        os.read(r, 1)  # stay alive until told
        os._exit(0)
    os.close(r)
    nsfd = os.open(f"/proc/{init}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        a = socketns(nsfd, socket.AF_INET, socket.SOCK_DGRAM, 0)
        b = container_socket(cfd, socket.AF_INET, socket.SOCK_DGRAM, 0)
        assert netns_of(a) == netns_of(b) == os.fstat(nsfd).st_ino != own_netns()
        os.close(a)
        os.close(b)
        host = socketns(os.open("/proc/self/ns/net", os.O_RDONLY), socket.AF_INET,
                        socket.SOCK_DGRAM, 0)
        assert netns_of(host) == own_netns()
        os.close(host)
    finally:
        os.close(nsfd)
        os.close(w)
    assert child_result(init) == 0
    os.close(cfd)


def test_works_while_init_runs_and_in_host_netns(service: Any) -> None:
    # Without CONTAINER_NEW_NET_NS the container's network namespace is its creator's.
    cfd = container_create("plain", CONTAINER_NEW_UTS_NS)
    fd = container_socket(cfd, socket.AF_INET, socket.SOCK_STREAM, 0)
    assert netns_of(fd) == own_netns()
    os.close(fd)
    os.close(cfd)


# ---- the caller stays where it is ----------------------------------------------------------

class NetnsSampler(threading.Thread):
    """Samples its own and the main thread's network namespace until stopped."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.main_tid = threading.get_native_id()
        self.stop = threading.Event()
        self.seen: set[int] = set()
        self.samples = 0

    def run(self) -> None:
        main = f"/proc/self/task/{self.main_tid}/ns/net"
        while not self.stop.is_set():
            self.seen.add(os.stat("/proc/thread-self/ns/net").st_ino)
            self.seen.add(os.stat(main).st_ino)
            self.samples += 1

    def __enter__(self) -> Self:
        self.start()
        while not self.samples:
            time.sleep(0.001)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.join()


def test_callers_netns_never_changes(service: Any) -> None:
    before = own_netns()
    # The sampler can see a change when there is one: the main thread in another namespace.
    saved = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    with NetnsSampler() as bad:
        linux.unshare(linux.CLONE_NEWNET)
        time.sleep(0.02)
        linux.setns(saved, linux.CLONE_NEWNET)
    os.close(saved)
    assert len(bad.seen) == 2

    cfd = container_create("still", CONTAINER_NEW_NET_NS)
    nsfd_holder = container_socket(cfd, socket.AF_INET, socket.SOCK_DGRAM, 0)
    nsfd = fcntl.ioctl(nsfd_holder, SIOCGSKNS)
    with NetnsSampler() as sampler:
        for _ in range(100):
            os.close(container_socket(cfd, socket.AF_INET, socket.SOCK_STREAM, 0))
            os.close(socketns(nsfd, socket.AF_INET6, socket.SOCK_DGRAM, 0))
            with pytest.raises(OSError):  # failures, too, leave nothing behind
                container_socket(cfd, 12345, socket.SOCK_STREAM, 0)
    assert sampler.samples > 100
    assert sampler.seen == {before}
    assert own_netns() == before
    os.close(nsfd)
    os.close(nsfd_holder)
    os.close(cfd)


# ---- flags and errors -----------------------------------------------------------------------

@pytest.mark.parametrize("flags", [0, socket.SOCK_CLOEXEC, socket.SOCK_NONBLOCK,
                                   socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK])
def test_cloexec_and_nonblock(service: Any, flags: int) -> None:
    cfd = container_create("flags", CONTAINER_NEW_NET_NS)
    fds = [container_socket(cfd, socket.AF_INET, socket.SOCK_STREAM | flags, 0)]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        own = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        fds.append(socketns(own, socket.AF_INET, socket.SOCK_STREAM | flags, 0))
        os.close(own)
        assert probe.fileno() >= 0
    for fd in fds:
        assert bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC) == bool(
            flags & socket.SOCK_CLOEXEC)
        assert bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK) == bool(
            flags & socket.SOCK_NONBLOCK)
        s = socket.socket(fileno=fd)
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE) == socket.SOCK_STREAM
        s.close()
    os.close(cfd)


@pytest.mark.parametrize("fd_kind, domain, type_, proto, err", [
    ("closed", socket.AF_INET, socket.SOCK_STREAM, 0, errno.EBADF),
    ("closed", 12345, 99, 0, errno.EBADF),                 # the fd is checked first
    ("file", socket.AF_INET, socket.SOCK_STREAM, 0, errno.EINVAL),
    ("pipe", socket.AF_INET, socket.SOCK_STREAM, 0, errno.EINVAL),
    ("pipe", 12345, socket.SOCK_STREAM, 0, errno.EINVAL),
    ("handle", 12345, socket.SOCK_STREAM, 0, errno.EAFNOSUPPORT),
    ("handle", -1, socket.SOCK_STREAM, 0, errno.EAFNOSUPPORT),
    ("handle", socket.AF_INET, 99, 0, errno.EINVAL),
    ("handle", socket.AF_INET, socket.SOCK_STREAM | 0x40000000, 0, errno.EINVAL),
    ("handle", socket.AF_INET, socket.SOCK_STREAM, 99, errno.EPROTONOSUPPORT),
    ("handle", socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_TCP, errno.EPROTONOSUPPORT),
])
def test_errors(service: Any, tmp_path: Any, fd_kind: str, domain: int, type_: int, proto: int,
                err: int) -> None:
    cfd = container_create("err", CONTAINER_NEW_NET_NS)
    r, w = os.pipe()
    path = tmp_path / "f"
    path.write_bytes(b"")
    fd = {"closed": 999, "file": os.open(path, os.O_RDONLY), "pipe": r, "handle": cfd}[fd_kind]
    with pytest.raises(OSError) as info:
        container_socket(fd, domain, type_, proto)
    assert info.value.errno == err
    for x in {r, w, cfd, fd} - {999}:
        os.close(x)


def test_dead_container_is_ecanceled(service: Any) -> None:
    cfd = container_create("dead", CONTAINER_NEW_NET_NS)
    pid = syscalls.fork_into_container(cfd)
    if pid == 0:
        os._exit(0)
    syscalls.container_wait(cfd)
    assert child_result(pid) == 0
    with pytest.raises(OSError) as info:
        container_socket(cfd, socket.AF_INET, socket.SOCK_STREAM, 0)
    assert info.value.errno == errno.ECANCELED
    os.close(cfd)


def test_socketns_errors(service: Any, tmp_path: Any) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"")
    uts = os.open("/proc/self/ns/uts", os.O_RDONLY)
    plain = os.open(path, os.O_RDONLY)
    net = os.open("/proc/self/ns/net", os.O_RDONLY)
    for fd, err in [(999, errno.EBADF), (uts, errno.EINVAL), (plain, errno.EINVAL)]:
        with pytest.raises(OSError) as info:
            socketns(fd, socket.AF_INET, socket.SOCK_STREAM, 0)
        assert info.value.errno == err
    with pytest.raises(OSError) as info:
        socketns(net, 12345, socket.SOCK_STREAM, 0)
    assert info.value.errno == errno.EAFNOSUPPORT
    for fd in (uts, plain, net):
        os.close(fd)


# ---- users and privilege --------------------------------------------------------------------

def test_unprivileged_owner_gets_sockets_inside(service: Any) -> None:
    got = run_as(OTHER_UID, OTHER_GID, """
        import fcntl, socket, syscalls
        from tests.test_sockets import rtnl_links, rtnl_set_up, netns_of
        cfd = syscalls.container_create("mine", syscalls.CONTAINER_NEW_USER_NS
                                        | syscalls.CONTAINER_NEW_NET_NS)
        nl = syscalls.container_socket(cfd, socket.AF_NETLINK, socket.SOCK_RAW,
                                       socket.NETLINK_ROUTE)
        links = rtnl_links(nl)
        rtnl_set_up(nl, links["lo"][0])
        fd = syscalls.container_socket(cfd, socket.AF_INET, socket.SOCK_STREAM
                                       | socket.SOCK_NONBLOCK, 0)
        flags = [bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC),
                 bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK)]
        listener = socket.socket(fileno=fd)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        # Root inside its own user namespace: a raw socket, as entering would give.
        raw = syscalls.container_socket(cfd, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        # socketns on the namespace's fd: enters its owning user namespace the same way.
        nsfd = fcntl.ioctl(nl, 0x894C)  # SIOCGSKNS: the owner holds CAP_NET_ADMIN over it
        via_ns = syscalls.socketns(nsfd, socket.AF_PACKET, socket.SOCK_RAW, 0)
        r, w = os.pipe()
        pid = syscalls.fork_into_container(cfd)
        if pid == 0:
            try:
                c = socket.create_connection(("127.0.0.1", port), timeout=5)
                c.sendall(b"hi")
                os.write(w, str(os.stat("/proc/self/ns/net").st_ino).encode())
            finally:
                os._exit(0)
        os.close(w)
        inside = int(os.read(r, 64))
        conn, _ = listener.accept()
        data = conn.recv(16)
        os.waitpid(pid, 0)
        host = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        return {"links": sorted(links), "data": data.decode(), "flags": flags,
                "same_ns": [netns_of(x) == inside for x in (nl, listener.fileno(), raw, via_ns)],
                "host_links": len(rtnl_links(host.fileno())),
                "own_ns": os.stat("/proc/self/ns/net").st_ino != inside}
    """)
    assert got["links"] == ["lo"]
    assert got["data"] == "hi"
    assert got["flags"] == [False, True]
    assert got["same_ns"] == [True, True, True, True]
    assert got["host_links"] > 1 and got["own_ns"]


def test_other_users_handle_is_eperm(service: Any) -> None:
    cfd = container_create("root-owned", CONTAINER_NEW_NET_NS)
    holder = container_socket(cfd, socket.AF_INET, socket.SOCK_DGRAM, 0)
    nsfd = fcntl.ioctl(holder, SIOCGSKNS)
    got = run_as(OTHER_UID, OTHER_GID, f"""
        import socket, syscalls
        out = []
        for call, fd in [(syscalls.container_socket, {cfd}), (syscalls.socketns, {nsfd})]:
            try:
                os.close(call(fd, socket.AF_INET, socket.SOCK_STREAM, 0))
                out.append("made")
            except OSError as e:
                out.append(e.errno)
        return out
    """, pass_fds=(cfd, nsfd))
    assert got == [errno.EPERM, errno.EPERM]  # the service's check; then setns(2)'s own
    for fd in (nsfd, holder, cfd):
        os.close(fd)


def test_no_raw_sockets_without_own_user_namespace(service: Any) -> None:
    got = run_as(OTHER_UID, OTHER_GID, """
        import socket, syscalls
        cfd = syscalls.container_create("plain", 0)
        out = {}
        for name, args in [("raw", (socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)),
                           ("packet", (socket.AF_PACKET, socket.SOCK_RAW, 0)),
                           ("tcp", (socket.AF_INET, socket.SOCK_STREAM, 0))]:
            try:
                os.close(syscalls.container_socket(cfd, *args))
                out[name] = 0
            except OSError as e:
                out[name] = e.errno
        return out
    """)
    assert got == {"raw": errno.EPERM, "packet": errno.EPERM, "tcp": 0}


def test_member_may_open_sockets(service: Any) -> None:
    cfd = container_create("members", CONTAINER_NEW_NET_NS)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    pid = syscalls.fork_into_container(cfd)
    if pid == 0:
        try:
            os.setgid(OTHER_GID)
            os.setuid(OTHER_UID)  # a member, not the owner
            fd = container_socket(cfd, socket.AF_INET, socket.SOCK_STREAM, 0)
            socket.send_fds(theirs, [b"fd"], [fd])
        except OSError as e:
            theirs.send(str(e.errno).encode())
        finally:
            os._exit(0)
    theirs.close()
    data, fds, _, _ = socket.recv_fds(ours, 16, 1)
    ours.close()
    assert child_result(pid) == 0
    assert data == b"fd"
    assert netns_of(fds[0]) != own_netns()
    os.close(fds[0])
    # The same user from outside is neither owner nor member.
    got = run_as(OTHER_UID, OTHER_GID, f"""
        import socket, syscalls
        try:
            syscalls.container_socket({cfd}, socket.AF_INET, socket.SOCK_STREAM, 0)
            return "made"
        except OSError as e:
            return e.errno
    """, pass_fds=(cfd,))
    assert got == errno.EPERM
    os.close(cfd)
