"""An int8 matrix-vector product for CPU decoding: int8 weights (one scale per output row, as `Int8Linear` stores
them) times activations quantized to int8 on the fly in blocks of 32 values with one float scale each, the scheme of
llama.cpp's Q8_0 dot product. The integer products run as AVX-512 VNNI ``vpdpbusd`` (64 weights per instruction) or
AVX2 ``vpmaddubsw``, so a decode step reads its weights at the memory system's rate instead of converting every
int8 weight to float first: over the 129M LM's 49 weights at batch 1 (2 threads, AVX-512 VNNI) 4.2-4.5 ms against
6.1 for Inductor's fused dequantizing reduction and 9.8-13 for ``aten._weight_int8pack_mm`` (`benchmarks/RESULTS.md`,
"int8 activations"). Nothing in PyTorch computes this (its int8 weight-only kernel takes bfloat16 activations, and
``_int_mm`` / ``quantized::linear_dynamic`` were slower here), hence our own kernel.

The C source below is compiled once per machine with the system's C compiler (``$CC``, else ``gcc`` / ``cc``; the
compiled step's Inductor needs one anyway) into ``$ML_MAMBA_KERNEL_CACHE`` (default ``~/.cache/ml_mamba/kernels``),
loaded with ctypes and picks its instructions at run time (``__builtin_cpu_supports``): AVX-512 VNNI, AVX2 + FMA, or
portable C. It runs on PyTorch's OpenMP threads. ``torch.ops.ml_mamba.int8_gemv`` is the op (opaque to
`torch.compile`); without a compiler, or with ``ML_MAMBA_INT8_GEMV=0``, `int8_gemv_available()` is False and
`Int8Linear` keeps PyTorch's kernel. The reference it is tested against is `int8_gemv_reference` (float64).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

BLOCK = 32  # activation values per int8 scale
ISAS = {"vnni": 2, "avx2": 1, "portable": 0}  # the kernel's instruction sets, fastest first

_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <immintrin.h>

#define BLOCK 32

static inline float bf16_to_f32(uint16_t v) { uint32_t u = (uint32_t)v << 16; float f; memcpy(&f, &u, 4); return f; }

/* One row of n floats -> int8 (zero-padded to n_pad, a multiple of 64) and one scale per BLOCK values. */
static void quantize_row(const float* x, int64_t n, int8_t* xq, float* xs, int64_t n_pad) {
    for (int64_t start = 0; start < n_pad; start += BLOCK) {
        int64_t end = start + BLOCK < n ? start + BLOCK : n;
        float amax = 0.f;
        for (int64_t k = start; k < end; ++k) amax = fmaxf(amax, fabsf(x[k]));
        float inv = amax > 0.f ? 127.f / amax : 0.f;
        xs[start / BLOCK] = amax / 127.f;
        for (int64_t k = start; k < start + BLOCK; ++k) xq[k] = k < end ? (int8_t)lrintf(x[k] * inv) : 0;
    }
}

static float dot_portable(const int8_t* xq, const float* xs, const int8_t* w, int64_t n) {
    float total = 0.f;
    for (int64_t start = 0; start < n; start += BLOCK) {
        int64_t end = start + BLOCK < n ? start + BLOCK : n;
        int32_t acc = 0;
        for (int64_t k = start; k < end; ++k) acc += (int32_t)xq[k] * (int32_t)w[k];
        total += xs[start / BLOCK] * (float)acc;
    }
    return total;
}

/* vpdpbusd multiplies unsigned by signed bytes: |x| times w with x's sign, four products summed per int32 lane.
   One weight row at a time: the rows of a thread's share are then read in one sequential stream, which the
   hardware prefetcher follows (interleaving four rows ran at half the speed). */
__attribute__((target("avx512f,avx512bw,avx512vnni")))
static void rows_vnni(const int8_t* xq, const float* xs, const int8_t* w, int64_t n, int64_t r0, int64_t r1,
                      const uint16_t* scale, float* y) {
    int64_t chunks = n / 64, used = chunks > 0 ? chunks : 1;
    __m512i ax[used];
    __mmask64 neg[used];
    __m512 sv[used];
    const __m512i zero = _mm512_setzero_si512();
    for (int64_t c = 0; c < chunks; ++c) {
        __m512i v = _mm512_loadu_si512(xq + 64 * c);
        ax[c] = _mm512_abs_epi8(v);
        neg[c] = _mm512_movepi8_mask(v);
        sv[c] = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(xs[2 * c]), _mm512_set1_ps(xs[2 * c + 1]));
    }
    for (int64_t r = r0; r < r1; ++r) {
        const int8_t* wr = w + r * n;
        __m512 acc = _mm512_setzero_ps();
        for (int64_t c = 0; c < chunks; ++c) {
            __m512i wv = _mm512_loadu_si512(wr + 64 * c);
            wv = _mm512_mask_sub_epi8(wv, neg[c], zero, wv);
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, ax[c], wv)), sv[c], acc);
        }
        float t = _mm512_reduce_add_ps(acc);
        if (chunks * 64 < n) t += dot_portable(xq + chunks * 64, xs + chunks * 2, wr + chunks * 64, n - chunks * 64);
        y[r] = t * bf16_to_f32(scale[r]);
    }
}

/* vpmaddubsw: |x| (u8) times w with x's sign (s8), pairs summed to int16 (at most 2 * 127 * 127: no saturation). */
__attribute__((target("avx2,fma")))
static void rows_avx2(const int8_t* xq, const float* xs, const int8_t* w, int64_t n, int64_t r0, int64_t r1,
                      const uint16_t* scale, float* y) {
    int64_t blocks = n / BLOCK;
    const __m256i ones = _mm256_set1_epi16(1);
    for (int64_t r = r0; r < r1; ++r) {
        const int8_t* wr = w + r * n;
        __m256 acc = _mm256_setzero_ps();
        for (int64_t c = 0; c < blocks; ++c) {
            __m256i xv = _mm256_loadu_si256((const __m256i*)(xq + BLOCK * c));
            __m256i wv = _mm256_loadu_si256((const __m256i*)(wr + BLOCK * c));
            __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(xv, xv), _mm256_sign_epi8(wv, xv));
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones)), _mm256_set1_ps(xs[c]), acc);
        }
        __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        s = _mm_add_ss(s, _mm_movehdup_ps(s));
        float t = _mm_cvtss_f32(s);
        if (blocks * BLOCK < n) t += dot_portable(xq + blocks * BLOCK, xs + blocks, wr + blocks * BLOCK, n - blocks * BLOCK);
        y[r] = t * bf16_to_f32(scale[r]);
    }
}

static void rows_portable(const int8_t* xq, const float* xs, const int8_t* w, int64_t n, int64_t r0, int64_t r1,
                          const uint16_t* scale, float* y) {
    for (int64_t r = r0; r < r1; ++r) y[r] = dot_portable(xq, xs, w + r * n, n) * bf16_to_f32(scale[r]);
}

/* The fastest instruction set this CPU has: 2 AVX-512 VNNI, 1 AVX2 + FMA, 0 portable C. */
int int8_gemv_best_isa(void) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw")) return 2;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
    return 0;
}

/* y (rows, out) float32 = x (rows, n) float32, quantized, times w (out, n) int8 scaled by scale (out, bfloat16 bits). */
int int8_gemv(const float* x, int64_t rows, int64_t n, const int8_t* w, const uint16_t* scale, float* y,
              int64_t out, int threads, int isa) {
    typedef void (*rows_fn)(const int8_t*, const float*, const int8_t*, int64_t, int64_t, int64_t, const uint16_t*, float*);
    rows_fn fn = isa == 2 ? rows_vnni : isa == 1 ? rows_avx2 : rows_portable;
    int64_t n_pad = (n + 63) / 64 * 64, scales = n_pad / BLOCK;
    int8_t* xq = (int8_t*)aligned_alloc(64, rows * n_pad);
    float* xs = (float*)malloc(sizeof(float) * rows * scales);
    if (xq == NULL || xs == NULL) { free(xq); free(xs); return 1; }
    for (int64_t b = 0; b < rows; ++b) quantize_row(x + b * n, n, xq + b * n_pad, xs + b * scales, n_pad);
    const int64_t per = 64;  /* output rows per task; OpenMP's static schedule gives each thread one contiguous run */
    int64_t tasks = (out + per - 1) / per;
    #pragma omp parallel for schedule(static) num_threads(threads) if(threads > 1 && out * n > 65536)
    for (int64_t t = 0; t < tasks; ++t) {
        int64_t r0 = t * per, r1 = r0 + per < out ? r0 + per : out;
        for (int64_t b = 0; b < rows; ++b) fn(xq + b * n_pad, xs + b * scales, w, n, r0, r1, scale, y + b * out);
    }
    free(xq);
    free(xs);
    return 0;
}
"""

