"""Our C code for CPU decoding, where nothing in PyTorch reaches the memory system's rate: two kernels and, built on
them, a whole int8 Mamba-2 decode step.

* `int8_gemv`: int8 weights (one scale per output row, as `Int8Linear` stores them) times activations quantized to
  int8 on the fly in blocks of 32 values with one float scale each, the scheme of llama.cpp's Q8_0 dot product. The
  integer products run as AVX-512 VNNI ``vpdpbusd`` (64 weights per instruction) or AVX2 ``vpmaddubsw``, so the
  weights are read at the memory's rate instead of being converted to float one by one: over the 129M LM's 49
  weights at batch 1 (2 threads) 4.7-5.9 ms against 6.5-7.3 for Inductor's fused dequantizing reduction and 10-11
  for ``aten._weight_int8pack_mm`` (`benchmarks/bench_gemv.py`). PyTorch's int8 weight-only kernel takes bfloat16
  activations, and ``_int_mm`` / ``quantized::linear_dynamic`` were slower here.
* `ssm_step`: one token of the Mamba-2 recurrence in one pass over the float32 state (decay, input, the output's
  dot product with C and the skip term), in place. PyTorch makes three passes (``mul_``, ``addcmul_``, ``bmm``),
  Inductor's code two; over the 129M LM's 19 MB of states this kernel takes ~1.2 ms a token, and the int8 decode
  step 1.3-1.4 ms less than with PyTorch's passes (static 12.7 vs 14.2 ms, compiled 9.3 vs 10.6; RESULTS.md).
* `Mamba2CStep`: every layer of a Mamba-2 LM with int8 or float32 projections (norms, projections, conv, dt, state
  update, gated norm, residual) and the head in one call per token. The compiled int8 step spent ~2 ms a token in
  Python between its kernels (Dynamo's guards, Inductor's wrapper); in C the int8 step takes 6.3-6.9 ms against
  8-10 compiled (1.03-1.22x llama.cpp's Q8_0 on the same weights), the float32 one 18.9 against 40.3 for the Python
  static step (`benchmarks/RESULTS.md`).

The C source below is compiled once per machine with the system's C compiler (``$CC``, else ``gcc`` / ``cc``; the
compiled step's Inductor needs one anyway) into ``$ML_MAMBA_KERNEL_CACHE`` (default ``~/.cache/ml_mamba/kernels``),
loaded with ctypes, and picks its instructions at run time (``__builtin_cpu_supports``, GCC's ``target_clones``). It
runs on PyTorch's OpenMP threads. The ops ``torch.ops.ml_mamba.int8_gemv`` / ``ssm_step`` are opaque to
`torch.compile`. On other CPUs than x86-64, without a compiler, or with ``ML_MAMBA_CPU_KERNELS=0``,
`cpu_kernels_available()` is False and the callers keep PyTorch's kernels. The references they are tested against:
`int8_gemv_reference`, `ssm_step_reference`.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
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
        if (blocks * BLOCK < n)
            t += dot_portable(xq + blocks * BLOCK, xs + blocks, wr + blocks * BLOCK, n - blocks * BLOCK);
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

/* y (rows, out) float32 = x (rows, n) float32, quantized, times w (out, n) int8 scaled by scale (out, bfloat16
   bits). */
int int8_gemv(const float* x, int64_t rows, int64_t n, const int8_t* w, const uint16_t* scale, float* y,
              int64_t out, int threads, int isa) {
    typedef void (*rows_fn)(const int8_t*, const float*, const int8_t*, int64_t, int64_t, int64_t, const uint16_t*,
                            float*);
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

/* One token of the Mamba-2 recurrence for one head, in place, in one pass over its state (head_dim x n):
   state[p, :] = decay * state[p, :] + x[p] * dt * B;  y[p] = state[p, :] . C + D * x[p] */
__attribute__((target_clones("avx512f", "avx2", "default")))
static void ssm_head(float* state, const float* x, float dt, float decay, const float* B, const float* C, float D,
                     float* y, int64_t head_dim, int64_t n) {
    for (int64_t p = 0; p < head_dim; ++p) {
        float* s = state + p * n;
        const float xd = x[p] * dt;
        float acc = 0.f;
        #pragma omp simd reduction(+:acc)
        for (int64_t k = 0; k < n; ++k) {
            const float v = s[k] * decay + xd * B[k];
            s[k] = v;
            acc += v * C[k];
        }
        y[p] = acc + D * x[p];
    }
}

/* state (batch, heads, head_dim, n), x and y (batch, heads, head_dim), dt and decay (batch, heads), B and C
   (batch, groups, n), D (heads): all float32, contiguous. */
void ssm_step(float* state, const float* x, const float* dt, const float* decay, const float* B, const float* C,
              const float* D, float* y, int64_t batch, int64_t heads, int64_t head_dim, int64_t groups, int64_t n,
              int threads) {
    const int64_t per_group = heads / groups;
    #pragma omp parallel for schedule(static) num_threads(threads) \
        if(threads > 1 && batch * heads * head_dim * n > 65536)
    for (int64_t bh = 0; bh < batch * heads; ++bh) {
        const int64_t b = bh / heads, h = bh % heads, g = h / per_group;
        ssm_head(state + bh * head_dim * n, x + bh * head_dim, dt[bh], decay[bh], B + (b * groups + g) * n,
                 C + (b * groups + g) * n, D[h], y + bh * head_dim, head_dim, n);
    }
}

/* ---- A whole Mamba-2 decode step: every layer in C, one call per token -------------------------------------- */

/* float32 weights: one dot product per weight row, the rows of a thread's share read in one sequential stream */
__attribute__((target_clones("avx512f", "avx2", "default")))
static float dot_f32(const float* x, const float* w, int64_t n) {
    float acc = 0.f;
    #pragma omp simd reduction(+:acc)
    for (int64_t k = 0; k < n; ++k) acc += x[k] * w[k];
    return acc;
}

static void f32_gemv(const float* x, int64_t rows, int64_t n, const float* w, float* y, int64_t out, int threads) {
    const int64_t per = 64, tasks = (out + per - 1) / per;
    #pragma omp parallel for schedule(static) num_threads(threads) if(threads > 1 && out * n > 16384)
    for (int64_t t = 0; t < tasks; ++t) {
        const int64_t r1 = (t + 1) * per < out ? (t + 1) * per : out;
        for (int64_t r = t * per; r < r1; ++r)
            for (int64_t b = 0; b < rows; ++b) y[b * out + r] = dot_f32(x + b * n, w + r * n, n);
    }
}

/* y = x W^T + bias for int8 weights with bfloat16 row scales (scale != NULL) or float32 weights (scale == NULL) */
static int project(const float* x, int64_t rows, int64_t n, const void* w, const uint16_t* scale, const float* bias,
                   float* y, int64_t out, int threads, int isa) {
    int status = 0;
    if (scale) status = int8_gemv(x, rows, n, (const int8_t*)w, scale, y, out, threads, isa);
    else f32_gemv(x, rows, n, (const float*)w, y, out, threads);
    if (bias)
        for (int64_t b = 0; b < rows; ++b)
            for (int64_t k = 0; k < out; ++k) y[b * out + k] += bias[k];
    return status;
}

typedef struct {
    const float* norm_w;                                      /* block RMSNorm (d_model) */
    const void* in_w; const uint16_t* in_s; const float* in_b;  /* in_proj (in_out, d_model); int8 + scales or
                                                                   float32 (in_s NULL); bias or NULL */
    const float* conv_w; const float* conv_b;                 /* depthwise conv (conv_dim, kernel), bias or NULL */
    const float* dt_bias; const float* A_log; const float* D;  /* (heads) each */
    const float* gnorm_w;                                     /* gated RMSNorm (d_inner) */
    const void* out_w; const uint16_t* out_s; const float* out_b;  /* out_proj (d_model, d_inner), the same */
} mamba2_layer;

typedef struct {
    int64_t d_model, d_inner, conv_dim, kernel, heads, head_dim, groups, n, group_size, in_out;
    float norm_eps, gated_eps, dt_min, dt_max;
} mamba2_dims;

static void rms_norm_row(const float* x, const float* w, float* out, int64_t n, float eps) {
    double sum = 0.0;
    for (int64_t k = 0; k < n; ++k) sum += (double)x[k] * x[k];
    const float inv = 1.f / sqrtf((float)(sum / n) + eps);
    for (int64_t k = 0; k < n; ++k) out[k] = w[k] * (x[k] * inv);
}

static inline float silu(float v) { return v / (1.f + expf(-v)); }
static inline float softplus(float v) { return v > 20.f ? v : log1pf(expf(v)); }

/* One token for `batch` sequences: hidden (batch, d_model) holds the embeddings and is overwritten; logits
   (batch, vocab). conv_states[l] (batch, conv_dim, kernel) and ssm_states[l] (batch, heads, head_dim, n) advance in
   place. Returns 0, or 1 when scratch memory could not be allocated. */
int mamba2_step(const mamba2_layer* layers, int64_t n_layers, float* const* conv_states, float* const* ssm_states,
                float* hidden, int64_t batch, const float* norm_f_w, float norm_f_eps, const void* head_w,
                const uint16_t* head_s, const float* head_b, int64_t vocab, float* logits, const mamba2_dims* d,
                int threads, int isa) {
    const int64_t dm = d->d_model, di = d->d_inner, cd = d->conv_dim, K = d->kernel, H = d->heads, P = d->head_dim,
                  G = d->groups, N = d->n, io = d->in_out;
    float* normed = (float*)malloc(sizeof(float) * batch * (dm > di ? dm : di));
    float* zx = (float*)malloc(sizeof(float) * batch * io);
    float* xbc = (float*)malloc(sizeof(float) * batch * cd);
    float* y = (float*)malloc(sizeof(float) * batch * di);
    float* out = (float*)malloc(sizeof(float) * batch * dm);
    float* dts = (float*)malloc(sizeof(float) * batch * H * 2);  /* dt, then the decays */
    float* decays = dts + batch * H;
    int status = (normed && zx && xbc && y && out && dts) ? 0 : 1;
    for (int64_t l = 0; l < n_layers && status == 0; ++l) {
        const mamba2_layer* L = layers + l;
        for (int64_t b = 0; b < batch; ++b) rms_norm_row(hidden + b * dm, L->norm_w, normed + b * dm, dm, d->norm_eps);
        status |= project(normed, batch, dm, L->in_w, L->in_s, L->in_b, zx, io, threads, isa);
        for (int64_t b = 0; b < batch; ++b) {
            const float* row = zx + b * io;
            /* the causal conv: shift the new inputs into the window, then a dot product per channel, then SiLU */
            float* window = conv_states[l] + b * cd * K;
            for (int64_t c = 0; c < cd; ++c) {
                float* wc = window + c * K;
                float acc = L->conv_b ? L->conv_b[c] : 0.f;
                for (int64_t k = 0; k + 1 < K; ++k) wc[k] = wc[k + 1];
                wc[K - 1] = row[di + c];
                for (int64_t k = 0; k < K; ++k) acc += wc[k] * L->conv_w[c * K + k];
                xbc[b * cd + c] = silu(acc);
            }
            for (int64_t h = 0; h < H; ++h) {
                float dt = softplus(row[di + cd + h] + L->dt_bias[h]);
                dt = dt < d->dt_min ? d->dt_min : dt > d->dt_max ? d->dt_max : dt;
                float log_decay = dt * -expf(L->A_log[h]);
                dts[b * H + h] = dt;
                decays[b * H + h] = expf(log_decay < -80.f ? -80.f : log_decay);
            }
        }
        for (int64_t b = 0; b < batch; ++b) {  /* x, B and C lie side by side in each row of xbc */
            const float* xb = xbc + b * cd;
            ssm_step(ssm_states[l] + b * H * P * N, xb, dts + b * H, decays + b * H, xb + di, xb + di + G * N, L->D,
                     y + b * di, 1, H, P, G, N, threads);
        }
        for (int64_t b = 0; b < batch; ++b) {  /* gated RMSNorm per group, then out_proj's input */
            const float* gate = zx + b * io;
            float* yb = y + b * di;
            for (int64_t k = 0; k < di; ++k) yb[k] *= silu(gate[k]);
            for (int64_t start = 0; start < di; start += d->group_size)
                rms_norm_row(yb + start, L->gnorm_w + start, normed + b * di + start, d->group_size, d->gated_eps);
        }
        status |= project(normed, batch, di, L->out_w, L->out_s, L->out_b, out, dm, threads, isa);
        for (int64_t k = 0; k < batch * dm; ++k) hidden[k] += out[k];
    }
    if (status == 0) {
        for (int64_t b = 0; b < batch; ++b) rms_norm_row(hidden + b * dm, norm_f_w, normed + b * dm, dm, norm_f_eps);
        status |= project(normed, batch, dm, head_w, head_s, head_b, logits, vocab, threads, isa);
    }
    free(normed); free(zx); free(xbc); free(y); free(out); free(dts);
    return status;
}
"""

