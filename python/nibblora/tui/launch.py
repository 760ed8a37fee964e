"""Starting a training job from the dashboard: `python -m nibblora.train CONFIG` as a detached process."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass
class LaunchedJob:
    process: subprocess.Popen
    config_path: Path
    output_dir: Path
    console_log: Path  # the trainer's stdout and stderr (errors before the run store exists end up here)


def plan_output_dir(config_output_dir: str, runs_dir: Path) -> tuple[Path, bool]:
    """Where the job will write, and whether it had to be moved: a config whose output_dir is outside the
    dashboard's runs directory is run in runs_dir/<its folder name>, so the new job shows up in the list."""
    wanted = Path(config_output_dir).resolve()
    root = runs_dir.resolve()
    if wanted == root or root in wanted.parents:
        return wanted, False
    return root / wanted.name, True


def start_job(config_path: str | Path, runs_dir: str | Path) -> tuple[LaunchedJob, str]:
    """Validate the config (raises nibblora.train.ConfigError with the key at fault), then start the trainer in
    its own session, so it outlives the dashboard. Returns the job and a sentence for the user."""
    config_path = Path(config_path).expanduser()
    from nibblora.train.config import load_config  # nibblora.train imports torch: only when a job starts

    config = load_config(config_path)
    output_dir, moved = plan_output_dir(config.output_dir, Path(runs_dir))
    output_dir.mkdir(parents=True, exist_ok=True)
    console_log = output_dir / "train-console.log"
    command = [sys.executable, "-m", "nibblora.train", str(config_path.resolve()), "--quiet"]
    if moved:
        command += ["--set", f"output_dir={str(output_dir)!r}".replace("'", '"')]
    with open(console_log, "ab") as out:
        process = subprocess.Popen(
            command,
            cwd=os.getcwd(),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    message = f"started {config_path.name} (pid {process.pid}) in {output_dir}"
    if moved:
        message += f" (its output_dir {config.output_dir} is outside the runs directory)"
    return LaunchedJob(process, config_path, output_dir, console_log), message


def find_configs(directory: Path, limit: int = 200) -> list[str]:
    """TOML files up to two folders down (not pyproject.toml), as relative paths: suggestions for the dialog."""
    found = []
    for pattern in ("*.toml", "*/*.toml", "*/*/*.toml"):
        for path in sorted(directory.glob(pattern)):
            if path.name != "pyproject.toml" and not any(p.startswith(".") for p in path.relative_to(directory).parts):
                found.append(str(path.relative_to(directory)))
            if len(found) >= limit:
                return found
    return found


def console_tail(path: Path, lines: int = 3) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""
