// The llama layer's elementwise ops in one pass each, bit for bit what transformers computes: this file is
// compiled with -ffp-contract=off, so no multiply-add is fused and every product and sum rounds on its own.
//
// rope_store: RoPE on a step's queries and keys, in place, and the keys and values written into the block
// pool (seven torch ops otherwise; a 512-row step spent ~12 ms on them), x * cos + rotate_half(x) * sin.
// Keys go in as columns of their block, values as rows (paged_attention.cpp reads them so); the keys of the
// first rows can be left to the decode kernel, which writes each into lines it is about to read anyway.
// rope_store_f16 writes them as IEEE half (--kv-cache-dtype float16), where the CPU converts in hardware.
//
// add_rms_norm: the residual add and the RMSNorm after it (eight torch ops otherwise), with the sum of
// squares taken in the order of torch's CPU sum (its cascade over W-lane vectors), so the bits are torch's.
// The loader checks that against torch on this machine before using it.
//
// silu_mul: the MLP's silu(gate) * up, with torch's own exp (Sleef's, found in libtorch_cpu) where torch uses it
// (llama_layers takes matmul.cpp's matmul_silu instead where it is given: the projection and this in one pass).
//
// llama_layers: every decoder layer of one step in a single call, the kernels above and the matmul and
// attention kernels (given as function pointers) in the order LlamaForward calls them: the ~100 us of
// Python and torch dispatch a layer costs around them was an eighth of a one-sequence step.
#ifdef __F16C__
#include <immintrin.h>
#endif
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>

// A key or value row into the pool: copied, or as IEEE half rounded to nearest, saturated at +-65504 so that a large
// value stays finite (an infinite key would make its scores NaN); a NaN stays NaN, as it would in float.
static inline void store_row(float *dst, const float *src, int64_t D) { memcpy(dst, src, sizeof(float) * D); }
#ifdef __F16C__
static inline void store_row(uint16_t *dst, const float *src, int64_t D) {
    const __m256 top = _mm256_set1_ps(65504.0f), bottom = _mm256_set1_ps(-65504.0f);
    int64_t i = 0;
    for (; i + 8 <= D; i += 8) {  // max and min return their second operand where one is NaN: x
        const __m256 x = _mm256_min_ps(top, _mm256_max_ps(bottom, _mm256_loadu_ps(src + i)));
        _mm_storeu_si128((__m128i *)(dst + i), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
    }
    for (; i < D; i++) {
        const float x = src[i] > 65504.0f ? 65504.0f : src[i] < -65504.0f ? -65504.0f : src[i];
        dst[i] = _cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT);
    }
}
#endif

// A key into its column (D elements BS apart), as store_row would round each.
static inline void store_col(float *dst, const float *src, int64_t D, int64_t BS) {
    for (int64_t i = 0; i < D; i++) dst[i * BS] = src[i];
}
#ifdef __F16C__
static inline void store_col(uint16_t *dst, const float *src, int64_t D, int64_t BS) {
    for (int64_t i = 0; i < D; i++) store_row(dst + i * BS, src + i, 1);
}
#endif

// qkv [T, W] rows: H query heads, then KVH key heads, then KVH value heads, each of D floats (W >= (H + 2 KVH) D).
// cos, sin [T, D]; slots [T] pool slot of each row; kpool, vpool [KVH, S / BS, BS, D] one layer's keys (as [D][BS] a
// block) and values (S slots a head, BS a block); rows below first rotated and their values written, not their keys.
template <class E>
static void rope_store_as(float *qkv, const float *cos, const float *sin, const int64_t *slots, E *kpool, E *vpool, int64_t T, int64_t H, int64_t KVH,
                          int64_t D, int64_t W, int64_t S, int64_t BS, int64_t first, int threads) {
    const int64_t half = D / 2;
#pragma omp parallel for num_threads(threads > 0 ? threads : 1) schedule(static)
    for (int64_t t = 0; t < T; t++) {
        float *row = qkv + t * W;
        const float *c = cos + t * D, *s = sin + t * D;
        for (int64_t n = 0; n < H + KVH; n++) {
            float *x = row + n * D;
            for (int64_t i = 0; i < half; i++) {
                const float x1 = x[i], x2 = x[i + half];
                x[i] = x1 * c[i] + (-x2) * s[i];
                x[i + half] = x2 * c[i + half] + x1 * s[i + half];
            }
        }
        const int64_t column = slots[t] / BS * BS * D + slots[t] % BS;
        for (int64_t j = 0; j < KVH; j++) {
            if (t >= first) store_col(kpool + j * S * D + column, row + (H + j) * D, D, BS);
            store_row(vpool + (j * S + slots[t]) * D, row + (H + KVH + j) * D, D);
        }
    }
}

