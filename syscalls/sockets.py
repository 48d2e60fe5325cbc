"""container_socket and socketns: socket(2) in another network namespace.

The calling process and every one of its threads stay in their own network namespace throughout,
even for an instant. Three ways, the cheapest that the caller's privilege allows:

- the namespace is the calling thread's own: plain socket(2);
- no user namespace to enter (root, or a caller already privileged over the namespace): a private,
  short-lived thread enters the network namespace (a thread's own, no one else's), makes the
  socket and exits;
- a user namespace to enter (a non-root owner of a CONTAINER_NEW_USER_NS container): setns into a
  user namespace needs a single-threaded process, so a forked child enters it and the network
  namespace, makes the socket and sends it back over SCM_RIGHTS (its errno, if any, likewise).

The socket is made with the caller's credentials in every case, so the kernel's own checks
(CAP_NET_RAW for SOCK_RAW and AF_PACKET, netlink permissions) apply to the caller as they would had
it entered the container itself.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import socket

from . import linux, nsexec
from .client import call
from .handle import check_handle
from .protocol import NetNs

# ioctl(2) requests on nsfs files: _IO(0xb7, 1) and _IO(0xb7, 3).
_NS_GET_USERNS = 0xB701
_NS_GET_NSTYPE = 0xB703


def container_socket(cfd: int, domain: int, type: int, protocol: int) -> int:
    """socket(2) in the network namespace of the container behind handle `cfd`; returns the fd.

    EBADF/EINVAL for a bad handle, EPERM for a caller who could not enter the container,
    ECANCELED once it is dead, then socket(2)'s own errors with their exact errno.
    """
    check_handle(cfd)
    _check_args(domain, type, protocol)
    reply, fds = call(NetNs(), [cfd])
    try:
        ns = dict(zip(reply.fds, fds))
        return _socket_in(ns["net"], ns.get("user"), domain, type, protocol)
    finally:
        for fd in fds:
            os.close(fd)


def socketns(netns_fd: int, domain: int, type: int, protocol: int) -> int:
    """socket(2) in the network namespace that `netns_fd` (e.g. /proc/PID/ns/net) refers to.

    EBADF for a closed fd, EINVAL for one that is not a network namespace; a non-root caller
    enters the namespace's owning user namespace first when it may, so the kernel's setns(2)
    checks decide (EPERM); then socket(2)'s own errors.
    """
    if not isinstance(netns_fd, int) or isinstance(netns_fd, bool):
        raise TypeError(f"a namespace fd is an int, not {netns_fd.__class__.__name__}")
    os.fstat(netns_fd)  # EBADF, as setns(2) would say
    try:
        nstype = fcntl.ioctl(netns_fd, _NS_GET_NSTYPE)
    except OSError:
        nstype = -1  # not an nsfs file at all
    if nstype != linux.CLONE_NEWNET:
        raise OSError(errno.EINVAL, f"fd {netns_fd} is not a network namespace")
    _check_args(domain, type, protocol)
    user = -1
    if os.geteuid() != 0 and not linux.same_file(netns_fd, "/proc/thread-self/ns/net"):
        try:
            user = fcntl.ioctl(netns_fd, _NS_GET_USERNS)
        except OSError:
            pass  # owned outside our reach: setns(2) will say EPERM
    try:
        return _socket_in(netns_fd, user if user >= 0 else None, domain, type, protocol)
    finally:
        if user >= 0:
            os.close(user)


def _check_args(*args: int) -> None:
    for value in args:
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"socket arguments are ints, not {value.__class__.__name__}")
        if not -(2**31) <= value < 2**31:
            raise OverflowError(f"socket argument {value} does not fit a C int")


def _socket(domain: int, type: int, protocol: int) -> int:
    """socket(2) itself: the kernel's flags and errno, untouched (no forced close-on-exec)."""
    fd = int(linux._libc.socket(ctypes.c_int(domain), ctypes.c_int(type), ctypes.c_int(protocol)))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return fd


def _socket_in(netfd: int, userfd: int | None, domain: int, type: int, protocol: int) -> int:
    """Make the socket in `netfd`, entering `userfd` first when the caller needs it."""
    enter = [("net", netfd)]
    if userfd is not None and os.geteuid() != 0:
        enter.insert(0, ("user", userfd))  # root needs no user namespace to enter a network one
    fd = nsexec.fd_in(enter, lambda: _socket(domain, type, protocol))
    if not type & socket.SOCK_CLOEXEC:
        os.set_inheritable(fd, True)  # from a child it arrived close-on-exec (MSG_CMSG_CLOEXEC)
    return fd
