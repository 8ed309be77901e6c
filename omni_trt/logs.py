"""The one logging setup of the `omni` command (and of direct library calls that log progress),
and the one escape for text a client sent that ends up in a log line."""

from __future__ import annotations

import json
import logging
import time

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
NOISY = ("httpx", "diffusers", "transformers")
FORMATS = ("text", "json")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and the traceback, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def setup(level: str = "INFO", fmt: str = "text") -> None:
    """Configure the root logger; a later call changes the level and format."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format=FORMAT)
    for handler in root.handlers:
        handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(FORMAT))
    root.setLevel(level.upper())
    for noisy in NOISY:
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def escape(value: object, limit: int = 200) -> str:
    """A client's text as one safe log token: control characters (a newline would forge a log
    line) and non-ASCII escaped, length bounded."""
    if value is None:
        return "-"
    text = str(value)
    short = text[:limit]
    out = short.encode("unicode_escape", "backslashreplace").decode("ascii")
    return out + (f"...(+{len(text) - limit} chars)" if len(text) > limit else "")