extern "C" void rope_store(float *qkv, const float *cos, const float *sin, const int64_t *slots, float *kpool, float *vpool, int64_t T, int64_t H,
                           int64_t KVH, int64_t D, int64_t W, int64_t S, int64_t BS, int64_t first, int threads) {
    rope_store_as(qkv, cos, sin, slots, kpool, vpool, T, H, KVH, D, W, S, BS, first, threads);
}

#ifdef __F16C__
extern "C" void rope_store_f16(float *qkv, const float *cos, const float *sin, const int64_t *slots, void *kpool, void *vpool, int64_t T, int64_t H,
                               int64_t KVH, int64_t D, int64_t W, int64_t S, int64_t BS, int64_t first, int threads) {
    rope_store_as(qkv, cos, sin, slots, (uint16_t *)kpool, (uint16_t *)vpool, T, H, KVH, D, W, S, BS, first, threads);
}
#endif

// torch's float sum of x[0, n) in W-lane vectors (aten/native/cpu/SumKernel.cpp's cascade_sum, inner
// contiguous case): four interleaved vector accumulators through a cascade of levels, then the
// leftover vectors, the accumulators added in order, the scalar tail, and the lanes added in order.
typedef float v16 __attribute__((vector_size(64), aligned(4)));
typedef float v8 __attribute__((vector_size(32), aligned(4)));

template <typename vec, int W>
static float torch_sum(const float *x, int64_t n) {
    const int64_t vectors = n / W, size = vectors / 4;
    int64_t log2 = 1;  // torch's CeilLog2 (1 for size <= 2)
    while (size > 2 && (int64_t(1) << log2) < size) log2++;
    const int64_t power = log2 / 4 > 4 ? log2 / 4 : 4, step = int64_t(1) << power, mask = step - 1;
    vec acc[4][4] = {};  // [level][interleaved accumulator]
    const vec *v = (const vec *)x;
    int64_t i = 0;
    while (i + step <= size) {
        for (int64_t j = 0; j < step; j++, i++)
            for (int k = 0; k < 4; k++) acc[0][k] += v[4 * i + k];
        for (int level = 1; level < 4; level++) {
            for (int k = 0; k < 4; k++) acc[level][k] += acc[level - 1][k], acc[level - 1][k] = vec{};
            if ((i & (mask << (level * power))) != 0) break;
        }
    }
    for (; i < size; i++)
        for (int k = 0; k < 4; k++) acc[0][k] += v[4 * i + k];
    for (int level = 1; level < 4; level++)
        for (int k = 0; k < 4; k++) acc[0][k] += acc[level][k];
    for (int64_t r = size * 4; r < vectors; r++) acc[0][0] += v[r];
    for (int k = 1; k < 4; k++) acc[0][0] += acc[0][k];
    float total = 0.0f;
    for (int64_t r = vectors * W; r < n; r++) total += x[r];
    for (int k = 0; k < W; k++) total += acc[0][0][k];
    return total;
}

