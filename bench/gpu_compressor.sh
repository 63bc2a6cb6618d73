#!/usr/bin/env bash
# The GPU run of issue 13 in three calls of the device tool (each under 10 minutes, the
# machine kept warm between them): `stage` keeps the first half of the model file, `start`
# assembles it, starts three trainings (n = 1, 2, 4) in the background and the old
# compressor's test evaluation beside them, `finish` waits for the trainings and evaluates
# the new compressors on the test split. Results land in $OUT.
set -u
. "$(dirname "$0")/gpu_stage.sh"
R=/root/run
export CCM_CHAT_MODEL=$S/model.gguf CCM_CHAT_CACHE_DIR=/root/cache CCM_CHAT_DATA=$S/data \
  CCM_CHAT_CHITCHAT=$S/dataset.json PYTHONPATH=/tmp/site:/tmp/ns PYTHONUNBUFFERED=1 OMP_NUM_THREADS=3
OLD=${OLD:-assets/compressors/smollm2-135m-instruct-ccm-concat-n2}  # shipped (issue 13 ran the n1)
TRAIN_SECONDS=${TRAIN_SECONDS:-740} STEPS=${STEPS:-1800} LIMIT=${LIMIT:-40}
started=$(date +%s)
watch_until() {  # print progress until $1 seconds into this call
  while [ $(( $(date +%s) - started )) -lt "$1" ]; do
    sleep 45
    for f in "$R"/*.log; do echo "$(basename "$f"): $(tail -c 200 "$f" | tail -n 1)"; done
    for f in "$R"/new-n*/train_log.jsonl; do echo "$f: $(tail -n 1 "$f" | cut -c 1-400)"; done
  done
}
case "$1" in
stage)
  stage_first ;;
start)
  stage_rest && source_tree || exit 1
  python3 -c "from ccm_chat.training.recipe import load_for_training; load_for_training(None, 'gpu')" \
    || exit 1
  mkdir -p $R
  for n in 1 2 4; do
    setsid nohup python3 bench/train_compressor_gpu.py --out $R/new-n$n --n $n --steps $STEPS \
      --lr 0.0005 --max-seconds $TRAIN_SECONDS --eval-every 200 --checkpoint-every 200 \
      > $R/train-n$n.log 2>&1 < /dev/null &
  done
  setsid nohup python3 bench/compressor_quality.py --compressor $OLD --baselines 1 2 4 \
    --window 0 2 4 --limit $LIMIT --device gpu --out $R/eval-old.json > $R/eval-old.log 2>&1 \
    < /dev/null &
  watch_until 560
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv
  cp $R/*.log $OUT/ 2>/dev/null; true ;;
finish)
  while ! { [ -f $R/new-n1/compressor.json ] && [ -f $R/new-n2/compressor.json ] \
            && [ -f $R/new-n4/compressor.json ]; }; do
    sleep 10; [ $(( $(date +%s) - started )) -gt 420 ] && { echo "trainings not done"; break; }
  done
  for n in 1 2 4; do
    [ -f $R/new-n$n/compressor.json ] || continue
    setsid nohup python3 bench/compressor_quality.py --compressor $R/new-n$n --no-baselines \
      --window 0 2 4 --limit $LIMIT --device gpu --out $R/eval-n$n.json > $R/eval-n$n.log 2>&1 \
      < /dev/null &
  done
  while pgrep -f compressor_quality.py > /dev/null \
        && [ $(( $(date +%s) - started )) -lt 560 ]; do sleep 10; done
  for n in 1 2 4; do
    tar -C $R -czf $OUT/new-n$n.tar.gz new-n$n/compressor.json new-n$n/compressor.safetensors \
      new-n$n/train_log.jsonl new-n$n/checkpoint.json new-n$n/checkpoint.safetensors \
      new-n$n/checkpoint_optimizer.pt
  done
  tar -C $R -czf $OUT/results.tar.gz $(cd $R && ls *.log eval-*.json)
  tail -n 30 $R/eval-*.log ;;
esac
