"""Build syscalls/_cspawn (cffi, API mode) from cspawn.c, next to this file.

Run by scripts/setup.sh (`python -m syscalls.build_cspawn`); rebuilds only when cspawn.c
or this file changed (their hash is kept beside the module).
"""

from __future__ import annotations

import glob
import hashlib
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "cspawn.c")
STAMP = os.path.join(HERE, "_cspawn.stamp")

CDEF = """
struct cfs_step { int op; int ignore; long a; long b; const char *data; long len; };
long cfs_spawn(const struct cfs_step *steps, int n, char *const argv[], char *const envp[],
               int errfd, long flags, int *pidfd, int cgroup);
int cfs_into_cgroup(void);
"""


def _digest() -> str:
    h = hashlib.sha256()
    for path in (SOURCE, os.path.abspath(__file__)):
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def built() -> bool:
    try:
        with open(STAMP) as f:
            stamp = f.read().strip()
    except FileNotFoundError:
        return False
    return stamp == _digest() and bool(glob.glob(os.path.join(HERE, "_cspawn*.so")))


def build() -> None:
    from cffi import FFI  # type: ignore[import-untyped]  # set-up only: no stubs needed at run time

    ffi = FFI()
    ffi.cdef(CDEF)
    with open(SOURCE) as f:
        ffi.set_source("syscalls._cspawn", f.read(), extra_compile_args=["-O2", "-Wall"])
    with tempfile.TemporaryDirectory() as tmp:
        so = ffi.compile(tmpdir=tmp, verbose=False)
        for old in glob.glob(os.path.join(HERE, "_cspawn*.so")):
            os.unlink(old)
        os.replace(so, os.path.join(HERE, os.path.basename(so)))
    with open(STAMP, "w") as f:
        f.write(_digest() + "\n")


def main() -> None:
    if built():
        return
    build()
    print("syscalls: built the compiled spawn path (_cspawn)", file=sys.stderr)


if __name__ == "__main__":
    main()
