"""One line that says where a benchmark ran, for its JSON: results are only comparable on
the same machine and card (an H100 and an H200 can both answer for "gpu")."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any


def describe(device: str) -> str:
    text = f"{platform.machine()} {platform.processor() or ''}".strip()
    text += f", {os.cpu_count()} CPUs"
    if device == "gpu":
        try:
            names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                   capture_output=True, text=True, timeout=10).stdout.split("\n")
            text += ", " + (", ".join(n.strip() for n in names if n.strip()) or "GPU unknown")
        except (OSError, subprocess.SubprocessError):
            text += ", GPU unknown (no nvidia-smi)"
    return text


def write_result(path: Path, device: str, result: dict[str, Any]) -> None:
    """A benchmark's JSON, led by the command that made it and the machine it ran on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"command": " ".join(sys.argv), "machine": describe(device),
                                **result}, indent=1, default=str))
    print(f"wrote {path}")
