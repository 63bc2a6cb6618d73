"""Files from disk and text on their way into the engine, treated as untrusted: training
checkpoints, compressor folders, model paths, and message text rendered for the model."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from ccm_chat.engine import Engine
from ccm_chat.engine.ccm.files import (
    ADAPTER,
    EXTRA_DIRS_ENV,
    VECTORS,
    WEIGHTS,
    CompressorFiles,
    compressor_dirs,
    find_compressor,
)
from ccm_chat.engine.chat import ChatMessage
from ccm_chat.engine.errors import EngineError, ModelError
from tests.device import TEST_DEVICE
from tests.test_ccm import recall_dialogue, tiny_config, with_active_lora

# -- training checkpoints ------------------------------------------------------------------


class _WritesAFile:
    """What a crafted checkpoint holds: unpickling it calls `exec`, which writes a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


def test_resume_refuses_a_pickled_optimizer_checkpoint_without_running_it(tmp_path) -> None:
    from safetensors.torch import save_file

    from ccm_chat.training.train import CHECKPOINT, STATE, train

    _, comp = with_active_lora(n_comp=2, std=0.0)
    out, marker = tmp_path / "run", tmp_path / "PWNED"
    out.mkdir()
    (out / STATE).write_text(json.dumps({"step": 2, "config": {"batch": 1}}))
    save_file({n: p.detach().contiguous() for n, p in comp.named_parameters()
               if p is comp.comp}, out / CHECKPOINT)
    torch.save({"optimizer": _WritesAFile(marker), "scheduler": {}, "rng": {}},
               out / "checkpoint_optimizer.pt")  # the name and format runs wrote until now
    with pytest.raises(ValueError, match="cannot be resumed.*nothing from it was run"):
        train(comp, recall_dialogue, tiny_config(steps=3), out, show_progress=False)
    assert not marker.exists()


def test_a_checkpoint_written_by_training_resumes_exactly(tmp_path) -> None:
    """A step, stop, a step more from the checkpoint == 2 straight; the checkpoint is
    tensors and JSON only."""
    from ccm_chat.training.train import read_run_state, train

    def run(out: Path, stops: list[int | None]):
        _, comp = with_active_lora(n_comp=2, std=0.0)
        log = []
        for until in stops:
            log += train(comp, recall_dialogue, tiny_config(steps=2, checkpoint_every=1), out,
                         show_progress=False, until=until)
        return comp, log

    straight, log_straight = run(tmp_path / "a", [None])
    resumed, log_resumed = run(tmp_path / "b", [1, None])
    assert [r["loss"] for r in log_resumed] == [r["loss"] for r in log_straight]
    for a, b in zip(straight.trainable(), resumed.trainable(), strict=True):
        assert torch.equal(a, b)
    state_a, state_b = read_run_state(tmp_path / "a"), read_run_state(tmp_path / "b")
    for k, v in state_a["optimizer"]["state"].items():
        assert torch.equal(v["exp_avg_sq"], state_b["optimizer"]["state"][k]["exp_avg_sq"])
    assert state_a["scheduler"] == state_b["scheduler"]
    assert {p.suffix for p in (tmp_path / "b").iterdir()} == {".safetensors", ".json",
                                                              ".jsonl"}


# -- compressor folders --------------------------------------------------------------------

SHIPPED = compressor_dirs()[-1]


def shipped_copy(tmp_path: Path) -> Path:
    (folder,) = [p.parent for p in SHIPPED.glob("*/compressor.json")]
    return Path(shutil.copytree(folder, tmp_path / "evil" / folder.name))


def test_a_named_compressor_with_vectors_of_the_wrong_shape_is_refused(tmp_path) -> None:
    """The audit's case: a (2, 4) table, which llama.cpp read 576 floats a row of."""
    folder = shipped_copy(tmp_path)
    np.save(folder / VECTORS, np.ones((2, 4), np.float32))
    with pytest.raises(ModelError, match=rf"{VECTORS}.*\(2, 4\).*\(2, 576\)"):
        Engine.load(compression="aggressive", compressor=folder, device=TEST_DEVICE)


