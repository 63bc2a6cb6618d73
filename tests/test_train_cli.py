"""train-compressor's options for big models and random weights say clearly what is wrong."""

from __future__ import annotations

from transformers import LlamaConfig

from ccm_chat.app.cli import build_parser, main


def test_the_scale_options_reach_the_parser() -> None:
    args = build_parser().parse_args(
        ["train-compressor", "--dtype", "bf16", "--no-gradient-checkpointing", "--max-tokens",
         "4096", "--batch", "4", "--random-weights"])
    assert (args.dtype, args.gradient_checkpointing, args.max_tokens, args.batch,
            args.random_weights) == ("bf16", False, 4096, 4, True)
    assert build_parser().parse_args(["train-compressor"]).gradient_checkpointing is None


def test_a_config_without_weights_and_random_weights_without_a_folder_are_told(
        tmp_path, capsys) -> None:
    LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                num_attention_heads=4).save_pretrained(tmp_path / "shape")
    assert main(["train-compressor", "--model", str(tmp_path / "shape"), "--device", "cpu",
                 "--out", str(tmp_path / "out")]) == 2
    assert "no weights; --random-weights" in capsys.readouterr().err
    assert main(["train-compressor", "--model", str(tmp_path / "shape"), "--random-weights",
                 "--device", "cpu", "--out", str(tmp_path / "out")]) == 2
    assert "has no tokenizer" in capsys.readouterr().err
    assert main(["train-compressor", "--random-weights", "--device", "cpu",
                 "--out", str(tmp_path / "out")]) == 2  # the default model is a GGUF file
    assert "needs a transformers model folder" in capsys.readouterr().err
    assert main(["train-compressor", "--batch", "0", "--out", str(tmp_path / "out")]) == 2
    assert "--batch 0" in capsys.readouterr().err


def test_the_cli_builds_the_one_training_config(tmp_path, monkeypatch) -> None:
    """The flags become one TrainConfig; train_compressor takes it and no steps/lr of its own."""
    from ccm_chat.training import recipe
    from ccm_chat.training.train import TrainConfig

    seen = {}
    monkeypatch.setattr(recipe, "train_compressor",
                        lambda model, out, config, **kw: seen.update(config=config, **kw) or {})
    assert main(["train-compressor", "--steps", "7", "--lr", "0.001", "--kl-weight", "0.5",
                 "--device", "cpu", "--out", str(tmp_path / "out")]) == 0
    assert seen["config"] == TrainConfig(steps=7, lr=0.001, kl_weight=0.5)
    assert not {"steps", "lr", "seed"} & set(seen)