// x [T, N] (+= delta [T, N] first, in place, when delta is given); out [T, N] = weight * (x * rsqrt(mean(x^2) + eps)),
// op for op as transformers' LlamaRMSNorm in float32. lanes: the vector width of torch's sum here (16 or 8).
extern "C" void add_rms_norm(float *x, const float *delta, const float *weight, float *out, int64_t T, int64_t N, float eps, int lanes,
                             int threads) {
    const int64_t chunk = 4096 / (N > 0 ? N : 1) + 1;  // rows a thread takes at once: small steps stay on one thread
#pragma omp parallel for num_threads(threads > 0 && T > chunk ? threads : 1) schedule(static)
    for (int64_t t = 0; t < T; t++) {
        float *row = x + t * N, *o = out + t * N;
        if (delta != nullptr)
            for (int64_t i = 0; i < N; i++) row[i] = row[i] + delta[t * N + i];
        for (int64_t i = 0; i < N; i++) o[i] = row[i] * row[i];  // the squares, as torch's pow(2) writes them
        const float mean = (lanes == 16 ? torch_sum<v16, 16>(o, N) : torch_sum<v8, 8>(o, N)) / (float)N;
        const float scale = 1.0f / sqrtf(mean + eps);
        for (int64_t i = 0; i < N; i++) o[i] = weight[i] * (row[i] * scale);
    }
}

// y [M, N] = x [M, K] w^T (+ bias [N]), the weight [N, K] read once for all M rows: a matmul of a few rows is
// bound by how fast the weight streams in, and this loop streams it faster than the packed GEMM does at 1-4
// rows. Its sums are in another order than oneDNN's, so it is used only without batch invariance.
template <int M>
static void rows_times_weight(const float *x, const float *w, const float *bias, float *y, int64_t N, int64_t K, int threads) {
#pragma omp parallel for num_threads(threads > 0 ? threads : 1) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const float *row = w + n * K;
        v8 acc[M][2] = {};
        int64_t k = 0;
        for (; k + 16 <= K; k += 16) {
            const v8 w0 = *(const v8 *)(row + k), w1 = *(const v8 *)(row + k + 8);
            for (int m = 0; m < M; m++) {
                acc[m][0] += w0 * *(const v8 *)(x + m * K + k);
                acc[m][1] += w1 * *(const v8 *)(x + m * K + k + 8);
            }
        }
        for (int m = 0; m < M; m++) {
            const v8 both = acc[m][0] + acc[m][1];
            float total = 0.0f;
            for (int i = 0; i < 8; i++) total += both[i];
            for (int64_t j = k; j < K; j++) total += x[m * K + j] * row[j];
            y[m * N + n] = bias != nullptr ? total + bias[n] : total;
        }
    }
}

// M in 1..4; returns 0, or -1 for any other M (the caller then uses its GEMM).
extern "C" int small_matmul(const float *x, const float *w, const float *bias, float *y, int64_t M, int64_t N, int64_t K, int threads) {
    switch (M) {
        case 1: rows_times_weight<1>(x, w, bias, y, N, K, threads); return 0;
        case 2: rows_times_weight<2>(x, w, bias, y, N, K, threads); return 0;
        case 3: rows_times_weight<3>(x, w, bias, y, N, K, threads); return 0;
        case 4: rows_times_weight<4>(x, w, bias, y, N, K, threads); return 0;
        default: return -1;
    }
}

// silu(g) * u over one piece [a, b) of a row as torch's vectorized loop runs silu: two vectors of W lanes at
// a time, g / (1 + exp(-g)) with torch's vector exp, then the scalar form with libm's expf for what is left
// (then the product, rounded on its own as torch's mul_ does). Sleef's expf and libm's differ in the last
// bit for ~1% of inputs, so where the pieces start decides the bits.
template <typename vec, int W>
static void silu_piece(const float *g, const float *u, float *o, int64_t a, int64_t b, vec (*exp)(vec)) {
    typedef float unaligned __attribute__((vector_size(sizeof(vec)), aligned(4)));
    int64_t i = a;
    for (; i + 2 * W <= b; i += 2 * W)
        for (int64_t j = i; j < i + 2 * W; j += W) {
            const vec x = *(const unaligned *)(g + j);
            const vec s = x / (1.0f + exp(-x));
            *(unaligned *)(o + j) = s * *(const unaligned *)(u + j);
        }
    for (; i < b; i++) {
        const float s = g[i] / (1.0f + expf(-g[i]));
        o[i] = s * u[i];
    }
}

