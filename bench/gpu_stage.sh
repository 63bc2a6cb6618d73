# Sourced by bench/gpu_*.sh: bring the default model and the dialogue data to the device
# tool's GPU host in two calls (each carries at most 64 MiB): `stage_first` keeps the first
# half of the model and chitchat under $S; `stage_rest` adds the second half and the shared
# dialogue sets, checks the model's sha256 and installs the pure-Python wheels in /tmp/site.
S=/root/stage

# The repository's folders importable as ccm_chat.* without installing (what the editable
# install does on the dev machine): links under /tmp/ns, which goes on PYTHONPATH.
source_tree() {
  mkdir -p /tmp/ns/ccm_chat && for p in app engine storage ui assets; do
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
