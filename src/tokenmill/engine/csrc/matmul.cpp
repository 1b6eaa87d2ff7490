// y [M, N] = x [M, K] w^T (+ bias [N]) with every output's bits independent of M, of the tiling and of the
// thread count: each y[m][n] is one chain of fused multiply-adds over k = 0 .. K-1 in order, started at 0,
// then + bias[n]. A fused multiply-add rounds once, so the lane width (8 on AVX2, 16 on AVX-512) and the
// number of rows a tile holds change only the speed. That is what lets a lone sequence run one row, where
// oneDNN's packed GEMM, also invariant, is slow (the weight streams at ~11 GB/s), and a batch run the same
// bits at a GEMM's speed.
//
// The weight is packed once (matmul_pack) into panels of NR = NV vectors of columns, [N/NR][K][NR], zero
// columns past N, so a tile's weights for one k are NV aligned loads and a panel streams in order.
// Each thread takes an equal share of the panels and all rows, in (panel chunk, row block) pieces; each piece
// walks its row block MR rows at a time and each MR-row tile over its chunk's panels, the chunk kept in L2 and
// the tile's rows in L1, while fetching the thread's next chunk (Ahead).
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__)
typedef __m512 vec;
// 8 rows x 3 vectors: 24 accumulators of 32 registers, 11 loads (8 broadcasts) for 24 FMAs. It replaced 12 x 2
// (14 loads for 24 FMAs), whose 16-row steps ran as a 12-row and a 4-row tile: on a 2-core Zen 4, SmolLM2's
// linears alone at 16 rows 29-30 -> 26-27 ms, 8 rows 21.5 -> 17.7, 512 rows 688 -> 673 (weights from memory).
static const int LANES = 16, MR = 8, NV = 3;
static inline vec vload(const float *p) { return _mm512_load_ps(p); }
static inline void vstore(float *p, vec v) { _mm512_storeu_ps(p, v); }
static inline vec vsplat(float x) { return _mm512_set1_ps(x); }
static inline vec vzero() { return _mm512_setzero_ps(); }
static inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
#elif defined(__AVX2__) && defined(__FMA__)
typedef __m256 vec;
static const int LANES = 8, MR = 6, NV = 2;  // 12 accumulators of 16 registers
static inline vec vload(const float *p) { return _mm256_load_ps(p); }
static inline void vstore(float *p, vec v) { _mm256_storeu_ps(p, v); }
static inline vec vsplat(float x) { return _mm256_set1_ps(x); }
static inline vec vzero() { return _mm256_setzero_ps(); }
static inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
#else
#define TOKENMILL_NO_MATMUL 1  // no vector FMA: the caller keeps oneDNN
static const int LANES = 8, MR = 1, NV = 2;
#endif

static const int NR = NV * LANES;  // columns a panel holds
// A task: CHUNK panels (2 x K x NR floats stay in L2: 74 KB at K = 576 on AVX2, 221 KB on AVX-512) by ROW_BLOCK
// rows. Measured on a 2-core Zen 3 with SmolLM2's shapes: 2-8 panels and 48-120 rows are within noise of each other
// at 16-192 rows. On Zen 4 with 3-vector panels and no fetching ahead below 17 rows, 2 panels against 4 (SmolLM2's
// linears, weights from memory, alternated): 16 / 32 / 64 / 457 rows 0.975 / 0.975 / 0.985-0.988 / 0.987-0.998 the time.
static const int64_t CHUNK = 2, ROW_BLOCK = 96;
// Panels a lone row walks at once (row_tile), within one chunk: at 4, once chunks were 2 panels (462b741) no row
// ever took row_tile. 2 against tile<1> panel by panel, SmolLM2's 1-row step in kernel_ab: 0.92-0.94x the time;
// against 4 panels in chunks of 4 for one row: 0.96x.
static const int ROW_PANELS = 2;
static_assert(ROW_PANELS <= CHUNK, "row_tile runs inside one chunk");
// Fewest rows at which a row block fetches its next chunk ahead (Ahead). On Zen 4 with 8 x 3 tiles, fetching at
// up to 16 rows (two tiles or fewer) cost more than it hid: the whole chunk's fetches crowd into so few tiles that
// they hold up the tiles' own loads, where the hardware's prefetcher alone kept up. SmolLM2's 30 layers' linears
// and lm_head, weights from memory, alternated: 2 / 8 / 16 rows 0.91 / 0.81 / 0.95 the time without them, 24
// and 32 rows 1.02-1.03 (so from 17 rows on they stay). AVX2 keeps them from 2 rows, as measured on Zen 3.
#if defined(__AVX512F__)
static const int64_t AHEAD_ROWS = 2 * MR + 1;
#else
static const int64_t AHEAD_ROWS = 2;
#endif

