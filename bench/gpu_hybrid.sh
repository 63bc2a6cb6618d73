#!/usr/bin/env bash
# bench/hybrid.py on the device tool's GPU in two calls (the machine kept warm between them),
# on the transformers back end (the host has torch but no llama-cpp-python): `stage` keeps the
# first half of the model file, `run` assembles it and runs the validation and test tables
# side by side. Needs .dev/{m1,m2} (the model split in two), .dev/{c1,c2} (chitchat and the
# shared dialogue sets) and .whl (gguf, platformdirs), as bench/gpu_compressor.sh.
set -u
. "$(dirname "$0")/gpu_stage.sh"
case "$1" in
stage)
  stage_first ;;
run)
  stage_rest && source_tree || exit 1
  export CCM_CHAT_MODEL=$S/model.gguf CCM_CHAT_CACHE_DIR=/root/cache CCM_CHAT_DATA=$S/data \
    CCM_CHAT_CHITCHAT=$S/dataset.json PYTHONPATH=/tmp/site:/tmp/ns PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
  python3 -c "from ccm_chat.engine import Engine; Engine.load(backend='hf', device='gpu', n_ctx=256).close()" \
    || exit 1
  timeout "${VAL_SECONDS:-250}" python3 bench/hybrid.py --backend hf --device gpu --split validation \
    --only-hybrid --levels balanced,aggressive --shares 0.25,0.5,0.75 --at 4,8,16,32 --chats 4 \
    --out $OUT/hybrid_validation_gpu.json > $OUT/validation.log 2>&1 &
  timeout "${TEST_SECONDS:-270}" python3 bench/hybrid.py --backend hf --device gpu --split test \
    --levels balanced,aggressive,light --at 2,4,8,16,32 --chats 4 \
    --out $OUT/hybrid_test_gpu.json > $OUT/test.log 2>&1 &
  wait
  tail -n 30 $OUT/validation.log $OUT/test.log ;;
esac
