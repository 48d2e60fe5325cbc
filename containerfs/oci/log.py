"""Errors in runc's log format: `--log-format json` gives `{"level":"error","msg":...,
"time":...}` lines, `text` logrus's `time="..." level=error msg="..."`; to `--log` (appended)
or stderr. As runc does, the plain message goes to stderr as well, so an engine that reads
only stderr (Podman, for a runtime not named runc) shows it."""

from __future__ import annotations

import datetime
import json
import sys


class Log:
    def __init__(self, path: str | None, fmt: str) -> None:
        self.path = path or None
        self.fmt = fmt

    def line(self, level: str, msg: str) -> str:
        t = datetime.datetime.now(datetime.timezone.utc).isoformat().replace("+00:00", "Z")
        if self.fmt == "json":
            return json.dumps({"level": level, "msg": msg, "time": t})
        return f"time={json.dumps(t)} level={level} msg={json.dumps(msg)}"

    def write(self, level: str, msg: str) -> None:
        text = self.line(level, msg) + "\n"
        if self.path:
            try:
                with open(self.path, "a") as f:
                    f.write(text)
                return
            except OSError:
                pass  # an unwritable log must not hide the error: stderr has it
        sys.stderr.write(text)

    def error(self, msg: str) -> None:
        self.write("error", msg)
        if self.path:
            print(msg, file=sys.stderr)
        else:
            print(f"containerfs-oci: {msg}", file=sys.stderr)
        sys.stderr.flush()
