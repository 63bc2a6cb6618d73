"""One line that says where a benchmark ran, for its JSON: results are only comparable on
the same machine and card (an H100 and an H200 can both answer for "gpu")."""

from __future__ import annotations

import os
import platform
import subprocess


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
