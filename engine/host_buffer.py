"""A growable host buffer that KV states pass through, page-locked when llama.cpp runs on CUDA.

A state copied to or from the GPU through pageable memory is staged by the driver in pieces;
from page-locked (pinned) memory it is one DMA transfer. llama.cpp offers no allocator for
that, so the CUDA runtime its CUDA build has already loaded is asked directly
(cudaHostRegister); with none loaded (a CPU or Metal build, a static runtime) or if it says
no, the buffer is plain memory and works the same.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os

import numpy as np

RUNTIMES = ("libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0", "libcudart.so")
log = logging.getLogger(__name__)
PIN_MAX = 1 << 30  # bytes: a larger buffer stays pageable (page-locked memory is scarce)


@functools.cache
def _cuda_runtime() -> ctypes.CDLL | None:
    for name in RUNTIMES:
        try:  # only a runtime already in the process: none is loaded for this
            lib = ctypes.CDLL(name, mode=getattr(os, "RTLD_NOLOAD", 0) | os.RTLD_LOCAL)
        except OSError:
            continue
        lib.cudaHostRegister.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
        lib.cudaHostRegister.restype = ctypes.c_int
        lib.cudaHostUnregister.argtypes = [ctypes.c_void_p]
        lib.cudaHostUnregister.restype = ctypes.c_int
        lib.cudaGetLastError.restype = ctypes.c_int
        return lib
    return None


class HostBuffer:
    """Bytes for states to pass through; grown with headroom, as pinning costs time."""

    def __init__(self, pin: bool) -> None:
        self._pin = pin
        self._buf: ctypes.Array | None = None
        self.pinned = False

    def at_least(self, size: int) -> ctypes.Array:
        if self._buf is None or len(self._buf) < size:
            self.free()
            self._buf = (ctypes.c_uint8 * (size + size // 4))()
            runtime = _cuda_runtime() if self._pin and len(self._buf) <= PIN_MAX else None
            if runtime is not None:
                at = ctypes.addressof(self._buf)
                self.pinned = runtime.cudaHostRegister(at, len(self._buf), 0) == 0
                if not self.pinned:  # a failed call leaves an error that ggml's next check
                    runtime.cudaGetLastError()  # would abort on: clear it
                    log.info("A state buffer of %d bytes could not be page-locked: it "
                             "stays pageable.", len(self._buf))
        return self._buf

    def array(self, size: int) -> np.ndarray:
        """The first `size` bytes as a numpy array (a view: valid until the buffer grows)."""
        return np.frombuffer(self.at_least(size), dtype=np.uint8, count=size)

    def free(self) -> None:
        if self._buf is not None and self.pinned:
            runtime = _cuda_runtime()
            if runtime is not None and runtime.cudaHostUnregister(ctypes.addressof(self._buf)):
                runtime.cudaGetLastError()
        self._buf, self.pinned = None, False
