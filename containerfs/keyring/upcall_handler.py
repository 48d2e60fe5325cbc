"""What our request-key.d rule runs, for a key the kernel constructs:

    python -I upcall_handler.py SOCKET RULES %k %t %d %c %u %g %T %P %S

The kernel runs /sbin/request-key as root in the init namespaces, with a session keyring that
holds the authorisation key of %k, and request-key execs this. It asks the service whether the
requester's session keyring %S is a container's that traps type %t:
- yes: the request waits for the creator's answer, exactly as a trapped request_key() call
  does, and this process instantiates, negates or rejects %k with it. Should the service go
  away or not answer within the trap's timeout (and a margin), %k is negated: the kernel
  waits for this process, so it must never wait forever.
- no, or no service answers: the request gets what the host's configuration gives it, by
  /sbin/request-key -l on the same key with every host rule but ours (RULES, and the rules of
  other services already asked, listed in $CONTAINERFS_UPCALL_TRIED).
"""

from __future__ import annotations

import base64
import binascii
import errno
import math
import os
import socket
import subprocess
import sys
import syslog
import tempfile

if __name__ == "__main__":  # run by path, isolated (-I): our packages are beside this file
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))))

from syscalls import keys, protocol, replies
from syscalls.replies import UpcallReply

REQUEST_KEY = "/sbin/request-key"
HOST_CONF = "/etc/request-key.conf"
HOST_DIR = "/etc/request-key.d"
TRIED_ENV = "CONTAINERFS_UPCALL_TRIED"
FIRST_REPLY_S = 10.0  # the service decides at once; a service this slow is as good as none
MARGIN_S = 30.0  # beyond the trap's timeout, after which the service has failed the request
# The kernel checks the key once the upcall exits: a rejected key that has expired by then
# (a timeout of 0) gives its requester ENOKEY, not the errno. 2 s outlasts our exit (the
# expiry is counted in whole seconds).
REJECT_MIN_S = 2


def _say(message: str) -> None:
    # request-key gave us /dev/null for stdout and stderr; it logs to syslog, and so do we.
    syslog.syslog(syslog.LOG_AUTHPRIV | syslog.LOG_ERR, f"containerfs upcall: {message}")


def ask_service(path: str, req: protocol.KeyUpcall
                ) -> tuple[socket.socket, UpcallReply] | None:
    """The service's first reply and the open connection, if the request is a container's;
    None if it is not, or if no service answers."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(FIRST_REPLY_S)
        sock.connect(path)
        sock.send(protocol.encode(req))
        data = sock.recv(protocol.MAX_MESSAGE)
        reply = replies.decode(data, UpcallReply) if data else None
    except (OSError, replies.ProtocolError):
        sock.close()
        return None
    if isinstance(reply, UpcallReply) and (reply.queued or reply.action):
        return sock, reply
    if isinstance(reply, replies.ErrorReply):
        _say(f"the service refused key {req.key}: {reply.message}")
    sock.close()
    return None


def answer_key(key: int, sock: socket.socket, reply: UpcallReply) -> int:
    """Give key `key` the creator's answer (waiting for it if it is still to come); 0 once
    the key is instantiated or negated."""
    answer: UpcallReply | replies.ErrorReply | None = reply
    if reply.queued:
        try:
            sock.settimeout(reply.queued / 1000 + MARGIN_S)
            data = sock.recv(protocol.MAX_MESSAGE)
            answer = replies.decode(data, UpcallReply) if data else None
        except (OSError, ValueError):
            answer = None
    try:
        keys.assume_authority(key)  # request-key did so already; exec kept it, but be sure
    except OSError as e:
        _say(f"cannot assume authority over key {key}: {e}")
    if not isinstance(answer, UpcallReply) or not answer.action:
        keys.negate(key, 0)  # the service went away: as if the trap timed out
        return 0
    if answer.action == "instantiate":
        err = 0
        try:
            keys.instantiate(key, base64.b64decode(answer.payload, validate=True))
        except binascii.Error:
            err = errno.EINVAL
        except OSError as e:
            err = e.errno or errno.EIO
        if err:  # the requester gets what the creator is told
            refuse(key, err, 0)
        try:
            sock.send(protocol.encode(protocol.KeyUpcallDone(errno=err)))
        except OSError:
            pass
        return 0
    refuse(key, answer.reject_errno, math.ceil(answer.timeout_ms / 1000))
    return 0


def refuse(key: int, err: int, timeout_s: int) -> None:
    """Negate (ENOKEY) or reject the key; its requester gets `err`."""
    if err == errno.ENOKEY:
        keys.negate(key, timeout_s)  # expired at once, or not: ENOKEY either way
    else:
        keys.reject(key, max(timeout_s, REJECT_MIN_S), err)


def host_rules(skip: set[str]) -> bytes:
    """The host's request-key.d rules but the files named in `skip`, as one file.

    request-key reads the directory in readdir order and takes the first of equally good
    matches; a fresh directory of symlinks would list them in another order, one file keeps
    it. A last line without a newline loses its last character, as request-key reads it."""
    out = b""
    try:
        names = os.listdir(HOST_DIR)
    except OSError:
        return out
    for name in names:  # the order request-key reads them in
        path = os.path.join(HOST_DIR, name)
        if name.startswith(".") or not name.endswith(".conf") or name in skip:
            continue
        try:
            if not os.path.isfile(path):
                continue
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            continue
        if data and not data.endswith(b"\n"):
            data = data[:-1] + b"\n"
        out += data
    return out


def redispatch(rules: str, args: list[str]) -> int:
    """Run request-key on the key again, as the kernel did, with the host's rules but ours."""
    tried = [n for n in os.environ.get(TRIED_ENV, "").split(":") if n]
    tried.append(os.path.basename(rules))
    with tempfile.TemporaryDirectory(prefix="containerfs-upcall-") as where:
        os.mkdir(os.path.join(where, "request-key.d"))
        with open(os.path.join(where, "request-key.d", "host.conf"), "wb") as f:
            f.write(host_rules(set(tried)))
        if os.path.exists(HOST_CONF):
            os.symlink(HOST_CONF, os.path.join(where, "request-key.conf"))
        env = {**os.environ, TRIED_ENV: ":".join(tried)}
        return subprocess.run([REQUEST_KEY, "-l", "create", *args], cwd=where, env=env,
                              check=False).returncode


def main(argv: list[str]) -> int:
    if len(argv) != 12:
        _say(f"expected 11 arguments, got {len(argv) - 1}")
        return 2  # the kernel negates a key nobody instantiated
    sock_path, rules, key_arg, key_type, desc, callout, uid, gid = argv[1:9]
    thread, process, session = argv[9:12]
    host_args = [key_arg, uid, gid, thread, process, session]  # what the kernel passed
    try:
        key = int(key_arg)
        req = protocol.KeyUpcall(key=key, type=key_type, description=desc,
                                 callout_info=callout, uid=int(uid), gid=int(gid),
                                 session=int(session))
    except ValueError:
        return redispatch(rules, host_args)
    asked = ask_service(sock_path, req)
    if asked is None:
        return redispatch(rules, host_args)
    sock, reply = asked
    try:
        return answer_key(key, sock, reply)
    except OSError as e:
        _say(f"key {key}: {e}")  # the kernel negates it when we exit
        return 1
    finally:
        sock.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
