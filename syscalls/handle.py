"""What a container handle is, as a caller can check it before asking the service."""

from __future__ import annotations

import errno
import os
import stat


def check_handle(fd: int) -> None:
    """Raise EBADF for a closed fd and EINVAL for one that cannot be a container handle."""
    if not isinstance(fd, int) or isinstance(fd, bool):
        raise TypeError(f"a container handle is an int fd, not {type(fd).__name__}")
    st = os.fstat(fd)  # EBADF for a closed or invalid fd, as the kernel would say
    if not stat.S_ISFIFO(st.st_mode):
        raise OSError(errno.EINVAL, f"fd {fd} is not a container handle")
