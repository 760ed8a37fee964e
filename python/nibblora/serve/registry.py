"""A small file per running server in `<runs dir>/servers/`, so qlora-tui can list servers next to training jobs.

    <runs dir>/servers/<host>_<port>.json  {"url", "pid", "model", "model_path", "started"}

Written when the server starts, removed when it stops; a reader treats a file whose pid is gone as stale.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

SERVERS_DIR = "servers"


@dataclass
class ServerRegistration:
    path: Path | None

    @classmethod
    def create(
        cls, runs_dir: str | Path | None, host: str, port: int, model: str, model_path: str
    ) -> ServerRegistration:
        """Write the registry file; with no runs dir (none given, no $NIBBLORA_RUNS_DIR, no ./runs) write none."""
        if runs_dir is None:
            runs_dir = os.environ.get("NIBBLORA_RUNS_DIR") or ("runs" if Path("runs").is_dir() else None)
        if runs_dir is None:
            return cls(None)
        folder = Path(runs_dir) / SERVERS_DIR
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{host.replace(':', '_')}_{port}.json"
            shown_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
            record = {
                "url": f"http://{shown_host}:{port}",
                "pid": os.getpid(),
                "model": model,
                "model_path": str(model_path),
                "started": time.time(),
            }
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(record))
            tmp.replace(path)
        except OSError:
            return cls(None)  # a dashboard hint is not worth refusing to serve over
        return cls(path)

    def remove(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def read_registrations(runs_dir: str | Path) -> list[dict]:
    """Live servers registered under `runs_dir` (files whose process has exited are skipped)."""
    folder = Path(runs_dir) / SERVERS_DIR
    out = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            record = json.loads(path.read_text())
            pid = int(record["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        try:
            os.kill(pid, 0)
        except PermissionError:
            pass  # alive, another user's
        except OSError:
            continue  # the server exited without removing its file
        if isinstance(record.get("url"), str):
            out.append(record)
    return out