// Columns a panel holds (16 on AVX2, 48 on AVX-512), or 0 where this build has no kernel.
extern "C" int matmul_panel_width() {
#ifdef TOKENMILL_NO_MATMUL
    return 0;
#else
    return NR;
#endif
}

// w [N, K] row-major -> packed [ceil(N / NR)][K][NR] (packed must hold that many floats, 64-byte aligned).
extern "C" void matmul_pack(const float *w, float *packed, int64_t N, int64_t K) {
    const int64_t panels = (N + NR - 1) / NR;
    for (int64_t p = 0; p < panels; p++)
        for (int64_t k = 0; k < K; k++)
            for (int64_t j = 0; j < NR; j++) {
                const int64_t n = p * NR + j;
                packed[(p * K + k) * NR + j] = n < N ? w[n * K + k] : 0.0f;
            }
}

#ifndef TOKENMILL_NO_MATMUL
// The thread's next chunk of panels, fetched a few lines every 8 k of the tiles that run before it: otherwise a
// chunk's first tile waits on memory for the whole chunk, which the other tiles then read from L2. That wait
// weighs most where a row block has few tiles: SmolLM2's layers alone, 8-64 rows, 5-19% faster on Zen 3
// (on Zen 4 only from 17 rows: AHEAD_ROWS). Same bits.
struct Ahead {
    const float *next, *end;
    int64_t lines;  // a fetch's lines: enough that the tiles of one row block cover the chunk
    inline void fetch() {
        for (int64_t i = 0; i < lines && next < end; i++, next += 16) __builtin_prefetch(next, 0, 3);
    }
};

// One panel's sums for one row, its NV vectors v -> row[0, cols), + bias[0, cols) where given. A whole panel
// without bias is stored straight from the registers: the copy through out[] was a libc memcpy call a row and
// panel, ~3% of SmolLM2's 16-row decode step (perf). Same bits either way.
static inline void put(const vec *v, const float *bias, float *row, int64_t cols) {
    if (cols == NR && bias == nullptr) {
        for (int j = 0; j < NV; j++) vstore(row + j * LANES, v[j]);
        return;
    }
    alignas(64) float out[NR];
    for (int j = 0; j < NV; j++) vstore(out + j * LANES, v[j]);
    if (bias != nullptr)
        for (int64_t j = 0; j < cols; j++) row[j] = out[j] + bias[j];
    else
        memcpy(row, out, sizeof(float) * cols);
}

// One tile: R rows of x (stride K) times one panel -> y's R rows, columns [0, cols) of this panel.
template <int R>
static inline void tile(const float *x, const float *panel, const float *bias, float *y, int64_t K, int64_t N, int64_t cols, Ahead &ahead) {
    vec acc[R][NV];
#pragma GCC unroll 16
    for (int r = 0; r < R; r++)
#pragma GCC unroll 4
        for (int j = 0; j < NV; j++) acc[r][j] = vzero();
    for (int64_t k = 0; k < K; k++) {
        if ((k & 7) == 0) ahead.fetch();
        vec w[NV];
#pragma GCC unroll 4
        for (int j = 0; j < NV; j++) w[j] = vload(panel + k * NR + j * LANES);
#pragma GCC unroll 16
        for (int r = 0; r < R; r++) {
            const vec a = vsplat(x[r * K + k]);
#pragma GCC unroll 4
            for (int j = 0; j < NV; j++) acc[r][j] = vfma(a, w[j], acc[r][j]);
        }
    }
    for (int r = 0; r < R; r++) put(acc[r], bias, y + r * N, cols);
}

