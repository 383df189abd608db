"""Machine facts the benchmark scripts record beside their results (shared by the scripts)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]


def load_average() -> Optional[list[float]]:
    """1/5/15-minute load averages, rounded; None where the OS has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def git_revision(only: Optional[str] = None) -> Optional[str]:
    """HEAD's commit, suffixed when the tree (or just the path ``only``) has uncommitted changes."""
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        status = ["git", "status", "--porcelain"] + (["--", only] if only else [])
        dirty = subprocess.run(status, cwd=REPO, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    suffix = f"+{only}-modified" if only else "+dirty"
    return rev.stdout.strip() + (suffix if dirty.stdout.strip() else "")


def cpu_model() -> Optional[str]:
    """The CPU's model name from /proc/cpuinfo (Linux); None elsewhere."""
    try:
        with open("/proc/cpuinfo") as fh:
            names = [line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")]
    except OSError:
        return None
    return names[0] if names else None