def test_a_found_compressor_that_is_unsound_is_passed_over_for_the_next(
        tmp_path, monkeypatch) -> None:
    folder = shipped_copy(tmp_path)
    np.save(folder / VECTORS, np.ones((2, 4), np.float32))
    monkeypatch.setenv(EXTRA_DIRS_ENV, str(folder.parent))
    with Engine.load(compression="aggressive", n_ctx=512, device=TEST_DEVICE) as eng:
        assert eng.ccm is not None and eng.ccm.files.folder.parent == SHIPPED
        assert eng.ccm.vectors.shape == (2, 576)
        (why,) = eng.skipped_compressors
        assert str(folder / VECTORS) in why and "(2, 4)" in why
        assert "passed over" in eng.compression_for("balanced").describe()


def _without_last_layer(folder: Path) -> None:
    """Rewrite both LoRA files without their last layer: sound files, but not this model's."""
    import gguf
    from safetensors.numpy import load_file, save_file

    last = f".{CompressorFiles.open(folder).tensors().n_layer - 1}."
    weights = load_file(folder / WEIGHTS)
    save_file({k: v for k, v in weights.items() if last not in k.replace("layers", "")},
              folder / WEIGHTS)
    reader = gguf.GGUFReader(folder / ADAPTER)
    writer = gguf.GGUFWriter(str(folder / "new.gguf"), arch="llama")
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    alpha = float(reader.fields["adapter.lora.alpha"].contents())
    writer.add_float32("adapter.lora.alpha", alpha)
    for t in reader.tensors:
        if not t.name.startswith(f"blk{last}"):
            writer.add_tensor(t.name, np.array(t.data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    (folder / "new.gguf").replace(folder / ADAPTER)


def test_a_compressor_for_another_model_shape_is_refused_named_and_passed_over_found(
        tmp_path, monkeypatch) -> None:
    folder = shipped_copy(tmp_path)
    _without_last_layer(folder)
    assert CompressorFiles.open(folder).tensors().n_layer == 29  # sound on its own
    with pytest.raises(ModelError, match="29 layers; the model has 30"):
        Engine.load(compression="balanced", n_ctx=512, compressor=folder, device=TEST_DEVICE)
    monkeypatch.setenv(EXTRA_DIRS_ENV, str(folder))
    with Engine.load(compression="balanced", n_ctx=512, device=TEST_DEVICE) as eng:
        assert eng.ccm.files.folder.parent == SHIPPED
        assert "29 layers" in eng.skipped_compressors[0]


def test_tensors_that_are_not_finite_are_found_in_every_file(tmp_path) -> None:
    import gguf
    from safetensors.numpy import load_file, save_file

    folder = shipped_copy(tmp_path)
    vectors = np.load(folder / VECTORS)
    vectors[1, 7] = np.nan
    np.save(folder / VECTORS, vectors)
    with pytest.raises(ModelError, match=f"{VECTORS}.*not finite"):
        CompressorFiles.open(folder).tensors()
    shutil.rmtree(folder)
    folder = shipped_copy(tmp_path)
    tensor = next(t for t in gguf.GGUFReader(folder / ADAPTER).tensors
                  if t.name == "blk.3.attn_v.weight.lora_b")
    with open(folder / ADAPTER, "r+b") as f:
        f.seek(tensor.data_offset + 4 * 5)
        f.write(np.float32(np.inf).tobytes())
    with pytest.raises(ModelError, match=f"{ADAPTER}.*blk.3.attn_v.weight.lora_b.*not finite"):
        CompressorFiles.open(folder).tensors()
    assert find_compressor(CompressorFiles.open(folder).card["base_fingerprint"],
                           dirs=[folder]) is None
    # the hf back end's file, and its loader on its own
    shutil.rmtree(folder)
    folder = shipped_copy(tmp_path)
    weights = load_file(folder / WEIGHTS)
    weights["model.model.layers.0.self_attn.q_proj.lora_a"][0, 0] = np.nan
    save_file(weights, folder / WEIGHTS)
    with pytest.raises(ModelError, match=f"{WEIGHTS}.*q_proj.lora_a.*not finite"):
        CompressorFiles.open(folder).tensors()
    _, comp = with_active_lora(n_comp=2, std=0.0)
    nan = {n: np.full(tuple(p.shape), np.nan, np.float32) for n, p in comp.named_parameters()
           if p is comp.comp}
    save_file(nan, tmp_path / "nan.safetensors")
    with pytest.raises(ValueError, match="comp is not a tensor of finite floats"):
        comp.load_trainable(tmp_path / "nan.safetensors")


def test_decode_embeddings_refuses_rows_that_are_not_the_models_width(real_engine) -> None:
    ctx = real_engine.ctx
    ctx.clear()
    ctx.decode([real_engine.model.bos, 42], 0)
    with pytest.raises(EngineError, match=r"\(2, 4\).*576 wide"):
        ctx.decode_embeddings(np.ones((2, 4), np.float32), 2)
    assert ctx.pos_max() == 1  # nothing was decoded
    ctx.decode_embeddings(np.zeros((2, 576), np.float32), 2)  # the model's width still runs
    assert ctx.pos_max() == 3
    ctx.clear()


def test_the_hf_context_refuses_rows_that_are_not_the_models_width() -> None:
    from types import SimpleNamespace

    from ccm_chat.engine.hf_backend import HFContext

    model, comp = with_active_lora(n_comp=2, std=0.1)
    tiny = SimpleNamespace(torch_model=model, config=model.config, device=torch.device("cpu"),
                           n_vocab=97, n_ctx_train=256, compressor=comp)
    ctx = HFContext(tiny, 256)
    ctx.decode([1, 2, 3], 0)
    with pytest.raises(EngineError, match="64 wide"):
        ctx.decode_embeddings(np.ones((2, 4), np.float32), 3, adapter=comp)
    ctx.decode_embeddings(np.ones((2, 64), np.float32), 3, adapter=comp)
    assert ctx.pos_max() == 4


# -- message text --------------------------------------------------------------------------

NUL_MESSAGE = [ChatMessage("user", "abc\x00def SECRET-TAIL")]


def test_the_model_sees_a_message_past_a_nul(real_engine) -> None:
    rendered = real_engine.model.render_chat(NUL_MESSAGE, add_assistant=True).decode()
    assert "abc\ufffddef SECRET-TAIL" in rendered
    assert NUL_MESSAGE[0].content == "abc\x00def SECRET-TAIL"  # the transcript keeps it


def test_the_hf_back_end_shows_the_model_the_same_text_as_llama_cpp() -> None:
    """transformers' renderer (a small tokenizer made here: only its template is read)."""
    from types import SimpleNamespace

    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    from ccm_chat.engine.hf_backend import HFModel

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"a": 0}, "a")))
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n"
                               "{% endfor %}")
    rendered = HFModel.render_chat(SimpleNamespace(tokenizer=tokenizer), NUL_MESSAGE, True)
    assert rendered.decode() == "<|user|>abc\ufffddef SECRET-TAIL\n"


# -- model paths ---------------------------------------------------------------------------


def test_a_fifo_given_as_the_model_is_refused_at_once(tmp_path) -> None:
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    outcome: list[BaseException | None] = []

    def load() -> None:
        try:
            Engine.load(model=fifo)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001  (handed to the test's thread)
            outcome.append(exc)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(timeout=10)
    if thread.is_alive():  # blocked opening the FIFO: a writer lets it go, then fail
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(timeout=10)
        pytest.fail("loading a FIFO as the model hung")
    (exc,) = outcome
    assert isinstance(exc, ModelError) and "not a regular file" in str(exc)
