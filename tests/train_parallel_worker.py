"""One process of the data-parallel training test, started by torchrun (see
tests/test_train_parallel.py): trains the tiny model straight, and stopped then resumed,
and writes what each process ended with."""

from __future__ import annotations

import sys
from pathlib import Path

from safetensors.torch import save_file

from ccm_chat.training import parallel
from ccm_chat.training.train import _trainable_state, train
from tests.test_ccm import recall_dialogue, tiny_config, with_active_lora

STEPS, BATCH = 6, 2


def run(out: Path, stops: list[int | None]) -> dict:
    _, comp = with_active_lora(n_comp=2, std=0.0)
    for until in stops:
        _, comp = with_active_lora(n_comp=2, std=0.0)  # a new process would start afresh
        train(comp, recall_dialogue, tiny_config(steps=STEPS, batch=BATCH), out,
              show_progress=False, until=until)
    return _trainable_state(comp)


def main() -> None:
    out = Path(sys.argv[1])
    rank = parallel.world("cpu").rank
    save_file(run(out / "straight", [None]), out / f"straight-{rank}.safetensors")
    save_file(run(out / "resumed", [3, None]), out / f"resumed-{rank}.safetensors")


if __name__ == "__main__":
    main()
