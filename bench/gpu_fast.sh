#!/usr/bin/env bash
# Issue 16 on the device tool's GPU in two calls, the machine kept warm between them (files
# outside the repo last only while it is warm). The default model travels xz-compressed in two
# parts (.dev/xa, .dev/xb: the tree plus the llama.cpp sources leave too little room for a
# half of the plain file), the data as a small pack (.dev/pack: the held-out chitchat
# conversations bench/length.py reads, and MemoryBank's turns).
#   first:  carry [".dev/llama", ".whl", ".dev/xa", ".dev/pack"]: builds llama-cpp-python
#           with CUDA in the background (gpu_stage.sh) while bench/hf_fast_check.py checks
#           the hf fast path on random weights of the default model's shape; stages part 1.
#   second: carry [".dev/xb", ".whl"]: assembles the model, then side by side on it:
#           bench/length.py --backend both, bench/turn_profile.py on llama.cpp (compaction
#           before / after) and on the hf fast path.
set -u
. "$(dirname "$0")/gpu_stage.sh"
case "$1" in
stage)  # carry [".dev/xa", ".dev/pack"]: part 1 of the model and the data only
  mkdir -p $S && cp .dev/xa/* $S/ && cp -r .dev/pack/* $S/ && ls $S ;;
fused)  # carry [".dev/xb", ".whl"], after stage: the hf fast path with torch's fused
  # rms_norm off and on, side by side on the real model (no llama.cpp build)
  cat $S/model.xz.a .dev/xb/* | xz -dc > $S/model.gguf || exit 1
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  source_tree
  export CCM_CHAT_MODEL=$S/model.gguf CCM_CHAT_CACHE_DIR=/root/cache \
    CCM_CHAT_CHITCHAT=$S/dataset.json PYTHONPATH=/tmp/site:/tmp/ns PYTHONUNBUFFERED=1
  python3 -c "from ccm_chat.engine import Engine; Engine.load(backend='hf', device='gpu', n_ctx=256).close()" \
    || exit 1  # converts the GGUF once, outside the timed runs
  for fused in 0 1; do
    CCM_CHAT_HF_FUSED_NORMS=$fused timeout "${FUSED_SECONDS:-75}" python3 bench/length.py \
      --backend hf --device gpu --configs off --exchanges "${EXCHANGES:-50}" \
      --out $OUT/length_gpu_hf_fused$fused.json > $OUT/fused$fused.log 2>&1
    tail -n 8 $OUT/fused$fused.log
  done ;;
first)
  mkdir -p $S && cp .dev/xa/* $S/ && cp -r .dev/pack/* $S/ || exit 1
  (build_llama > $OUT/build.log 2>&1; echo "build rc $?" >> $OUT/build.log) &
  source_tree
  PYTHONPATH=/tmp/site:/tmp/ns PYTHONUNBUFFERED=1 timeout "${CHECK_SECONDS:-200}" python3 \
    bench/hf_fast_check.py --out $OUT/hf_fast_check_gpu.json > $OUT/check.log 2>&1
  echo "check rc $?" >> $OUT/check.log
  wait
  tail -n 3 $OUT/build.log; tail -n 60 $OUT/check.log ;;
second)
  cat $S/model.xz.a .dev/xb/* | xz -dc > $S/model.gguf || exit 1
  sha256sum $S/model.gguf | grep -q b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53 \
    || { echo "model sha256 mismatch"; exit 1; }
  L=$OUT/log.txt
  build_llama > /tmp/build.log 2>&1 || { tail /tmp/build.log; exit 1; }
  source_tree
  mkdir -p /tmp/nopandas && echo 'raise ImportError("hidden: pyarrow aborts after llama_cpp")' \
    > /tmp/nopandas/pandas.py
  export CCM_CHAT_MODEL=$S/model.gguf CCM_CHAT_CACHE_DIR=/root/cache \
    CCM_CHAT_CHITCHAT=$S/dataset.json CCM_CHAT_MEMORYBANK=$S/memorybank_en \
    PYTHONPATH=/tmp/nopandas:/tmp/site:/tmp/ns PYTHONUNBUFFERED=1
  timeout "${CHECK_SECONDS:-90}" python3 bench/hf_fast_check.py ${CHECK_ARGS:-} \
    --out $OUT/hf_fast_check_gpu.json > $L 2>&1
  timeout "${LENGTH_SECONDS:-250}" python3 bench/length.py --backend both --device gpu \
    --child-seconds "${CHILD_SECONDS:-120}" \
    --configs "${LENGTH_CONFIGS:-off,balanced: ccm}" --out $OUT/length_gpu_fast.json \
    >> $L 2>&1
  timeout "${PROFILE_SECONDS:-120}" python3 bench/turn_profile.py --backend llamacpp \
    --device gpu --variants both --turns "${TURNS:-12}" --out $OUT/turn_profile_gpu_fast.json \
    >> $L 2>&1
  timeout "${PROFILE_HF_SECONDS:-100}" python3 bench/turn_profile.py --backend hf --device gpu \
    --turns "${TURNS:-12}" --configs "${HF_CONFIGS:-off,balanced: window,balanced: ccm,aggressive: ccm}" \
    --out $OUT/turn_profile_gpu_hf_fast.json >> $L 2>&1
  grep -v "^ " $L | tail -n 80 ;;
esac