_FLAGS = ["-O3", "-shared", "-fPIC", "-fopenmp"]


def _cache_folder() -> Path:
    return Path(os.environ.get("ML_MAMBA_KERNEL_CACHE") or Path.home() / ".cache" / "ml_mamba" / "kernels")


def _compile(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        source = Path(scratch) / "cpu_kernels.c"
        source.write_text(_SOURCE)
        built = Path(scratch) / target.name
        subprocess.run([compiler, *_FLAGS, str(source), "-o", str(built)], check=True, capture_output=True,
                       text=True, timeout=120)
        os.replace(built, target)  # atomic: a concurrent build of the same source writes the same file


@functools.lru_cache(maxsize=None)
def _library() -> ctypes.CDLL | None:
    if os.environ.get("ML_MAMBA_CPU_KERNELS", "1") == "0" or platform.machine().lower() not in ("x86_64", "amd64"):
        return None  # switched off, or not an x86-64 CPU (the source uses x86 intrinsics)
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        logger.warning("No C compiler found ($CC, gcc, cc): decoding uses PyTorch's slower kernels.")
        return None
    digest = hashlib.sha256("\n".join([_SOURCE, compiler, *_FLAGS]).encode()).hexdigest()[:16]
    target = _cache_folder() / f"cpu_kernels_{digest}.so"
    try:
        if not target.exists():
            _compile(compiler, target)
        library = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", "") or error
        logger.warning("Could not build ml-mamba's CPU kernels with %s (%s): decoding uses PyTorch's slower kernels.",
                       compiler, str(detail).strip()[:500])
        return None
    library.int8_gemv.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                                  ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_int]
    library.int8_gemv.restype = ctypes.c_int
    library.int8_gemv_best_isa.restype = ctypes.c_int
    library.ssm_step.argtypes = [ctypes.c_void_p] * 8 + [ctypes.c_int64] * 5 + [ctypes.c_int]
    library.ssm_step.restype = None
    library.mamba2_step.argtypes = [
        ctypes.POINTER(_Layer), ctypes.c_int64, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_void_p),
        ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.POINTER(_Dims), ctypes.c_int, ctypes.c_int]
    library.mamba2_step.restype = ctypes.c_int
    return library


