"""Where the real-engine tests run: the CPU (CI), or a GPU with CCM_CHAT_TEST_DEVICE=gpu, so
the same exactness checks can be made on the CUDA build (whose KV cache code paths differ)."""

import os

TEST_DEVICE = os.environ.get("CCM_CHAT_TEST_DEVICE", "cpu")