_FLAGS = ["-O3", "-shared", "-fPIC", "-fopenmp"]


def _cache_folder() -> Path:
    return Path(os.environ.get("ML_MAMBA_KERNEL_CACHE") or Path.home() / ".cache" / "ml_mamba" / "kernels")


def _compile(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        source = Path(scratch) / "int8_gemv.c"
        source.write_text(_SOURCE)
        built = Path(scratch) / target.name
        subprocess.run([compiler, *_FLAGS, str(source), "-o", str(built)], check=True, capture_output=True,
                       text=True, timeout=120)
        os.replace(built, target)  # atomic: a concurrent build of the same source writes the same file


@functools.lru_cache(maxsize=None)
def _library() -> ctypes.CDLL | None:
    if os.environ.get("ML_MAMBA_INT8_GEMV", "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        logger.warning("No C compiler found ($CC, gcc, cc): int8 layers use PyTorch's slower int8 kernel.")
        return None
    digest = hashlib.sha256("\n".join([_SOURCE, compiler, *_FLAGS]).encode()).hexdigest()[:16]
    target = _cache_folder() / f"int8_gemv_{digest}.so"
    try:
        if not target.exists():
            _compile(compiler, target)
        library = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", "") or error
        logger.warning("Could not build the int8 GEMV kernel with %s (%s): int8 layers use PyTorch's slower kernel.",
                       compiler, str(detail).strip()[:500])
        return None
    library.int8_gemv.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                                  ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_int]
    library.int8_gemv.restype = ctypes.c_int
    library.int8_gemv_best_isa.restype = ctypes.c_int
    return library


def int8_gemv_available() -> bool:
    """Whether the kernel is built (or could be now) on this machine and not switched off (``ML_MAMBA_INT8_GEMV=0``)."""
    return _library() is not None


def supported_isas() -> list[str]:
    """The instruction sets the kernel can use on this CPU, fastest first (the first is what it uses)."""
    library = _library()
    best = library.int8_gemv_best_isa() if library is not None else -1
    return [name for name, level in ISAS.items() if level <= best]


def int8_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, isa: str | None = None) -> torch.Tensor:
    """``x`` (rows, in) float32, quantized to int8 per block of 32, times the int8 ``weight`` (out, in) scaled per
    row by ``scale`` (out,) bfloat16: (rows, out) float32. ``isa`` picks an instruction set (default: the fastest)."""
    library = _library()
    if library is None:
        raise RuntimeError("The int8 GEMV kernel is not available (no C compiler, or ML_MAMBA_INT8_GEMV=0).")
    if x.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"int8_gemv: x must be (rows, {weight.shape[1]}), got {tuple(x.shape)}.")
    if weight.dtype != torch.int8 or scale.dtype != torch.bfloat16 or scale.shape != (weight.shape[0],):
        raise ValueError(f"int8_gemv: expected an int8 weight and a bfloat16 scale per row, got {weight.dtype} "
                         f"{tuple(weight.shape)} and {scale.dtype} {tuple(scale.shape)}.")
    if x.device.type != "cpu" or weight.device.type != "cpu":
        raise ValueError(f"int8_gemv runs on CPU tensors, got {x.device} and {weight.device}.")
    best = library.int8_gemv_best_isa()
    level = best if isa is None else ISAS[isa]
    if level > best:
        raise ValueError(f"int8_gemv: this CPU does not support {isa!r}; it supports {supported_isas()}.")
    return _run(library, x.float().contiguous(), weight.contiguous(), scale.contiguous(), level)


