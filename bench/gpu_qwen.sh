#!/usr/bin/env bash
# The 1.5B chat model (Qwen2.5-Coder-1.5B-Instruct Q4_K_M) on the device tool's GPU host: bring
# it over in 44 MB parts, train its CCM compressor, bring the run back. One step a call:
#   bash bench/gpu_qwen.sh setup           (carry .whl .dev/llama: CUDA llama-cpp-python build,
#                                           in the background)
#   bash bench/gpu_qwen.sh part NN         (carry .dev/q/qpart_NN; NN = 00 .. 25)
#   bash bench/gpu_qwen.sh join            (joins the parts, checks the sha256)
#   bash bench/gpu_qwen.sh train SECONDS [train_compressor_gpu.py options]
#                                          (carry .dev/run to resume: a run brought back)
#   bash bench/gpu_qwen.sh watch SECONDS   (keeps the machine held; logs and GPU use)
#   bash bench/gpu_qwen.sh quality [compressor_quality.py options]
#   bash bench/gpu_qwen.sh collect         (the run as a tar in 15 MB parts, to $OUT; put them
#                                           in .dev/run to resume next time)
# .dev/q is made on the dev machine with `split -b 44000000 -d -a 2 qwen.gguf .dev/q/qpart_`
# (the joined file: app/model_catalog.py, `ccm-chat models install qwen2.5-coder-1.5b`).
set -u
. "$(dirname "$0")/gpu_stage.sh"
Q=/root/q
RUN=/root/run
QWEN_SHA=cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046
export PYTHONPATH=/tmp/site:/tmp/ns PYTHONUNBUFFERED=1

case "${1:-}" in
  setup)
    source_tree
    setsid nohup bash -c ". bench/gpu_stage.sh && build_llama" > /root/build.log 2>&1 < /dev/null &
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv ;;
  part)
    mkdir -p $Q && cp ".dev/q/qpart_$2" $Q/ && ls $Q | wc -l ;;
  join)
    cat $Q/qpart_* > /root/qwen.gguf && rm -f $Q/qpart_*
    sha256sum /root/qwen.gguf | grep -q $QWEN_SHA || { echo "qwen sha256 mismatch"; exit 1; }
    echo "qwen.gguf ok"; tail -3 /root/build.log ;;
  train)
    source_tree
    seconds=$2; shift 2
    if ls .dev/run/run.tar.part-* >/dev/null 2>&1 && [ ! -d $RUN ]; then  # resume
      mkdir -p $RUN && cat .dev/run/run.tar.part-* | tar -x -C $RUN || exit 1
    fi
    setsid nohup python3 bench/train_compressor_gpu.py --model /root/qwen.gguf --out $RUN \
      --max-seconds "$seconds" "$@" > /root/train.log 2>&1 < /dev/null &
    echo started ;;
  watch)
    sleep "$2"
    grep -v "rope_parameters\|Converting" /root/train.log | tail -15
    tail -3 $RUN/train_log.jsonl 2>/dev/null
    nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
    tail -2 /root/build.log ;;
  quality)  # content recovery, recall from the slots: held-apart test side, GPU
    source_tree; shift
    python3 bench/compressor_quality.py --model /root/qwen.gguf --compressor $RUN \
      --out "$OUT/compressor_quality_qwen_gpu.json" "$@" 2>&1 | grep -v "rope_parameters\|Converting" ;;
  collect)  # the run folder as one tar in parts of 15 MB (8 files come back a call)
    tar -C $RUN -cf - . | split -b 15000000 -a 2 - "$OUT/run.tar.part-"; ls -la "$OUT" ;;
  *) sed -n 2,15p "$0"; exit 2 ;;
esac
