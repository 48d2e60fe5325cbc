"""OCI runtime lifecycle: create + start + delete --force of a busybox bundle (`sleep 60`),
and `run` of `true`, with containerfs-oci and runc, interleaved in one run (speed drifts
between runs on this machine). Run as `python -m bench.oci [-n N]`; starts its own service
unless CONTAINERFS_SOCKET names one. Prints each median and the ratio.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.oci_support import OURS, default_config, make_rootfs

from ._service import running_service


def _time(argvs: list[list[str]]) -> float:
    t = time.perf_counter()
    for argv in argvs:
        subprocess.run(argv, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=10)
    n = ap.parse_args().n
    runc = shutil.which("runc")
    where = Path(tempfile.mkdtemp(prefix="cfs-bench-oci-"))
    try:
        with running_service() as sock:
            b = where / "bundle"
            make_rootfs(b / "rootfs")
            (b / "config.json").write_text(json.dumps(default_config(["sleep", "60"])))
            t = where / "true"
            make_rootfs(t / "rootfs")
            (t / "config.json").write_text(json.dumps(default_config(["true"])))
            runtimes = {"containerfs-oci": [OURS, "--root", str(where / "ours"),
                                            "--socket", sock]}
            if runc:
                runtimes["runc"] = [runc, "--root", str(where / "runc")]
            cycle: dict[str, list[float]] = {k: [] for k in runtimes}
            run: dict[str, list[float]] = {k: [] for k in runtimes}
            for i in range(n):
                for name, base in runtimes.items():
                    cid = f"bench{i}"
                    cycle[name].append(_time([
                        base + ["create", "--bundle", str(b), cid], base + ["start", cid],
                        base + ["delete", "--force", cid]]))
                    run[name].append(_time([base + ["run", "--bundle", str(t), f"r{i}"]]))
            for label, data in (("create+start+delete", cycle), ("run true", run)):
                medians = {k: statistics.median(v) * 1000 for k, v in data.items()}
                line = "  ".join(f"{k} {v:.0f} ms" for k, v in medians.items())
                if "runc" in medians:
                    line += f"  (ours/runc {medians['containerfs-oci'] / medians['runc']:.2f})"
                print(f"{label:<22} median of {n}: {line}")
    finally:
        shutil.rmtree(where, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