// gate_up [T, 2I] (gate, then up, per row) -> out [T, I] = silu(gate) * up, bit for bit torch's
// F.silu(gate).mul_(up) at torch_threads threads: torch splits the T x I elements into torch_threads equal
// ranges (one range below 32768 elements, its grain), and each range's piece of a row runs as above. exp:
// Sleef_expf8_u10 (lanes 8) or Sleef_expf16_u10 (lanes 16), the function torch's vectors call.
// The ranges fix the bits, not the threads: rows go to both threads even below the grain, where torch
// keeps one (a 16-row decode step's 16 x 1,536 SiLU had the other core waiting: kernel_ab on Zen 4,
// 0.931 / 0.965x the step's time in two runs).
template <typename vec, int W>
static void silu_rows(const float *gate_up, float *out, int64_t T, int64_t I, const void *exp, int torch_threads, int threads) {
    const int64_t n = T * I, grain = 32768;
    const int64_t ranges = n < grain ? 1 : std::max<int64_t>(1, std::min<int64_t>(torch_threads, (n + grain - 1) / grain));
    const int64_t range = (n + ranges - 1) / ranges;
#pragma omp parallel for num_threads(threads > 0 && T > 1 ? threads : 1) schedule(static)
    for (int64_t t = 0; t < T; t++) {
        const float *g = gate_up + t * 2 * I;
        for (int64_t a = 0; a < I;) {
            const int64_t b = std::min(I, ((t * I + a) / range + 1) * range - t * I);  // this range's end, or the row's
            silu_piece<vec, W>(g, g + I, out + t * I, a, b, (vec(*)(vec))exp);
            a = b;
        }
    }
}

typedef float f8 __attribute__((vector_size(32)));
#ifdef __AVX512F__
typedef float f16 __attribute__((vector_size(64)));
#endif

// lanes: 8 or 16 (torch's vector width here); returns -1 for a width this build cannot run.
extern "C" int silu_mul(const float *gate_up, float *out, int64_t T, int64_t I, int lanes, const void *exp, int torch_threads, int threads) {
    if (lanes == 8) {
        silu_rows<f8, 8>(gate_up, out, T, I, exp, torch_threads, threads);
        return 0;
    }
#ifdef __AVX512F__
    if (lanes == 16) {
        silu_rows<f16, 16>(gate_up, out, T, I, exp, torch_threads, threads);
        return 0;
    }
#endif
    return -1;
}

// The matmul and attention kernels llama_layers calls (matmul.cpp's matmul, paged_attention.cpp's kernels).
typedef int (*Matmul)(const float *x, const float *packed, const float *bias, float *y, int64_t M, int64_t N, int64_t K, int threads);
// matmul.cpp's matmul_silu: the MLP's gate/up projection and silu(gate) * up in one pass, the bits of Matmul then silu_mul.
typedef int (*MatmulSilu)(const float *x, const float *packed, const float *bias, float *act, int64_t M, int64_t I, int64_t K, int threads,
                          int lanes, const void *exp, int torch_threads);
// k and v are float, or half where the step's pool is (the _f16 kernels); knew: the step's rotated keys, which the decode
// kernel writes into the pool itself.
typedef int (*Decode)(const float *q, int64_t qh, int64_t qt, const void *k, const void *v, const int64_t *tables, const int64_t *lens,
                      const float *knew, int64_t kt, float *out, int64_t B, int64_t H, int64_t KVH, int64_t NB, int64_t BS, int64_t D,
                      int64_t NBT, float scale, int threads);
