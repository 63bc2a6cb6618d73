"""The wheel: built without setuptools warnings, with the shipped compressor inside."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("app", "engine", "storage", "ui", "assets")


def test_wheel_builds_without_warnings_and_ships_the_compressor(tmp_path: Path) -> None:
    # the source tree is copied: building in place would leave build/ and egg-info behind
    src = tmp_path / "src"
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files"], check=True,
                           capture_output=True, text=True).stdout.split("\n")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes((ROOT / name).read_bytes())
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path / "wheel")],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr
    log = done.stdout + done.stderr
    assert "warning" not in log.lower(), log
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    sources = [f"ccm_chat/{n}" for n in files
               if n.endswith(".py") and n.split("/")[0] in PACKAGES]
    assert sources and not set(sources) - set(names)  # a new subpackage must be listed too
    assert "ccm_chat/assets/ccm_chat.tcss" in names
    assert any(n.startswith("ccm_chat/assets/compressors/") and n.endswith("/lora.gguf")
               for n in names)
    # the dialogue sets train a compressor from an installed copy, licences beside them
    for folder in ("memorybank_en", "synthetic_persona_chat", "topical_chat"):
        assert f"ccm_chat/assets/dialogue/{folder}/LICENSE" in names
        assert any(n.startswith(f"ccm_chat/assets/dialogue/{folder}/") and n.endswith(".gz")
                   for n in names)
    # nothing generic lands in site-packages: one namespace and the dist-info
    assert {n.split("/")[0] for n in names} == {"ccm_chat", "ccm_chat-0.1.0.dist-info"}
