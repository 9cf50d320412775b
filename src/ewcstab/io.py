"""Atomic result files: write to a temporary sibling, then rename over the target.

The temporary file is created with mode 0666 and the process's umask applied, as ``open(path, "w")`` would
(``tempfile.mkstemp`` would make every result 0600, unreadable to a group sharing the results).
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any


def write_text_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the kernel applies the umask
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """JSON with NaN/inf refused (allow_nan=False): a diverged number is never written as a number."""
    write_text_atomic(path, json.dumps(obj, indent=1, allow_nan=False) + "\n")


def read_json(path: str | Path) -> Any:
    with open(path) as fh:
        return json.load(fh)