def _run(library: ctypes.CDLL, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, level: int) -> torch.Tensor:
    """The kernel call itself, on contiguous float32 ``x``, int8 ``weight`` and bfloat16 ``scale`` (not checked)."""
    y = torch.empty(x.shape[0], weight.shape[0], dtype=torch.float32)
    if library.int8_gemv(x.data_ptr(), x.shape[0], x.shape[1], weight.data_ptr(), scale.data_ptr(), y.data_ptr(),
                         weight.shape[0], torch.get_num_threads(), level):
        raise MemoryError("int8_gemv could not allocate its quantized activations.")
    return y


def int8_gemv_reference(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """What `int8_gemv` computes, with PyTorch ops: the activations quantized the same way (float32 scaling, round
    to nearest even), the products summed in float64."""
    rows, n = x.shape
    blocks = F.pad(x.float(), (0, -n % BLOCK)).view(rows, -1, BLOCK)
    amax = blocks.abs().amax(-1, keepdim=True)
    quantized = torch.round(blocks * torch.where(amax > 0, 127.0 / amax, 0.0))
    dequantized = (quantized.double() * (amax / 127.0).double()).view(rows, -1)[:, :n]
    return dequantized @ weight.double().t() * scale.double()


# The op through torch.library's define / impl rather than `custom_op`, whose Python wrapper costs ~6 us more a call
# (measured: 9.5 vs 14.2 us for a tiny product; a decode step makes 49 calls). Registered once per process, also
# when this file is imported a second time under another name.
if not hasattr(torch.ops.ml_mamba, "int8_gemv"):
    torch.library.define("ml_mamba::int8_gemv", "(Tensor x, Tensor weight, Tensor scale) -> Tensor")

    @torch.library.impl("ml_mamba::int8_gemv", "cpu")
    def _int8_gemv_cpu(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        library = _library()
        return _run(library, x.float().contiguous(), weight, scale, library.int8_gemv_best_isa())

    @torch.library.register_fake("ml_mamba::int8_gemv")
    def _(x, weight, scale):
        return x.new_empty(x.shape[0], weight.shape[0], dtype=torch.float32)


__all__ = ["int8_gemv", "int8_gemv_available", "int8_gemv_reference", "supported_isas", "BLOCK"]
