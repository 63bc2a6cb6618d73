#!/usr/bin/env bash
# Compressor training at scale on the GPU host, one call of the device tool (carry .whl):
#   bash bench/gpu_train_scale.sh
# Replays the profiled training steps (bench/results/train_scale_profile.json) on random
# weights of the 8B, 1B and 3B shapes; results and the log land in $OUT. RUN_BUDGET: start no
# new run after this many seconds; LIMIT: kill the bench after this many; NAME: the JSON's
# name; further arguments go to `train_scale.py run`. The 24 GB card with expandable segments:
#   PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True NAME=train_scale_card_gpu \
#     bash bench/gpu_train_scale.sh --card-only
set -u
. "$(dirname "$0")/gpu_stage.sh"
source_tree
python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:/tmp/ns PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt"
python3 -m pip list 2>/dev/null | grep -i -E "^(torch|transformers|accelerate|bitsandbytes|torchao|optimum|peft) " \
  > "$OUT/host_packages.txt"
timeout "${LIMIT:-290}" python3 bench/train_scale.py run --out "$OUT/${NAME:-train_scale_gpu}.json" \
  --budget-s "${RUN_BUDGET:-215}" "$@" 2>&1 | grep -v "rope_parameters" | tee "$OUT/train_scale.log"
cat "$OUT/host_packages.txt"
