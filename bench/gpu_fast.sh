#!/usr/bin/env bash
# Issue 16 on the device tool's GPU host, with issue 15's walks, in calls that keep the
# machine warm between them (files outside the repo last only while it is warm). The default
# model travels xz-compressed in three parts of about 29 MB (.dev/xa, .dev/xb, .dev/xc:
# `xz -6 -c MODEL > m.xz && split -n 3 -d m.xz`; the tree, the llama.cpp sources and a third
# fill a call's 64 MiB), the data as .dev/pack (dataset.json: the held-out chitchat
# conversations bench/length.py reads; memorybank_en: MemoryBank's turns).
#   first:  carry [".dev/xa", ".dev/pack", ".whl", ".dev/scale"]: stages part 1 and the data,
#           checks the hf fast path on random weights of the default model's shape
#           (bench/hf_fast_check.py), writes the scale shapes in $2 (gpu_stage.sh write_shapes)
#   second: carry [".dev/llama", ".whl", ".dev/xb", ".dev/scale"]: stages part 2, builds
#           llama-cpp-python with CUDA, then bench/gpu_scale.sh "$2" (shape:seconds:parts ...)
#   third:  carry [".dev/xc", ".whl", ".dev/scale"]: assembles the model, then side by side
#           on it: bench/turn_profile.py on llama.cpp ($VARIANTS, then beside / after with
#           CUDA graphs off, GRAPHS_OFF=1), on the scale shape $2 ($SCALE_VARIANTS) and on
#           the hf fast path ($HF_VARIANTS), then bench/length.py --backend both
#           (PROFILE_HF_SECONDS=0 or LENGTH_SECONDS=0 leaves either out; FORCED=1: the
#           llama.cpp profiles teacher-forced, turn_profile.py --forced; OLD_ENGINE=DIR: only
#           the llama.cpp profile, `after`, once for each word of $ORDER (default `old new
#           new old`): old, the engine in DIR, an earlier commit's (`git archive REV engine |
#           tar -x -C .dev/old`, carried), new, this one's; MAX_TOKENS: the reply cap, 48 by
#           default; TAG: in the JSON names)
set -u
. "$(dirname "$0")/gpu_stage.sh"
hide_pandas() {  # sqlite-utils' optional pandas import pulls in pyarrow, which aborts after llama_cpp
  mkdir -p /tmp/nopandas && echo 'raise ImportError("hidden: pyarrow aborts after llama_cpp")' \
    > /tmp/nopandas/pandas.py
}
case "$1" in
first)
  mkdir -p $S && cp .dev/xa/* $S/ && cp -r .dev/pack/* $S/ || exit 1
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  source_tree
  (time write_shapes "${2:-}") > $OUT/write.log 2>&1 &
  PYTHONPATH=/tmp/site:/tmp/ns PYTHONUNBUFFERED=1 timeout "${CHECK_SECONDS:-150}" python3 \
    bench/hf_fast_check.py --lengths 100,2000,7600 --steps 64 --compiled= \
    --out $OUT/hf_fast_check_gpu.json > $OUT/check.log 2>&1
  echo "check rc $?" >> $OUT/check.log
  wait
  cat $OUT/write.log; ls -la /root/scale; tail -n 40 $OUT/check.log ;;
second)
  cp .dev/xb/* $S/ && bash bench/gpu_scale.sh "$2" ;;
third)
  cat $S/model.xz.a $S/model.xz.b .dev/xc/* | xz -dc > $S/model.gguf || exit 1
  sha256sum $S/model.gguf | grep -q b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53 \
    || { echo "model sha256 mismatch"; exit 1; }
  L=$OUT/log.txt
  build_llama > /tmp/build.log 2>&1 || { tail /tmp/build.log; exit 1; }
  source_tree && hide_pandas
  export CCM_CHAT_MODEL=$S/model.gguf CCM_CHAT_CACHE_DIR=/root/cache \
    CCM_CHAT_CHITCHAT=$S/dataset.json CCM_CHAT_MEMORYBANK=$S/memorybank_en \
    PYTHONPATH=/tmp/nopandas:/tmp/site:/tmp/ns PYTHONUNBUFFERED=1
  CCM_LEVELS="balanced: ccm,aggressive: ccm"
  if [ -n "${OLD_ENGINE:-}" ]; then  # the engine of an earlier commit beside this one's
    mkdir -p /tmp/oldns/ccm_chat && for p in app storage ui assets; do
      ln -sfn "$PWD/$p" /tmp/oldns/ccm_chat/$p
    done
    ln -sfn "$PWD/$OLD_ENGINE" /tmp/oldns/ccm_chat/engine
    n=0
    for tree in ${ORDER:-old new new old}; do
      n=$((n + 1)); ns=/tmp/ns; [ $tree = old ] && ns=/tmp/oldns
      PYTHONPATH=/tmp/nopandas:/tmp/site:$ns timeout "${PROFILE_SECONDS:-130}" python3 \
        bench/turn_profile.py --backend llamacpp --device gpu --variants after \
        --turns "${TURNS:-12}" --configs "${CONFIGS:-$CCM_LEVELS}" --max-tokens \
        "${MAX_TOKENS:-48}" --out $OUT/turn_profile_gpu_${TAG:-engine}_${n}_$tree.json >> $L 2>&1
    done
    grep -v "^ " $L | grep -v "^|" | tail -n 60
    exit 0
  fi
  timeout "${PROFILE_SECONDS:-130}" python3 bench/turn_profile.py --backend llamacpp \
    --device gpu --variants "${VARIANTS:-before,toggle,beside,after}" --turns "${TURNS:-12}" \
    --configs "${CONFIGS:-$CCM_LEVELS}" ${FORCED:+--forced} --max-tokens "${MAX_TOKENS:-48}" \
    --out $OUT/turn_profile_gpu${TAG:+_$TAG}.json \
    >> $L 2>&1
  if [ -n "${GRAPHS_OFF:-}" ]; then  # is it llama.cpp's CUDA graphs that a changed decode costs?
    GGML_CUDA_DISABLE_GRAPHS=1 timeout 60 python3 bench/turn_profile.py --backend llamacpp \
      --device gpu --variants beside,after --turns "${TURNS:-12}" --configs "$CCM_LEVELS" \
      --max-tokens "${MAX_TOKENS:-48}" --out $OUT/turn_profile_gpu_graphs_off${TAG:+_$TAG}.json \
      >> $L 2>&1
  fi
  if [ -n "${2:-}" ]; then
    timeout "${SCALE_PROFILE_SECONDS:-90}" python3 bench/turn_profile.py --backend llamacpp \
      --device gpu --variants "${SCALE_VARIANTS:-beside,after}" --turns "${TURNS:-12}" \
      --configs "$CCM_LEVELS" ${FORCED:+--forced} --model /root/scale/$2.gguf \
      --compressor /root/scale/$2-ccm --out $OUT/turn_profile_gpu_$2.json >> $L 2>&1
  fi
  [ "${PROFILE_HF_SECONDS:-100}" = 0 ] || timeout "${PROFILE_HF_SECONDS:-100}" \
    python3 bench/turn_profile.py --backend hf --device gpu \
    --turns "${TURNS:-12}" --configs "${HF_CONFIGS:-$CCM_LEVELS}" \
    --variants "${HF_VARIANTS:-eager-rows,after}" --max-tokens "${MAX_TOKENS:-48}" \
    --out $OUT/turn_profile_gpu_hf${TAG:+_$TAG}.json >> $L 2>&1
  [ "${LENGTH_SECONDS:-230}" = 0 ] || timeout "${LENGTH_SECONDS:-230}" python3 bench/length.py \
    --backend both --device gpu --child-seconds "${CHILD_SECONDS:-110}" \
    --configs "${LENGTH_CONFIGS:-off}" --out $OUT/length_gpu_both.json >> $L 2>&1
  grep -v "^ " $L | tail -n 90 ;;
esac