typedef int (*Prefill)(const float *q, int64_t qh, int64_t qt, const void *k, const void *v, const int64_t *chunks, const int64_t *tables,
                       int64_t C, float *out, int64_t H, int64_t KVH, int64_t NB, int64_t BS, int64_t D, float scale, int threads);

// One decoder layer's weights: the norms' [hidden] and the packed projections (q/k/v and gate/up fused); biases may be
// null. The plain [N, K] weights too where steps of a few rows take small_matmul (Model.small_rows), else null.
struct LayerWeights {
    const float *norm1, *qkv, *qkv_bias, *o, *o_bias, *norm2, *gate_up, *gate_up_bias, *down, *down_bias;
    const float *qkv_plain, *o_plain, *gate_up_plain, *down_plain;
};

// What stays the same from step to step (engine/native_layers.py's Model mirrors it field for field).
struct Model {
    int64_t layers, hidden, heads, kv_heads, head_dim, inter;  // inter: the MLP's width
    float eps, scaling;
    int32_t norm_lanes, silu_lanes, small_rows;  // small_rows: steps of at most this many rows take small_matmul (0: none)
    const LayerWeights *weights;  // [layers]
    Matmul matmul;
    Decode decode;
    Prefill prefill;
    const void *exp;  // torch's vector exp, for silu_mul
    MatmulSilu matmul_silu;  // or null: the packed gate/up projection, then silu_mul
};

// One step (engine/native_layers.py's Step mirrors it). Buffers are [rows, width] row-major.
struct Step {
    int64_t rows, decode_rows, table_width, chunks, attended;  // rows [attended, rows) are padding: no query
    void *kv;  // the pool [layers, 2, KVH, NB, BS, D], of float or (kv_half) IEEE half
    int64_t num_blocks, block_size;
    float *x, *delta;  // the residual stream [rows, hidden]; delta [rows, hidden]: the last layer's output on return
    float *normed, *qkv, *attn, *projected, *gate_up, *act;  // [rows, hidden / (H + 2 KVH) D / H D / hidden / 2 inter / inter]
    const float *cos, *sin;  // [rows, D]
    const int64_t *slots, *tables, *lens, *chunk_meta, *chunk_tables;  // as the kernels take them
    int32_t threads, torch_threads;
    // the rows whose logits are wanted, strictly increasing, or null: every row. The last layer's output projection and MLP
    // run on these rows only (moved to its first `kept` rows of x and delta); the other rows' keys and values are written.
    const int64_t *keep;
    int64_t kept;
    int32_t kv_half;  // the pool holds half: rope_store_f16 writes it, and Model's decode and prefill are the _f16 kernels
};

// y [R, N] = x [R, K] w^T (+ bias): small_matmul on the plain weight where the step's T rows are few and the model
// allows it (no batch invariance), else the packed matmul; nonzero where the kernel refused. The choice follows the
// step's rows, not R, so the last layer's kept rows take the kernel every other layer took.
static int project(const Model *m, const float *x, const float *packed, const float *plain, const float *bias, float *y, int64_t R, int64_t N,
                   int64_t K, int threads, int64_t T) {
    if (T <= m->small_rows && plain != nullptr) return small_matmul(x, plain, bias, y, R, N, K, threads);
    return m->matmul(x, packed, bias, y, R, N, K, threads);
}

// Rows keep[0, n) of x [.., width] moved to rows 0..n-1; keep strictly increasing, so keep[i] >= i and no row is read after
// it was overwritten.
static void gather_rows(float *x, const int64_t *keep, int64_t n, int64_t width) {
    for (int64_t i = 0; i < n; i++)
        if (keep[i] != i) memcpy(x + i * width, x + keep[i] * width, sizeof(float) * width);
}

