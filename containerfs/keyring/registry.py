"""Where the service keeps its keyrings: one registry keyring per service, in root's user keyring.

Every keyring the service makes for a container (its session keyring, the slot holding the
keyring attached with keyctl_set_container_keyring, the record keyrings of traps) is linked in
the registry, so that:
- the service possesses them (the registry is also linked into the service's process keyring),
  whoever owns them: the kernel grants a possessor the possessor permissions, and the service
  never needs more than those;
- they outlive a crash of the service (root's user keyring lives as long as the system), and a
  restarted service finds them again by their names, with no other record.

Names say what each keyring is: `cfs.<id>.s.<secret>` (session: the secret part is what a
forking process joins by), `cfs.<id>.ck` (attached-keyring slot), `cfs.<id>.stage`,
`cfs.<id>.t.<timeout_ms>.<type>` and `cfs.<id>.b.<timeout_ms>.<type>` (records of a trap; `b`
for one bound to a connection, which does not survive a restart).
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass

from syscalls import keys

log = logging.getLogger("containerfs")

PREFIX = "containerfs:"


def perm(pos: int = 0, usr: int = 0, grp: int = 0, oth: int = 0) -> int:
    return ((pos << keys.KEY_POS_SHIFT) | (usr << keys.KEY_USR_SHIFT)
            | (grp << keys.KEY_GRP_SHIFT) | (oth << keys.KEY_OTH_SHIFT))


@dataclass(frozen=True)
class Entry:
    serial: int
    cid: int
    kind: str  # "s", "ck", "stage", "t", "b"
    rest: str  # what follows the kind in the name
    uid: int
    gid: int


class Registry:
    """The service's registry keyring for `runtime_dir`; found again after a restart."""

    def __init__(self, runtime_dir: str) -> None:
        self.name = PREFIX + os.path.abspath(runtime_dir)
        self._sweep_stale()
        try:
            # Found through root's user keyring (which we possess, as its special id), and
            # linked into our process keyring: from now on we possess it too.
            self.serial = self._possess(self.name)
        except OSError as e:
            if e.errno != errno.ENOKEY:
                raise
            self.serial = keys.add_key("keyring", self.name, None, keys.KEY_SPEC_PROCESS_KEYRING)
            # Possessors may do anything; other root processes may see that it is there.
            keys.setperm(self.serial, perm(pos=keys.KEY_ALL, usr=keys.KEY_VIEW))
            keys.link(self.serial, keys.KEY_SPEC_USER_KEYRING)

    @staticmethod
    def _possess(name: str) -> int:
        return keys.search(keys.KEY_SPEC_USER_KEYRING, "keyring", name,
                           keys.KEY_SPEC_PROCESS_KEYRING)

    def _sweep_stale(self) -> None:
        """Remove registries of services whose runtime directory is gone (test runs)."""
        try:
            entries = keys.keyring_contents(keys.get_keyring_id(keys.KEY_SPEC_USER_KEYRING, True))
        except OSError:
            return
        for serial in entries:
            try:
                ktype, _uid, _gid, _perm, desc = keys.describe(serial)
                if (ktype == "keyring" and desc.startswith(PREFIX)
                        and not os.path.isdir(desc[len(PREFIX):])):
                    self._destroy(self._possess(desc))
            except OSError:
                continue

    @staticmethod
    def _destroy(serial: int) -> None:
        """Invalidate a registry and everything it holds for containers."""
        try:
            for key in keys.keyring_contents(serial):
                destroy(key)
        except OSError:
            pass
        try:
            keys.unlink(serial, keys.KEY_SPEC_USER_KEYRING)
        except OSError:
            pass
        destroy(serial)

    @staticmethod
    def name_of(cid: int, kind: str, rest: str = "") -> str:
        return f"cfs.{cid}.{kind}" + (f".{rest}" if rest else "")

    def make(self, cid: int, kind: str, rest: str = "") -> int:
        """A new keyring named for container `cid`, linked in the registry, owned by root."""
        return keys.add_key("keyring", self.name_of(cid, kind, rest), None, self.serial)

    def entries(self) -> list[Entry]:
        out = []
        for serial in keys.keyring_contents(self.serial):
            try:
                ktype, uid, gid, _perm, desc = keys.describe(serial)
            except OSError:
                continue
            parts = desc.split(".", 3)
            if ktype != "keyring" or len(parts) < 3 or parts[0] != "cfs" or not parts[1].isdigit():
                continue
            out.append(Entry(serial, int(parts[1]), parts[2], parts[3] if len(parts) > 3 else "",
                             uid, gid))
        return out

    def remove(self) -> None:
        """Unlink the registry from root's user keyring (the service stops with nothing left)."""
        self._destroy(self.serial)


def destroy(serial: int, linked_in: int = 0) -> None:
    """Invalidate a key; the garbage collector frees it (and its owner's quota) as soon as no
    process holds it. It leaves keyrings only when the collector runs, a moment later: the
    keyring `linked_in` loses it at once (a reader of that keyring must not see it after)."""
    if linked_in:
        try:
            keys.unlink(serial, linked_in)
        except OSError as e:
            log.debug("could not unlink key %d from %d: %s", serial, linked_in, e)
    try:
        keys.invalidate(serial)
    except OSError as e:
        if e.errno not in (errno.ENOKEY, errno.EKEYREVOKED, errno.EKEYEXPIRED):
            log.warning("could not invalidate key %d: %s", serial, e)