def cpu_kernels_available() -> bool:
    """Whether the kernels are built (or could be now) on this machine and not switched off
    (``ML_MAMBA_CPU_KERNELS=0``)."""
    return _library() is not None


def fast_int8_gemv_available() -> bool:
    """Whether `int8_gemv` runs on AVX2 or AVX-512 VNNI here (its portable C loop is slower than PyTorch's kernel)."""
    return supported_isas()[:1] in (["vnni"], ["avx2"])


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
        raise RuntimeError("ml-mamba's CPU kernels are not available (no C compiler, or ML_MAMBA_CPU_KERNELS=0).")
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


def ssm_step(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, decay: torch.Tensor, B: torch.Tensor,
             C: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """One token of the Mamba-2 recurrence, ``state`` (batch, heads, head_dim, n) updated in place:
    ``state = decay * state + (x * dt) B``, returns ``y = state . C + D * x`` (batch, heads, head_dim). ``x``
    (batch, heads, head_dim), ``dt`` and ``decay`` (batch, heads), ``B`` and ``C`` (batch, groups, n), ``D``
    (heads,); all float32 CPU tensors, ``state`` contiguous."""
    library = _library()
    if library is None:
        raise RuntimeError("ml-mamba's CPU kernels are not available (no C compiler, or ML_MAMBA_CPU_KERNELS=0).")
    batch, heads, head_dim, n = state.shape
    groups = B.shape[1]
    expected = {"x": (batch, heads, head_dim), "dt": (batch, heads), "decay": (batch, heads), "B": (batch, groups, n),
                "C": (batch, groups, n), "D": (heads,)}
    for name, tensor in zip(expected, (x, dt, decay, B, C, D)):
        if tuple(tensor.shape) != expected[name] or tensor.dtype != torch.float32 or tensor.device.type != "cpu":
            raise ValueError(f"ssm_step: {name} must be a float32 CPU tensor of shape {expected[name]} for a state "
                             f"of shape {tuple(state.shape)}, got {tensor.dtype} {tuple(tensor.shape)} on "
                             f"{tensor.device}.")
    if state.dtype != torch.float32 or not state.is_contiguous() or heads % groups:
        raise ValueError(f"ssm_step: the state must be contiguous float32 with heads divisible by groups, got "
                         f"{state.dtype}, contiguous={state.is_contiguous()}, {heads} heads, {groups} groups.")
    return _run_ssm(library, state, x, dt, decay, B, C, D)


def _run_ssm(library, state, x, dt, decay, B, C, D) -> torch.Tensor:
    batch, heads, head_dim, n = state.shape
    x, dt, decay, B, C, D = (t.contiguous() for t in (x, dt, decay, B, C, D))
    y = torch.empty(batch, heads, head_dim, dtype=torch.float32)
    library.ssm_step(state.data_ptr(), x.data_ptr(), dt.data_ptr(), decay.data_ptr(), B.data_ptr(), C.data_ptr(),
                     D.data_ptr(), y.data_ptr(), batch, heads, head_dim, B.shape[1], n, torch.get_num_threads())
    return y


def ssm_step_reference(state, x, dt, decay, B, C, D) -> torch.Tensor:
    """`ssm_step` with PyTorch ops, ``state`` updated in place: the static step's path where the kernel is not
    used, and the reference the kernel is tested against."""
    batch, heads, head_dim, n = state.shape
    groups = B.shape[1]
    grouped = state.view(batch, groups, heads // groups, head_dim, n)
    x_dt = (x * dt[..., None]).view(batch, groups, heads // groups, head_dim, 1)
    grouped.mul_(decay.view(batch, groups, heads // groups, 1, 1)).addcmul_(x_dt, B.view(batch, groups, 1, 1, n))
    y = torch.bmm(state.view(batch * groups, heads // groups * head_dim, n), C.reshape(batch * groups, n, 1))
    return y.view(batch, heads, head_dim) + D[:, None] * x


class _Layer(ctypes.Structure):
    _fields_ = [(name, ctypes.c_void_p) for name in (
        "norm_w", "in_w", "in_s", "in_b", "conv_w", "conv_b", "dt_bias", "A_log", "D", "gnorm_w", "out_w", "out_s",
        "out_b")]


class _Dims(ctypes.Structure):
    _fields_ = ([(name, ctypes.c_int64) for name in ("d_model", "d_inner", "conv_dim", "kernel", "heads", "head_dim",
                                                      "groups", "n", "group_size", "in_out")]
                + [(name, ctypes.c_float) for name in ("norm_eps", "gated_eps", "dt_min", "dt_max")])


def _pointer(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


class Mamba2CStep:
    """A whole Mamba-2 decode step in C (`mamba2_step`): every layer's norm, in_proj, conv, SSM update, gated norm,
    out_proj and residual, then the final norm and the head, in one call per token, so no Python runs between the
    kernels (~2 ms a token of the compiled int8 step). Projections are `Int8Linear` with int8 activations (our int8
    GEMV) or float32 `nn.Linear` in the default layout (a dot product per weight row); the other weights float32
    (`eligible`)."""

    def __init__(self, language_model, lm_head):
        self.language_model, self.lm_head = language_model, lm_head
        self.tensors = []  # the tensors the pointers point into, kept alive here
        layers = (_Layer * len(language_model.layers))()
        for layer, block in zip(layers, language_model.layers):
            mixer = block.mixer
            for name, tensor in (("norm_w", block.norm.weight), ("conv_w", mixer.conv1d.weight),
                                 ("conv_b", mixer.conv1d.bias), ("dt_bias", mixer.dt_bias), ("A_log", mixer.A_log),
                                 ("D", mixer.D), ("gnorm_w", mixer.norm.weight)):
                setattr(layer, name, self._keep(tensor))
            layer.in_w, layer.in_s, layer.in_b = self._projection(mixer.in_proj)
            layer.out_w, layer.out_s, layer.out_b = self._projection(mixer.out_proj)
        self.layers = layers
        mixer, block = language_model.layers[0].mixer, language_model.layers[0]
        low, high = mixer.time_step_limit
        self.dims = _Dims(block.norm.weight.numel(), mixer.intermediate_size, mixer.conv_dim, mixer.conv_kernel_size,
                          mixer.num_heads, mixer.head_dim, mixer.n_groups, mixer.ssm_state_size, mixer.norm.group_size,
                          mixer.in_proj.out_features, block.norm.variance_epsilon, mixer.norm.variance_epsilon, low,
                          high)
        self.norm_f = self._keep(language_model.norm_f.weight)
        self.norm_f_eps = language_model.norm_f.variance_epsilon
        self.head = self._projection(lm_head)

    def __reduce__(self):
        # copies and pickles are built anew from the (copied) modules: the C pointers belong to these tensors only
        return Mamba2CStep, (self.language_model, self.lm_head)

    def _keep(self, tensor):
        if tensor is None:
            return None
        tensor = tensor.detach()
        if not tensor.is_contiguous():
            raise ValueError("Mamba2CStep needs contiguous weights (the default layout).")
        self.tensors.append(tensor)
        return tensor.data_ptr()

    def _projection(self, linear) -> tuple:
        """(weight, int8 row scales or None for float32 weights, bias) pointers of a projection."""
        if getattr(linear, "int8_activations", False):
            return self._keep(linear.weight_int8), self._keep(linear.scale), self._keep(linear.bias)
        return self._keep(linear.weight), None, self._keep(linear.bias)

    @staticmethod
    def _projection_ok(linear) -> bool:
        if getattr(linear, "int8_activations", False):
            return fast_int8_gemv_available()
        return (type(linear) is torch.nn.Linear and linear.weight.dtype == torch.float32
                and linear.weight.device.type == "cpu" and (linear.bias is None or linear.bias.dtype == torch.float32))

    @staticmethod
    def eligible(language_model, lm_head) -> bool:
        """Mamba-2 blocks of SiLU mixers whose in/out projections and head are `Int8Linear` with int8 activations or
        float32 `nn.Linear` on CPU, with float32 norms, conv, ``A_log``, ``D`` and ``dt_bias``, and no extra MLP in
        ``in_proj``."""
        if not cpu_kernels_available() or not Mamba2CStep._projection_ok(lm_head):
            return False
        for block in language_model.layers:
            mixer = getattr(block, "mixer", None)
            if mixer is None or not hasattr(mixer, "A_log") or mixer.activation not in ("silu", "swish"):
                return False
            if not (Mamba2CStep._projection_ok(mixer.in_proj) and Mamba2CStep._projection_ok(mixer.out_proj)):
                return False
            expected = mixer.intermediate_size + mixer.conv_dim + mixer.num_heads
            floats = [block.norm.weight, mixer.conv1d.weight, mixer.dt_bias, mixer.A_log, mixer.D, mixer.norm.weight]
            if mixer.in_proj.out_features != expected or any(t.dtype != torch.float32 or t.device.type != "cpu"
                                                              for t in floats):
                return False
        return language_model.norm_f.weight.dtype == torch.float32

    def __call__(self, input_ids: torch.Tensor, conv_states: list, ssm_states: list) -> torch.Tensor:
        hidden = self.language_model.embeddings(input_ids[:, 0]).float().contiguous()
        batch = hidden.shape[0]
        if not all(s.is_contiguous() and s.dtype == torch.float32 for s in list(conv_states) + list(ssm_states)):
            raise ValueError("Mamba2CStep needs contiguous float32 conv and SSM states.")
        logits = torch.empty(batch, self.lm_head.out_features, dtype=torch.float32)
        pointers = ctypes.c_void_p * len(conv_states)
        library = _library()
        status = library.mamba2_step(
            self.layers, len(self.layers), pointers(*[s.data_ptr() for s in conv_states]),
            pointers(*[s.data_ptr() for s in ssm_states]), hidden.data_ptr(), batch, self.norm_f, self.norm_f_eps,
            *self.head, self.lm_head.out_features, logits.data_ptr(), ctypes.byref(self.dims),
            torch.get_num_threads(), library.int8_gemv_best_isa())
        if status:
            raise MemoryError("mamba2_step could not allocate its scratch buffers.")
        return logits


# The ops through torch.library's define / impl rather than `custom_op`, whose Python wrapper costs ~6 us more a call
# (measured: 9.5 vs 14.2 us for a tiny product; a decode step makes 73 calls). Registered once per process, also
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

if not hasattr(torch.ops.ml_mamba, "ssm_step"):
    torch.library.define("ml_mamba::ssm_step", "(Tensor(a!) state, Tensor x, Tensor dt, Tensor decay, Tensor B, "
                         "Tensor C, Tensor D) -> Tensor")

    @torch.library.impl("ml_mamba::ssm_step", "cpu")
    def _ssm_step_cpu(state, x, dt, decay, B, C, D):
        return _run_ssm(_library(), state, x, dt, decay, B, C, D)

    @torch.library.register_fake("ml_mamba::ssm_step")
    def _(state, x, dt, decay, B, C, D):
        return x.new_empty(x.shape, dtype=torch.float32)


__all__ = ["int8_gemv", "cpu_kernels_available", "fast_int8_gemv_available", "int8_gemv_reference", "ssm_step",
           "ssm_step_reference", "supported_isas", "Mamba2CStep", "BLOCK"]
