"""The proposal's key-grant sample on our API: link a key into a container keyring, and let
the container's processes find it.

    python examples/key_grant.py KEY [CONTAINER_KEYRING]

Without CONTAINER_KEYRING, a keyring named `_container` is looked for in the session keyring
(the proposal's convention). The proposal granted the container search permission with a new
ACL call (KEYCTL_GRANT_PERMISSION); the emulation has no ACLs: a container's processes
possess the keyring attached with keyctl_set_container_keyring, so a key in it is theirs to
find through its *possessor* permissions. Granting is adding possessor view and search (and
read, so that they can use it).
"""

from __future__ import annotations

import sys

from syscalls import KEY_SPEC_SESSION_KEYRING, keys
from syscalls.keys import KEY_POS_SHIFT, KEY_READ, KEY_SEARCH, KEY_VIEW

GRANT = (KEY_VIEW | KEY_SEARCH | KEY_READ) << KEY_POS_SHIFT


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print("usage: key_grant.py KEY [CONTAINER_KEYRING]", file=sys.stderr)
        return 2
    key = int(argv[1])
    if len(argv) == 3:
        keyring = int(argv[2])
    else:
        keyring = keys.search(KEY_SPEC_SESSION_KEYRING, "keyring", "_container")
    _type, _uid, _gid, perm, desc = keys.describe(key)
    keys.setperm(key, perm | GRANT)
    keys.link(key, keyring)
    print(f"key {key} ({desc!r}) linked into keyring {keyring}, possessor permissions "
          f"{perm:08x} -> {perm | GRANT:08x}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