// The step's queries and keys rotated, and its keys and values written into one layer's pool (but the decode rows' keys,
// which the decode kernel writes); nonzero: half asked for where this build has no half conversion.
static int store(const Model *m, const Step *s, void *keys, void *values, int64_t W, int64_t S) {
    const int64_t T = s->rows, H = m->heads, KVH = m->kv_heads, D = m->head_dim, BS = s->block_size, first = s->decode_rows;
    if (!s->kv_half) {
        rope_store(s->qkv, s->cos, s->sin, s->slots, (float *)keys, (float *)values, T, H, KVH, D, W, S, BS, first, s->threads);
        return 0;
    }
#ifdef __F16C__
    rope_store_f16(s->qkv, s->cos, s->sin, s->slots, keys, values, T, H, KVH, D, W, S, BS, first, s->threads);
    return 0;
#else
    return -1;
#endif
}

// Every layer of the step, x updated in place; 0, or the negative code of the kernel that refused: -1 matmul,
// -2 decode, -3 prefill, -4 silu_mul, -5 rope_store (the caller checked every shape first, so this is a bug, not a fallback).
extern "C" int llama_layers(const Model *m, const Step *s) {
    const int64_t T = s->rows, D = m->head_dim, H = m->heads, KVH = m->kv_heads, HD = H * D, W = (H + 2 * KVH) * D, I = m->inter;
    const int64_t S = s->num_blocks * s->block_size, bytes = KVH * S * D * (s->kv_half ? 2 : 4);  // of a layer's keys, then of its values
    const int threads = s->threads;
    for (int64_t l = 0; l < m->layers; l++) {
        const LayerWeights &w = m->weights[l];
        char *keys = (char *)s->kv + l * 2 * bytes, *values = keys + bytes;
        add_rms_norm(s->x, l ? s->delta : nullptr, w.norm1, s->normed, T, m->hidden, m->eps, m->norm_lanes, threads);
        if (project(m, s->normed, w.qkv, w.qkv_plain, w.qkv_bias, s->qkv, T, W, m->hidden, threads, T)) return -1;
        if (store(m, s, keys, values, W, S)) return -5;
        if (s->attended < T) memset(s->attn + s->attended * HD, 0, sizeof(float) * (T - s->attended) * HD);  // finite rows downstream
        if (s->decode_rows && m->decode(s->qkv, D, W, keys, values, s->tables, s->lens, s->qkv + HD, W, s->attn, s->decode_rows, H, KVH, s->num_blocks,
                                        s->block_size, D, s->table_width, m->scaling, threads))
            return -2;
        if (s->chunks && m->prefill(s->qkv, D, W, keys, values, s->chunk_meta, s->chunk_tables, s->chunks, s->attn, H, KVH, s->num_blocks,
                                    s->block_size, D, m->scaling, threads))
            return -3;
        int64_t R = T;  // rows that go on: past the last layer's attention only the kept rows' outputs are read
        if (l == m->layers - 1 && s->keep != nullptr) {
            R = s->kept;
            gather_rows(s->x, s->keep, R, m->hidden);
            gather_rows(s->attn, s->keep, R, HD);
        }
        if (project(m, s->attn, w.o, w.o_plain, w.o_bias, s->projected, R, m->hidden, HD, threads, T)) return -1;
        add_rms_norm(s->x, s->projected, w.norm2, s->normed, R, m->hidden, m->eps, m->norm_lanes, threads);
        if (m->matmul_silu != nullptr && !(T <= m->small_rows && w.gate_up_plain != nullptr)) {  // the steps project() gives the packed matmul
            if (m->matmul_silu(s->normed, w.gate_up, w.gate_up_bias, s->act, R, I, m->hidden, threads, m->silu_lanes, m->exp, s->torch_threads)) return -1;
        } else {
            if (project(m, s->normed, w.gate_up, w.gate_up_plain, w.gate_up_bias, s->gate_up, R, 2 * I, m->hidden, threads, T)) return -1;
            if (silu_mul(s->gate_up, s->act, R, I, m->silu_lanes, m->exp, s->torch_threads, threads)) return -4;
        }
        if (project(m, s->act, w.down, w.down_plain, w.down_bias, s->delta, R, m->hidden, I, threads, T)) return -1;
    }
    return 0;
}
