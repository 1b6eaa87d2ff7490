// The llama layer's elementwise ops in one pass each, bit for bit what transformers computes: this file is
// compiled with -ffp-contract=off, so no multiply-add is fused and every product and sum rounds on its own.
//
// rope_store: RoPE on a step's queries and keys, in place, and the keys and values written into the block
// pool (seven torch ops otherwise; a 512-row step spent ~12 ms on them), x * cos + rotate_half(x) * sin.
//
// add_rms_norm: the residual add and the RMSNorm after it (eight torch ops otherwise), with the sum of
// squares taken in the order of torch's CPU sum (its cascade over W-lane vectors), so the bits are torch's.
// The loader checks that against torch on this machine before using it.
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

// qkv [T, W] rows: H query heads, then KVH key heads, then KVH value heads, each of D floats (W >= (H + 2 KVH) D).
// cos, sin [T, D]; slots [T] pool slot of each row; kpool, vpool [KVH, S, D] one layer's keys and values (S slots a head).
extern "C" void rope_store(float *qkv, const float *cos, const float *sin, const int64_t *slots, float *kpool, float *vpool, int64_t T, int64_t H,
                           int64_t KVH, int64_t D, int64_t W, int64_t S, int threads) {
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
        for (int64_t j = 0; j < KVH; j++) {
            memcpy(kpool + (j * S + slots[t]) * D, row + (H + j) * D, sizeof(float) * D);
            memcpy(vpool + (j * S + slots[t]) * D, row + (H + KVH + j) * D, sizeof(float) * D);
        }
    }
}

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
