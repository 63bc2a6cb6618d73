# Sourced by bench/gpu_*.sh: stage the default model and dialogue data on the device tool's GPU
# host; the helpers the GPU scripts share (staging, source tree, llama.cpp build, scale shapes).
#
# Not run on its own: `python -m bench list` shows it as "sourced"; a GPU script does
# `. "$(dirname "$0")/gpu_stage.sh"` and calls the functions below.
#
# THE DEVICE TOOL. Each `run` call executes one bash command in a copy of the working tree on
# the GPU host (repository root as cwd) and brings back what it writes under $OUT. A call
# carries at most 64 MiB, the tree included, of git-ignored paths named in its `carry` list
# (8 at most), and runs at most 10 minutes. What a call leaves outside the repository
# (/root/stage, /root/whl, /root/scale, /tmp/site, /tmp/ns) lasts only while the machine stays
# warm: it goes back soon after a call ends and after 30 minutes held, so a recipe is a few
# calls in quick succession. The host has python3 with torch and transformers, no network, and
# no gguf, diskcache or llama-cpp-python: everything else travels in the carried paths.
#
# PREPARE on the dev machine, under the git-ignored .whl/ and .dev/:
#   .whl/        pure-Python wheels: `pip download --no-deps -d .whl gguf platformdirs diskcache`
#   .dev/m1/     part_aa  } the default model (98 MB, ../shared/GPU.md says where it is) in two:
#   .dev/m2/     part_ab  } `split -n 2 MODEL part_a` (stage_rest checks the sha256)
#   .dev/c1/     chitchat.json.xz     (the held-out chitchat conversations, xz)
#   .dev/c2/     shared_data.tar.xz   (the shared dialogue sets, unpacked to $S/data)
#   .dev/llama/  llama-src.tar.gz     (the stripped llama-cpp-python 0.3.36 sdist, GPU.md)
#   .dev/scale/  vocab.json.xz (`python bench/scale_shapes.py vocab`) and memorybank_en/
#
# THE FUNCTIONS, in the order a recipe calls them (each call on the same warm machine):
#   1. stage_first       carry [".dev/m1", ".dev/c1"]: model part 1 and chitchat to $S
#   2. stage_rest        carry [".dev/m2", ".dev/c2", ".whl"]: part 2, joins and checks the
#                        model ($S/model.gguf), installs the wheels in /tmp/site, unpacks data
#      source_tree       (any call) the repo's folders as ccm_chat.* under /tmp/ns
#      then the benchmark: PYTHONPATH=/tmp/site:/tmp/ns CCM_CHAT_MODEL=$S/model.gguf
#                        CCM_CHAT_CHITCHAT=$S/dataset.json CCM_CHAT_DATA=$S/data python3 ...
#   build_llama          carry [".dev/llama", ".whl"]: llama-cpp-python with CUDA in /tmp/site
#                        (~4 min, once per warm machine; its own call: beside a model half it
#                        passes 64 MiB); only for the llama.cpp back end
#   write_shapes "S ..." carry [".dev/scale"]: random-weight GGUFs and compressors of the
#                        scale shapes under /root/scale (bench/scale_shapes.py)
# bench/gpu_fast.sh stages the model in three xz parts instead (.dev/xa, xb, xc; its header).
#
# EXAMPLE, bench/hybrid.py on the transformers back end (bench/gpu_hybrid.sh wraps 1 and 2):
#   run(command="python3 -m bench run gpu_hybrid stage", carry=[".dev/m1", ".dev/c1"])
#   run(command="BENCH_COMMIT=abc1234 python3 -m bench run gpu_hybrid run",
#       carry=[".dev/m2", ".dev/c2", ".whl"])
# The copy on the host has no .git: BENCH_COMMIT (the dev machine's `git rev-parse --short
# HEAD`) is the commit bench/machine.py's write_result records in each JSON. Copy the JSON
# from $OUT to bench/results/ on the dev machine.
S=/root/stage

# The repository's folders importable as ccm_chat.* without installing (what the editable
# install does on the dev machine): links under /tmp/ns, which goes on PYTHONPATH.
source_tree() {
  mkdir -p /tmp/ns/ccm_chat && for p in app engine storage ui assets training; do
    ln -sfn "$PWD/$p" /tmp/ns/ccm_chat/$p
  done
}

stage_first() {
  mkdir -p $S && cp .dev/m1/* .dev/c1/* $S/ && ls -la $S
}

stage_rest() {
  cp .dev/m2/* .dev/c2/* $S/ && cat $S/part_aa $S/part_ab > $S/model.gguf || return 1
  sha256sum $S/model.gguf | grep -q b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53 \
    || { echo "model sha256 mismatch"; return 1; }
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    || return 1
  xz -dc $S/chitchat.json.xz > $S/dataset.json && tar -C $S -xJf $S/shared_data.tar.xz
}

# The random-weight GGUF and compressor of each shape named in $1 (bench/scale_shapes.py),
# under /root/scale, once per warm machine; needs .dev/scale (`scale_shapes.py vocab`).
write_shapes() {
  mkdir -p /root/scale
  for s in $1; do
    [ -f /root/scale/$s.json ] || { PYTHONPATH=/tmp/site:/tmp/ns python3 bench/scale_shapes.py \
      gguf "$s" /root/scale/$s.gguf --vocab .dev/scale/vocab.json.xz \
      --compressor /root/scale/$s-ccm > /root/scale/$s.tmp \
      && mv /root/scale/$s.tmp /root/scale/$s.json; } || return 1
  done
}

# llama-cpp-python with CUDA, built on the host from the stripped sdist in .dev/llama (carry
# it; see ../shared/GPU.md) about 4 minutes, once per machine: a warm machine keeps the wheel
# in /root/whl and the install in /tmp/site. Needs .whl (gguf, platformdirs, diskcache).
build_llama() {
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    || return 1
  if ! ls /root/whl/llama_cpp_python-*.whl >/dev/null 2>&1; then
    mkdir -p /root/src && tar -C /root/src -xzf .dev/llama/llama-src.tar.gz || return 1
    CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90-real -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
      CMAKE_BUILD_PARALLEL_LEVEL=16 python3 -m pip wheel -q --no-deps --no-build-isolation \
      -w /root/whl /root/src/llama_cpp_python-0.3.36 || return 1
  fi
  [ -d /tmp/site/llama_cpp ] || python3 -m pip install -q --no-index --no-deps --no-compile \
    --target /tmp/site /root/whl/llama_cpp_python-*.whl || return 1
  PYTHONPATH=/tmp/site python3 -c "import llama_cpp; assert llama_cpp.llama_supports_gpu_offload()"
}
