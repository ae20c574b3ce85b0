"""Run the project's CUDA kernels on the CPU: a small emulator for tests on machines without a GPU.

The .cu source is compiled as C++20 with g++ after a prelude that maps the CUDA names it uses to
host code: each block runs on `blockDim.x` std::threads, `__syncthreads`/`__syncwarp` are a
barrier of the block (kernels call them uniformly, so a block-wide barrier is a valid, stronger
stand-in for `__syncwarp`), `__shared__` variables are statics (blocks run one after another),
dynamic shared memory is a buffer per launch, and `__dmul_rn`/`__dadd_rn` are plain IEEE
operations (compiled with -ffp-contract=off). A thread that returns early leaves the barrier,
as an exited CUDA thread does.

`EmuModule(path, block=..., items=..., name_expressions=...)` mimics `cupy.RawModule`:
`get_function(name)` returns a callable `(grid, block, args, shared_mem=0)` taking numpy arrays
and numpy scalars (np.int32 -> int, np.int64 -> long long, np.float32 -> float, float ->
double), as a cupy.RawKernel takes cupy arrays. `name` is an `extern "C"` kernel's name or one
of `name_expressions` (template instantiations such as `"sb_ball_fwd<float, 64, 64, 64>"`,
wrapped as RawModule's name expressions are).
"""

from __future__ import annotations

import ctypes
import hashlib
import pathlib
import re
import shutil
import subprocess
import tempfile

import numpy as np

PRELUDE = r"""
#include <cmath>
#include <condition_variable>
#include <cstddef>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

struct sb_emu_dim3 { unsigned x = 0, y = 0, z = 0; };
static thread_local sb_emu_dim3 threadIdx, blockIdx;
static sb_emu_dim3 blockDim, gridDim;

// Reusable barrier; leave() drops a party (a thread that returned from the kernel).
struct sb_emu_barrier {
    std::mutex m;
    std::condition_variable cv;
    int expected = 0, arrived = 0;
    long phase = 0;
    void reset(int n) { std::lock_guard<std::mutex> l(m); expected = n; arrived = 0; }
    void release() { arrived = 0; ++phase; cv.notify_all(); }
    void wait(const std::function<void()>& last = nullptr) {
        std::unique_lock<std::mutex> l(m);
        const long p = phase;
        if (++arrived == expected) { if (last) last(); release(); }
        else cv.wait(l, [&] { return phase != p; });
    }
    void leave() {
        std::lock_guard<std::mutex> l(m);
        --expected;
        if (arrived > 0 && arrived == expected) release();
    }
};
static sb_emu_barrier sb_emu_block_barrier;   // __syncthreads inside a block
static sb_emu_barrier sb_emu_launch_barrier;  // between blocks
static unsigned char* sb_emu_dyn_smem = nullptr;

#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static
#define __align__(n) alignas(n)
#define SB_DYNAMIC_SHARED(name) unsigned char* name = sb_emu_dyn_smem
inline void __syncthreads() { sb_emu_block_barrier.wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { sb_emu_block_barrier.wait(); }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, sizeof u); return u; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, sizeof f); return f; }

template <class... A, std::size_t... I>
static void sb_emu_call(void (*kernel)(A...), void** args, std::index_sequence<I...>) {
    kernel(*static_cast<std::remove_cv_t<A>*>(args[I])...);
}

template <class... A>
static void sb_emu_launch(void (*kernel)(A...), unsigned gx, unsigned gy, unsigned bx,
                          unsigned long long smem, void** args) {
    gridDim = {gx, gy, 1};
    blockDim = {bx, 1, 1};
    std::vector<unsigned long long> dyn(smem / 8 + 8);
    sb_emu_dyn_smem = reinterpret_cast<unsigned char*>(dyn.data());
    sb_emu_block_barrier.reset((int)bx);
    sb_emu_launch_barrier.reset((int)bx);
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < bx; ++t) {
        threads.emplace_back([=] {
            threadIdx = {t, 0, 0};
            for (unsigned y = 0; y < gy; ++y)
                for (unsigned x = 0; x < gx; ++x) {
                    blockIdx = {x, y, 0};
                    sb_emu_call(kernel, args, std::index_sequence_for<A...>{});
                    sb_emu_block_barrier.leave();
                    // The last thread out re-arms the block barrier for the next block.
                    sb_emu_launch_barrier.wait([=] { sb_emu_block_barrier.expected = (int)bx; });
                }
        });
    }
    for (auto& th : threads) th.join();
}
"""

