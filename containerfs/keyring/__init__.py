"""Per-container keyrings and request_key() interception: the creator's side.

    from containerfs.keyring import intercept
    with intercept(cfd, "user") as requests:
        req = requests.get(timeout=5.0)
        req.instantiate(b"payload")

The raw calls (keyctl_set_container_keyring, keyctl_container_intercept) are in
`syscalls.keys`; the service's half is `containerfs.keyring.service`. See docs/keyring.md.
"""

from .client import Request, Requests, intercept, listen

__all__ = ["Request", "Requests", "intercept", "listen"]
