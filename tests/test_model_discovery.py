"""Finding the GGUF models a user already has (issue 29, item 4): on a fake home with the
layouts of Ollama, LM Studio, the Hugging Face cache and llama.cpp's cache, real GGUF headers
written with the gguf package, and files that must be skipped without a hang."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from pathlib import Path

import gguf
import pytest

from ccm_chat.app import model_discovery
from ccm_chat.app.cli import main
from ccm_chat.app.model_discovery import NotGGUF, discover, level_use, read_gguf_info


def write_gguf(path: Path, name: str, arch: str = "qwen2", file_type: int = 15,
               layers: int = 28, heads: int = 12, kv_heads: int = 2, width: int = 1536,
               context: int = 32768) -> bytes:
    """A real GGUF file: the metadata a model has (a tokenizer array and a chat template
    before the keys that matter for some), one small tensor; its bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_name(name)
    w.add_file_type(file_type)
    w.add_chat_template("{% for m in messages %}{{ m.content }}{% endfor %}" * 20)
    w.add_token_list([f"tok{i}" for i in range(3000)])
    w.add_context_length(context)
    w.add_block_count(layers)
    w.add_embedding_length(width)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_tensor("token_embd.weight", __import__("numpy").zeros((4, 8), dtype="float32"))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


def hostile_gguf(path: Path) -> None:
    """A GGUF header whose first key claims 2**62 bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1 << 62)
                     + b"general.architecture")


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in ("OLLAMA_MODELS", "HF_HUB_CACHE", "HF_HOME", "LLAMA_CACHE"):
        monkeypatch.delenv(var, raising=False)
    return home


def fake_home(home: Path) -> dict[str, Path]:
    """One model in each place, and the files discovery must skip."""
    ollama = home / ".ollama" / "models"
    data = write_gguf(home / "tmp-blob", "Ollama Qwen")
    digest = hashlib.sha256(data).hexdigest()
    (ollama / "blobs").mkdir(parents=True)
    blob = ollama / "blobs" / f"sha256-{digest}"
    (home / "tmp-blob").rename(blob)
    manifest = ollama / "manifests" / "registry.ollama.ai" / "library" / "qwen2.5" / "1.5b"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"layers": [
        {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "1" * 64},
        {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}"},
    ]}))
    lm = home / ".lmstudio" / "models" / "bartowski" / "Llama-GGUF" / "llama-q8.gguf"
    write_gguf(lm, "LM Llama", arch="llama", file_type=7, layers=16, heads=32, kv_heads=8,
               width=2048, context=131072)
    hf = home / ".cache" / "huggingface" / "hub" / "models--org--Small-GGUF"
    hf_data = write_gguf(hf / "tmp.gguf", "HF Small", arch="llama", file_type=2, layers=4,
                         heads=4, kv_heads=4, width=64, context=2048)
    hf_digest = hashlib.sha256(hf_data).hexdigest()
    (hf / "blobs").mkdir()
    (hf / "tmp.gguf").rename(hf / "blobs" / hf_digest)
    snapshot = hf / "snapshots" / "abc123" / "small-q4_0.gguf"
    snapshot.parent.mkdir(parents=True)
    snapshot.symlink_to(Path("..") / ".." / "blobs" / hf_digest)
    cache = home / ".cache" / "llama.cpp"
    cache.mkdir(parents=True)
    os.mkfifo(cache / "pipe.gguf")  # opened for reading, a FIFO would block forever
    (cache / "notes.gguf").write_text("not a model at all")
    hostile_gguf(cache / "hostile.gguf")
    return {"ollama": blob, "lm": lm, "hf": snapshot, "hf_digest": Path(hf_digest)}


def test_discovery_finds_each_source_and_skips_the_rest(home: Path) -> None:
    made = fake_home(home)
    started = time.monotonic()
    found = {m.source: m for m in discover()}
    assert time.monotonic() - started < 5  # the FIFO and the hostile header cost nothing
    assert set(found) == {"ollama", "lm-studio", "huggingface"}
    ollama = found["ollama"]
    assert (ollama.path, ollama.label, ollama.name) == (made["ollama"], "qwen2.5:1.5b",
                                                        "Ollama Qwen")
    info = ollama.info
    assert (info.architecture, info.quantization, info.context_length) == (
        "qwen2", "Q4_K_M", 32768)
    assert info.bytes_per_cell == 2 * 28 * 2 * (128 + 128)  # 28 layers, 2 KV heads of 128
    assert ollama.sha256 == made["ollama"].name.removeprefix("sha256-")
    assert ollama.compressor is False  # its sha256 is known from the blob's name
    lm = found["lm-studio"]
    assert (lm.name, lm.info.quantization, lm.info.context_length) == ("LM Llama", "Q8_0",
                                                                       131072)
    assert lm.sha256 is None and lm.compressor is None  # unknown until hashed
    hf = found["huggingface"]
    assert hf.label == "org/Small-GGUF/small-q4_0.gguf" and hf.sha256 == str(made["hf_digest"])
    assert hf.size == made["hf"].stat().st_size


def test_env_vars_move_the_roots(home: Path, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    write_gguf(tmp_path / "llama-cache" / "a.gguf", "From LLAMA_CACHE")
    write_gguf(tmp_path / "hub" / "models--x--y" / "snapshots" / "r" / "b.gguf", "From HF")
    monkeypatch.setenv("LLAMA_CACHE", str(tmp_path / "llama-cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "nothing"))
    assert {(m.source, m.name) for m in discover()} == {
        ("llama.cpp", "From LLAMA_CACHE"), ("huggingface", "From HF")}


def test_settings_folders_and_the_models_folder(home: Path, tmp_path: Path) -> None:
    write_gguf(tmp_path / "mine" / "deep" / "m.gguf", "Mine")
    write_gguf(model_discovery.models_dir() / "own.gguf", "Own")
    found = {m.name: m.source for m in discover([str(tmp_path / "mine")])}
    assert found == {"Mine": str(tmp_path / "mine"), "Own": "ccm-chat"}


@pytest.mark.parametrize("header", [
    b"GGUF" + struct.pack("<IQQ", 3, 0, 1 << 40),  # a trillion keys
    b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1 << 62),  # a huge key
    b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 4) + b"abcd"
    + struct.pack("<IIQ", 9, 8, 1 << 60),  # an array of 2**60 strings
    b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 4) + b"abcd"
    + struct.pack("<IQ", 8, 900_000),  # a string running past the end of the file
    b"GGUF" + struct.pack("<IQQ", 1, 0, 0),  # version 1
    b"GGML" + bytes(20),
])
def test_hostile_headers_are_refused_quickly(tmp_path: Path, header: bytes) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(header)
    started = time.monotonic()
    with pytest.raises(NotGGUF):
        read_gguf_info(path)
    assert time.monotonic() - started < 1


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.gguf")
    with pytest.raises(NotGGUF, match="not a regular file"):
        read_gguf_info(tmp_path / "pipe.gguf")


def test_the_real_default_model_header(tmp_path: Path) -> None:
    from ccm_chat.engine import default_model_path

    info = read_gguf_info(default_model_path())
    assert (info.architecture, info.quantization) == ("llama", "Q4_1")
    # the engine's own count: 30 layers, 3 KV heads of 64, K and V in f16
    assert info.bytes_per_cell == 2 * 2 * 30 * 3 * 64


def test_level_use_counts_cells_and_bytes() -> None:
    info = model_discovery.GGUFInfo("qwen2", "q", 15, {
        "context_length": 32768, "block_count": 28, "attention.head_count": 12,
        "attention.head_count_kv": 2, "embedding_length": 1536})
    rows = {u.level: u for u in level_use(info, 4096)}
    assert (rows["off"].cells, rows["balanced"].cells, rows["aggressive"].cells) == (
        4096, 512, 128)
    assert rows["off"].bytes == 4096 * 28672  # f16 K and V
    assert rows["balanced"].describe() == "balanced: 512 cells, 11 MB"  # K in q8_0


def test_hashing_makes_the_compressor_known(home: Path, tmp_path: Path) -> None:
    write_gguf(tmp_path / "mine" / "m.gguf", "Mine")
    [model] = discover([str(tmp_path / "mine")])
    assert model.compressor is None
    model_discovery.remember_sha256(model.path)
    [model] = discover([str(tmp_path / "mine")])
    assert model.sha256 == hashlib.sha256(model.path.read_bytes()).hexdigest()
    assert model.compressor is False


def test_cli_models_lists_what_it_found(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake_home(home)
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "Found on disk (3):" in out
    assert "Ollama Qwen  [ollama: qwen2.5:1.5b]" in out
    assert "qwen2, Q4_K_M, " in out and "context 32768, compressor: no" in out
    assert "balanced: 512 cells, 11 MB" in out
    assert "ccm-chat train-compressor --model " in out and "it takes a GPU" in out
    assert "LM Llama  [lm-studio: llama-q8]" in out and "compressor: unknown" in out
    assert "pipe" not in out and "hostile" not in out and "notes" not in out


def _kv(key: str, kind: int, payload: bytes) -> bytes:
    return struct.pack("<Q", len(key)) + key.encode() + struct.pack("<I", kind) + payload


def test_the_vocabulary_is_not_read_once_the_shape_is_known(tmp_path: Path) -> None:
    """Real files keep megabytes of tokenizer arrays after the shape: the read stops at them
    (2.4 s -> under 1 ms on the 1.5B), so what follows is never looked at, here a garbled
    array that would be refused."""
    def text(value: str) -> bytes:
        return struct.pack("<Q", len(value)) + value.encode()

    entries = [_kv("general.architecture", 8, text("qwen2")), _kv("general.name", 8, text("Q")),
               *(_kv(f"qwen2.{k}", 4, struct.pack("<I", v)) for k, v in (
                   ("context_length", 4096), ("block_count", 2), ("embedding_length", 64),
                   ("attention.head_count", 4))),
               _kv("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, 1 << 60))]
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, len(entries)) + b"".join(entries))
    info = read_gguf_info(path)
    assert (info.name, info.context_length, info.bytes_per_cell) == ("Q", 4096, 2 * 2 * 4 * 32)
    path.write_bytes(path.read_bytes().replace(b"tokenizer.ggml.tokens", b"tokenizer_ggml_tokens"))
    with pytest.raises(NotGGUF, match="2\\*\\*60|claims"):
        read_gguf_info(path)


def test_the_embedded_model_has_its_shipped_compressor_once_hashed(home: Path, tmp_path: Path,
                                                                   capsys) -> None:
    from ccm_chat.engine import default_model_path

    folder = tmp_path / "linked"
    folder.mkdir()
    (folder / "smol.gguf").symlink_to(default_model_path())
    assert main(["models", "--folder", str(folder)]) == 0
    assert "compressor: unknown" in capsys.readouterr().out
    assert main(["models", "--folder", str(folder), "--hash"]) == 0
    out = capsys.readouterr().out
    assert "llama, Q4_1" in out and "compressor: yes" in out
    [model] = discover([str(folder)])  # the hash is cached by (path, size, mtime) now
    assert model.compressor is True


def test_model_folders_from_a_damaged_settings_table_are_refused(store) -> None:
    from ccm_chat.app.settings import Settings

    store.save_settings({"model_folders": "/not/a/list", "temperature": 0.3})
    assert Settings.load(store) == Settings()
    store.save_settings({"model_folders": ["/models", "~/gguf"]})
    assert Settings.load(store).model_folders == ["/models", "~/gguf"]