_KERNEL_RE = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(')


def available() -> bool:
    return shutil.which("g++") is not None


class EmuModule:
    """A `cupy.RawModule` look-alike running `path` (a .cu file) on the CPU."""

    def __init__(self, path: pathlib.Path, *, block: int | None = None, items: int | None = None,
                 name_expressions=()):
        source = pathlib.Path(path).read_text()
        # Symbol of each launchable name: extern "C" kernels by name, instantiations by index.
        self._symbols = {name: name for name in _KERNEL_RE.findall(source)}
        self._symbols.update({expr: f"expr{i}" for i, expr in enumerate(name_expressions)})
        self.names = list(self._symbols)
        wrappers = "".join(
            f'extern "C" __attribute__((visibility("default"))) void emu_{symbol}('
            f"unsigned gx, unsigned gy, unsigned bx, unsigned long long smem, void** args) "
            f"{{ sb_emu_launch({name}, gx, gy, bx, smem, args); }}\n"
            for name, symbol in self._symbols.items()
        )
        # Hidden symbols and no STB_GNU_UNIQUE: several builds of one source (other launch
        # shapes) live in one process, and their shared-memory statics must not merge.
        flags = ["-std=c++20", "-O1", "-pthread", "-fPIC", "-shared", "-ffp-contract=off",
                 "-fvisibility=hidden", "-fno-gnu-unique", "-Wno-unknown-pragmas"]
        flags += [] if block is None else [f"-DSB_BLOCK={block}"]
        flags += [] if items is None else [f"-DSB_ITEMS={items}"]
        code = PRELUDE + "\n" + source + "\n" + wrappers
        digest = hashlib.sha256((code + " ".join(flags)).encode()).hexdigest()[:16]
        build_dir = pathlib.Path(tempfile.gettempdir()) / "sparseball_cuda_emu"
        build_dir.mkdir(exist_ok=True)
        lib = build_dir / f"emu_{digest}.so"
        if not lib.exists():
            src = build_dir / f"emu_{digest}.cpp"
            src.write_text(code)
            tmp = build_dir / f"emu_{digest}.{id(self)}.so"
            result = subprocess.run(["g++", *flags, "-o", str(tmp), str(src)],
                                    capture_output=True, text=True)
            if result.returncode:
                raise RuntimeError(f"g++ failed on {path}:\n{result.stderr[-20000:]}")
            tmp.replace(lib)
        self._lib = ctypes.CDLL(str(lib))
        self.block = block

    def get_function(self, name: str):
        fn = getattr(self._lib, f"emu_{self._symbols[name]}")
        fn.restype = None
        fn.argtypes = [ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_ulonglong,
                       ctypes.POINTER(ctypes.c_void_p)]

        def launch(grid, block, args, shared_mem=0):
            grid = tuple(grid) + (1,) * (2 - len(grid))
            assert self.block is None or block[0] == self.block, \
                "launch with the block size the module was built for"
            keep = [_arg(a) for a in args]
            pointers = [ctypes.cast(ctypes.pointer(k), ctypes.c_void_p) for k in keep]
            argv = (ctypes.c_void_p * len(keep))(*pointers)
            fn(grid[0], grid[1], block[0], shared_mem, argv)

        return launch


def _arg(a):
    if isinstance(a, np.ndarray):
        assert a.flags.c_contiguous, "kernels take contiguous arrays"
        return ctypes.c_void_p(a.ctypes.data)
    if isinstance(a, np.int32):
        return ctypes.c_int32(int(a))
    if isinstance(a, np.int64):
        return ctypes.c_int64(int(a))
    if isinstance(a, np.float32):
        return ctypes.c_float(float(a))
    if isinstance(a, (float, np.float64)):
        return ctypes.c_double(float(a))
    raise TypeError(f"unsupported kernel argument {type(a).__name__}")