// One row times PW panels at once: NV x PW independent FMA chains, PW weight streams (one row alone is bound
// by the chains' latency and the streams, not by arithmetic). Each output's chain is the same as tile<1>'s.
template <int PW>
static inline void row_tile(const float *x, const float *panel, const float *bias, float *y, int64_t K, int64_t N, int64_t n0) {
    vec acc[PW][NV];
    for (int q = 0; q < PW; q++)
        for (int j = 0; j < NV; j++) acc[q][j] = vzero();
    for (int64_t k = 0; k < K; k++) {
        const vec a = vsplat(x[k]);
#pragma GCC unroll 8
        for (int q = 0; q < PW; q++) {
            const float *w = panel + q * K * NR + k * NR;
#pragma GCC unroll 4
            for (int j = 0; j < NV; j++) acc[q][j] = vfma(a, vload(w + j * LANES), acc[q][j]);
        }
    }
    for (int q = 0; q < PW; q++) {
        const int64_t n = n0 + q * NR;
        put(acc[q], bias ? bias + n : nullptr, y + n, N - n < NR ? N - n : NR);
    }
}

// Rows [m0, m1) of x times panels [p0, p1): MR rows at a time, the leftover rows in one smaller tile.
static void block(const float *x, const float *packed, const float *bias, float *y, int64_t m0, int64_t m1, int64_t p0, int64_t p1,
                  int64_t N, int64_t K, Ahead &ahead) {
    for (int64_t m = m0; m < m1; m += MR) {
        const int64_t rows = m1 - m < MR ? m1 - m : MR;
        int64_t p = p0;
        if (rows == 1)
            for (; p + ROW_PANELS <= p1; p += ROW_PANELS) row_tile<ROW_PANELS>(x + m * K, packed + p * K * NR, bias, y + m * N, K, N, p * NR);
        for (; p < p1; p++) {
            const int64_t n = p * NR, cols = N - n < NR ? N - n : NR;
            const float *xm = x + m * K, *panel = packed + p * K * NR, *b = bias ? bias + n : nullptr;
            float *ym = y + m * N + n;
            switch (rows) {
                case 1: tile<1>(xm, panel, b, ym, K, N, cols, ahead); break;
                case 2: tile<2>(xm, panel, b, ym, K, N, cols, ahead); break;
                case 3: tile<3>(xm, panel, b, ym, K, N, cols, ahead); break;
                case 4: tile<4>(xm, panel, b, ym, K, N, cols, ahead); break;
                case 5: tile<5>(xm, panel, b, ym, K, N, cols, ahead); break;
                case 6: tile<6>(xm, panel, b, ym, K, N, cols, ahead); break;
#if defined(__AVX512F__)
                case 7: tile<7>(xm, panel, b, ym, K, N, cols, ahead); break;
                case 8: tile<8>(xm, panel, b, ym, K, N, cols, ahead); break;
#endif
            }
        }
    }
}
#endif

// x [M, K] contiguous, packed from matmul_pack, bias [N] or null, y [M, N]; returns 0, or -1 where this build has no kernel.
extern "C" int matmul(const float *x, const float *packed, const float *bias, float *y, int64_t M, int64_t N, int64_t K, int threads) {
#ifdef TOKENMILL_NO_MATMUL
    return -1;
#else
    const int64_t panels = (N + NR - 1) / NR;
#pragma omp parallel num_threads(threads > 0 ? threads : 1)
    {
        // each thread an equal share of the panels, every row: with (chunk, row block) tasks a step of one row
        // block and an odd number of chunks (SmolLM2's q/k/v, o and down at up to 96 rows) left a thread idle
        const int64_t t = omp_get_thread_num(), n = omp_get_num_threads(), first = panels * t / n, last = panels * (t + 1) / n;
        // fetch calls in one row block's tiles. None for one row (row_tile streams its panels; fetching beside
        // them made SmolLM2's 1-row step 27% slower), below AHEAD_ROWS, or from two row blocks on (the first tile's
        // wait is shared, and x's 96 rows, this chunk and the next would overfill L2)
        const int64_t fetches = M >= AHEAD_ROWS && M <= ROW_BLOCK ? (M + MR - 1) / MR * CHUNK * ((K + 7) / 8) : 0;
        for (int64_t c = first; c < last; c += CHUNK) {  // chunk outer: the thread's row blocks reuse its chunk from L2
            const int64_t p1 = c + CHUNK < last ? c + CHUNK : last, p2 = p1 + CHUNK < last ? p1 + CHUNK : last;
            Ahead ahead{packed + p1 * K * NR, packed + p2 * K * NR, fetches ? ((p2 - p1) * K * NR / 16 + fetches - 1) / fetches : 0};
            for (int64_t m0 = 0; m0 < M; m0 += ROW_BLOCK) block(x, packed, bias, y, m0, m0 + ROW_BLOCK < M ? m0 + ROW_BLOCK : M, c, p1, N, K, ahead);
        }
    }
    return 0;
#endif
}
