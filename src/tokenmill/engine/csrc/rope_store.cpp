// RoPE on a step's queries and keys, in place, and the keys and values written into the block pool:
// one pass over the step's q/k/v rows instead of seven torch ops (a 512-row step spent ~12 ms on them).
//
// Bit for bit what transformers computes, x * cos + rotate_half(x) * sin with each product and the sum
// rounded on their own: this file is compiled with -ffp-contract=off, so no multiply-add is fused.
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
