#!/usr/bin/env bash
# bench/scale_inference.py on the device tool's GPU host: builds llama-cpp-python with CUDA
# (once per warm machine, bench/gpu_stage.sh), writes the shapes' random-weight GGUF files and
# compressors under /root/scale (bench/scale_shapes.py, in a background process: the next
# shape's file is written while the current one is measured; a warm machine keeps them), then
# measures each shape in its own process for its seconds. Carry .dev/llama, .whl and
# .dev/scale (the vocabulary extract, `scale_shapes.py vocab`, and the MemoryBank folder).
#
#   bash bench/gpu_scale.sh "llama-3.2-1b:60 llama-3.1-8b:150"     # shape:seconds[:parts] ...
# (parts: scale_inference.py's --parts, e.g. resume; the JSON is then scale_SHAPE_PARTS.json)
set -u
. "$(dirname "$0")/gpu_stage.sh"
build_llama && source_tree || exit 1
W=/root/scale
mkdir -p /tmp/hide $W
# sqlite-utils' optional pandas import pulls in pyarrow, which aborts after llama_cpp
echo 'raise ImportError("hidden on the GPU host: pyarrow aborts after llama_cpp")' > /tmp/hide/pandas.py
export PYTHONPATH=/tmp/hide:/tmp/site:/tmp/ns PYTHONUNBUFFERED=1 CCM_CHAT_CACHE_DIR=/root/cache \
  CCM_CHAT_DATA_DIR=/root/data
(for item in $1; do write_shapes "${item%%:*}"; done) > $OUT/write.log 2>&1 &
writer=$!
for item in $1; do
  IFS=: read -r s secs parts <<< "$item"
  name=$s${parts:+_${parts//,/_}}
  while [ ! -f $W/$s.json ] && kill -0 $writer 2>/dev/null; do sleep 1; done
  [ -f $W/$s.json ] || { echo "no model file for $s"; cat $OUT/write.log; continue; }
  cp $W/$s.json $OUT/scale_file_$s.json
  timeout $((secs + 45)) python3 bench/scale_inference.py run "$s" --model $W/$s.gguf \
    --compressor $W/$s-ccm --seconds "$secs" --data .dev/scale/memorybank_en \
    --parts "${parts:-fit,walks,resume}" --out $OUT/scale_$name.json > $OUT/$name.log 2>&1
  echo "$name: rc $?"; grep -v "^ *\(off\|light\|balanced\|aggressive\)" $OUT/$name.log | tail -n 8
done
wait
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
