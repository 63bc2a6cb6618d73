"""Data-parallel compressor training: two processes under torchrun (gloo, CPU) on the tiny
random Llama of tests/test_ccm.py (the default model would make this minutes, not seconds)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from ccm_chat.training.train import _trainable_state, train
from tests.test_ccm import recall_dialogue, tiny_config, with_active_lora
from tests.train_parallel_worker import BATCH, STEPS

ROOT = Path(__file__).resolve().parents[1]


def test_two_processes_end_with_the_same_weights_as_one_taking_the_whole_batch(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
         "2", "-m", "tests.train_parallel_worker", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [load_file(tmp_path / f"straight-{r}.safetensors") for r in (0, 1)]
    _, start = with_active_lora(n_comp=2, std=0.0)
    start = _trainable_state(start)
    assert ranks[0].keys() == start.keys()
    for name, tensor in ranks[0].items():
        assert torch.equal(tensor, ranks[1][name]), name  # both processes hold the same
    assert any(not torch.equal(ranks[0][n], start[n]) for n in start)  # and they trained
    # stopped after 3 steps and run again: exactly where the straight run ended
    resumed = [load_file(tmp_path / f"resumed-{r}.safetensors") for r in (0, 1)]
    for name, tensor in ranks[0].items():
        assert torch.equal(tensor, resumed[0][name]) and torch.equal(tensor, resumed[1][name])
    # one process taking both dialogues of each step ends in the same place (the mean of
    # two processes' gradients is the mean over the batch)
    _, alone = with_active_lora(n_comp=2, std=0.0)
    train(alone, recall_dialogue, tiny_config(steps=STEPS, batch=BATCH), tmp_path / "alone",
          show_progress=False)
    for name, tensor in _trainable_state(alone).items():
        torch.testing.assert_close(ranks[0][name], tensor, atol=1e-5, rtol=1e-4)
    # the first process alone wrote the log and the checkpoint, one row a step
    rows = [json.loads(x) for x in (tmp_path / "straight" / "train_log.jsonl").read_text()
            .splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    state = json.loads((tmp_path / "straight" / "checkpoint.json").read_text())
    assert state["processes"] == 2 and state["data_position"] == STEPS * BATCH
