// y [M, N] = x [M, K] w^T (+ bias [N]) with every output's bits independent of M, of the tiling and of the
// thread count: each y[m][n] is one chain of fused multiply-adds over k = 0 .. K-1 in order, started at 0,
// then + bias[n]. A fused multiply-add rounds once, so the lane width (8 on AVX2, 16 on AVX-512) and the
// number of rows a tile holds change only the speed. That is what lets a lone sequence run one row, where
// oneDNN's packed GEMM, also invariant, is slow (the weight streams at ~11 GB/s), and a batch run the same
// bits at a GEMM's speed.
//
// The weight is packed once (matmul_pack) into panels of NR = NV vectors of columns, [N/NR][K][NR], zero
// columns past N, so a tile's weights for one k are NV aligned loads and a panel streams in order.
// Each thread takes an equal share of the panels and all rows (from ROW_SPLIT rows on, its share of the rows and
// all panels), in (panel chunk, ~32 rows) units; each unit walks its rows MR at a time and each MR-row tile over its
// chunk's panels, the chunk kept in L2 and the tile's rows in L1, while fetching the thread's next chunk (Ahead). A
// thread done with its share takes the other shares' last units (Units), so a core held up by another process does
// not keep the other waiting.
//
// matmul_silu runs the MLP's fused gate/up weight the same way, a gate panel and its up panel together, and applies
// silu(gate) * up to the tile's sums before they leave L1: the [M, 2I] gate_up is never written, and the activation's
// own pass, which read gate from one core's panels and up from the other's, is gone (Zen 4, SmolLM2's steps in
// kernel_ab: prompt steps 0.95-0.96x the time, a 64-row decode step 0.95x).
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <atomic>
#include <memory>

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
// A chunk: CHUNK panels (2 x K x NR floats stay in L2: 74 KB at K = 576 on AVX2, 221 KB on AVX-512); a thread with up
// to ROW_BLOCK rows fetches its next chunk ahead (Ahead). Measured on a 2-core Zen 3 with SmolLM2's shapes, when a task
// was a chunk by a row block: 2-8 panels and 48-120 rows are within noise of each other at 16-192 rows. On Zen 4 with 3-vector panels and no fetching ahead below 17 rows, 2 panels against 4 (SmolLM2's
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
// and 32 rows 1.02-1.03 (so from 17 rows on they stay). AVX2 keeps them from 2 rows, as measured on Zen 3. An Intel
// Xeon with AVX-512 (family 6 model 207) wants them from 2 rows too: SmolLM2's 16-row decode step 0.774x the time
// with them (kernel_ab, twice), its 1-row step 0.993x. So AMD's AVX-512 alone starts at 17 rows.
// The most rows a thread's share may have and still fetch ahead: ROW_BLOCK, but on that Xeon (2 MiB of L2 a core) 256,
// which takes in a thread's half of a 432-457-row prompt step: those steps 0.931 / 0.948x and 0.976 / 0.906x the time
// at c16 / c64 (kernel_ab, twice, same bits), the decode steps within noise.
struct FetchRows {
    int64_t least, most;
};
static FetchRows fetch_rows() {
#if defined(__AVX512F__)
    static const bool amd = (__builtin_cpu_init(), __builtin_cpu_is("amd"));  // init: a constructor may run first
    return amd ? FetchRows{2 * MR + 1, ROW_BLOCK} : FetchRows{2, 256};
#else
    return {2, ROW_BLOCK};
#endif
}
// Fetch calls in one row block's tiles of `panels` panels, for a thread's share of `rows` rows: none outside
// fetch_rows(). None for one row either (row_tile streams its panels; fetching beside them made SmolLM2's 1-row step
// 27% slower), nor for more rows (the first tile's wait is shared, and x's rows, this chunk and the next would
// overfill L2).
[[maybe_unused]] static int64_t fetch_calls(int64_t rows, int64_t panels, int64_t K) {  // unused where the build has no kernel
    const FetchRows r = fetch_rows();
    return rows >= r.least && rows <= r.most ? (rows + MR - 1) / MR * panels * ((K + 7) / 8) : 0;
}

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
// (on Zen 4 only from 17 rows: fetch_rows). Same bits.
struct Ahead {
    const float *next, *end;
    int64_t lines;  // a fetch's lines: enough that the tiles of one row block cover the chunk
    const float *then = nullptr, *then_end = nullptr;  // a second range, fetched after the first (matmul_silu's up panel)
    inline void fetch() {
        for (int64_t i = 0; i < lines; i++, next += 16) {
            if (next >= end) {
                if (then >= then_end) return;
                next = then, end = then_end, then = then_end;
            }
            __builtin_prefetch(next, 0, 3);
        }
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

// R rows of x (stride K) times one panel: acc[r][j], the panel's columns j * LANES .. as each row's sums.
template <int R>
static inline void sums(const float *x, const float *panel, int64_t K, Ahead &ahead, vec (&acc)[R][NV]) {
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
}

// One tile: R rows of x (stride K) times one panel -> y's R rows, columns [0, cols) of this panel.
template <int R>
static inline void tile(const float *x, const float *panel, const float *bias, float *y, int64_t K, int64_t N, int64_t cols, Ahead &ahead) {
    vec acc[R][NV];
    sums<R>(x, panel, K, ahead, acc);
    for (int r = 0; r < R; r++) put(acc[r], bias, y + r * N, cols);
}

// One row times PW panels (panels[q]) at once: acc[q][j], NV x PW independent FMA chains, PW weight streams (one row
// alone is bound by the chains' latency and the streams, not by arithmetic). Each output's chain is the same as tile<1>'s.
template <int PW>
static inline void row_sums(const float *x, const float *const (&panels)[PW], int64_t K, vec (&acc)[PW][NV]) {
    for (int q = 0; q < PW; q++)
        for (int j = 0; j < NV; j++) acc[q][j] = vzero();
    for (int64_t k = 0; k < K; k++) {
        const vec a = vsplat(x[k]);
#pragma GCC unroll 8
        for (int q = 0; q < PW; q++) {
            const float *w = panels[q] + k * NR;
#pragma GCC unroll 4
            for (int j = 0; j < NV; j++) acc[q][j] = vfma(a, vload(w + j * LANES), acc[q][j]);
        }
    }
}

// One row times PW consecutive panels -> y's columns from n0.
template <int PW>
static inline void row_tile(const float *x, const float *panel, const float *bias, float *y, int64_t K, int64_t N, int64_t n0) {
    const float *panels[PW];
    for (int q = 0; q < PW; q++) panels[q] = panel + q * K * NR;
    vec acc[PW][NV];
    row_sums<PW>(x, panels, K, acc);
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

#ifndef TOKENMILL_NO_MATMUL
// From this many rows on, each thread takes its share of the rows (and every panel) instead of its share of the panels
// (and every row): the rows libgomp's static schedule gives it, as the row-wise llama ops take theirs, so a step's
// outputs stay in the core that goes on with them. Both threads then read every weight, which at this many rows
// costs little beside the arithmetic. kernel_ab on SmolLM2 (Zen 4), same bits: steps of 256-457 prompt rows 0.977-0.983x
// the time (three runs), a 64-row decode step 0.966-0.980x; at 48 rows no change, at 16 rows 1.35x (too few rows to pay
// for reading the weights twice).
static const int64_t ROW_SPLIT = 64;
struct Share {
    int64_t first, last, r0, r1;  // panels (or pairs) [first, last), rows [r0, r1)
};
static inline Share share(int64_t M, int64_t units, int64_t t, int64_t n) {
    if (M < ROW_SPLIT) return {units * t / n, units * (t + 1) / n, 0, M};
    const int64_t q = M / n, rem = M % n, r0 = t * q + (t < rem ? t : rem);
    return {0, units, r0, r0 + q + (t < rem ? 1 : 0)};
}

// One thread's units [front, back) of a call, taken from the front by the thread whose share they are and from the
// back by a thread that has run out of its own: a core held up by another process (the server's event loop) or by its
// caches hands its last units to the other instead of keeping it at the call's end. A unit's outputs have the same
// bits whichever thread runs it.
struct alignas(64) Units {
    std::atomic<uint64_t> v{0};  // front << 32 | back
    void set(int64_t front, int64_t back) { v.store((uint64_t)front << 32 | (uint64_t)back, std::memory_order_relaxed); }
    int64_t take(bool front) {
        uint64_t now = v.load(std::memory_order_relaxed);
        for (;;) {
            const uint64_t f = now >> 32, b = now & 0xffffffffu;
            if (f >= b) return -1;
            const uint64_t next = front ? (f + 1) << 32 | b : f << 32 | (b - 1);
            if (v.compare_exchange_weak(now, next, std::memory_order_relaxed)) return front ? (int64_t)f : (int64_t)(b - 1);
        }
    }
};

// Rows a unit takes of its share's rows: whole MR-row tiles, about UNIT_ROWS rows, so that the last unit a thread waits
// on is short; one share's units of a chunk run in a row, so the chunk stays in L2 as with one row block.
static const int64_t UNIT_ROWS = 32;
struct Split {
    int64_t n;       // threads the shares were made for
    int64_t units;   // chunks (matmul) or panel pairs (matmul_silu) in all
    int64_t M, per;  // rows; chunk size in units (CHUNK, or 1 for pairs)
    Share of(int64_t t) const { return share(M, units, t, n); }
    int64_t parts(const Share &s) const { return std::max<int64_t>(1, (s.r1 - s.r0 + UNIT_ROWS - 1) / UNIT_ROWS); }
    int64_t count(const Share &s) const { return (s.last - s.first + per - 1) / per * parts(s); }
    // unit u of share s: its first panel (or pair) and its rows [m0, m1)
    void unit(const Share &s, int64_t u, int64_t &p, int64_t &m0, int64_t &m1) const {
        const int64_t k = parts(s), rows = s.r1 - s.r0, step = (rows + k - 1) / k;
        const int64_t part = (step + MR - 1) / MR * MR, i = u % k;
        p = s.first + u / k * per;
        m0 = std::min(s.r1, s.r0 + i * part), m1 = i + 1 == k ? s.r1 : std::min(s.r1, m0 + part);
    }
};

// Every share's Units for one call: on the stack up to 8 threads, else on the heap. Allocated on the heap every call,
// kernel_ab's 1- and 16-row decode steps took 1.016x / 1.012x the time of the split before units; on the stack 0.978x
// and 0.956-1.005x (Zen 4, SmolLM2).
struct Claims {
    alignas(64) Units local[8];
    std::unique_ptr<Units[]> heap;
    Units *all;
    explicit Claims(const Split &split) : all(split.n <= 8 ? local : (heap.reset(new Units[split.n]), heap.get())) {
        for (int64_t t = 0; t < split.n; t++) all[t].set(0, split.count(split.of(t)));
    }
    Units *get() { return all; }
};

// Units run by a thread other than their share's since the library was loaded (matmul_stolen): the tests' proof that
// taking the other share's units happens and keeps the bits. Counted only where it happens, near a call's end.
static std::atomic<int64_t> stolen{0};

// Runs work(share, unit) for every unit of every share: a thread's own from the front, then the others' from the back.
template <class F>
static void run_units(Units *units, int64_t t, int64_t n, F &&work) {
    for (int64_t u; (u = units[t].take(true)) >= 0;) work(t, u);
    for (int64_t i = 1; i < n; i++)
        for (int64_t o = (t + i) % n, u; (u = units[o].take(false)) >= 0;) {
            stolen.fetch_add(1, std::memory_order_relaxed);
            work(o, u);
        }
}

// silu(gate) * up, the MLP's activation, on one tile row's gate and up sums as torch computes F.silu(gate).mul_(up)
// (llama_ops.cpp's silu_mul does it apart, and says how): torch's own vector exp on `lanes` lanes (Sleef's, by
// address), libm's expf where torch's loop leaves a piece of a row to its scalar tail. Its pieces follow from the
// call's rows alone (range: the elements one of torch's threads takes), so the bits do not depend on the tiling.
struct Silu {
    int lanes;
    const void *exp;
    int64_t I, range;
    bool tails;  // whether any piece of any row has a scalar tail (none where every piece is whole 2-vector steps)

    template <int W>
    void vectors(const float *g, const float *u, float *o) const {  // NR columns, W lanes at a time
        typedef float lanes_t __attribute__((vector_size(4 * W)));
        typedef float loose __attribute__((vector_size(4 * W), aligned(4)));
        lanes_t (*e)(lanes_t) = (lanes_t(*)(lanes_t))exp;
        for (int j = 0; j < NR; j += W) {
            const lanes_t x = *(const loose *)(g + j);
            const lanes_t s = x / (1.0f + e(-x));
            *(loose *)(o + j) = s * *(const loose *)(u + j);
        }
    }
    // Row t's columns [n0, n0 + NR) (those below I): g, u its gate and up sums, y its place in act.
    void apply(const float *g, const float *u, float *y, int64_t t, int64_t n0) const {
        const int64_t cols = std::min<int64_t>(NR, I - n0);
        alignas(64) float part[NR];
        float *o = cols == NR ? y : part;  // a whole panel straight into act: no copy a row and panel (put() says why)
#if defined(__AVX512F__)
        if (lanes == 16) vectors<16>(g, u, o);
        else
#endif
            vectors<8>(g, u, o);
        if (tails)
            for (int64_t a = 0; a < I;) {  // torch's pieces of row t: each ends at the row's end or at its range's end
                const int64_t b = std::min(I, ((t * I + a) / range + 1) * range - t * I), step = 2 * lanes;
                for (int64_t i = std::max(n0, a + (b - a) / step * step); i < std::min(n0 + cols, b); i++) {
                    const float x = g[i - n0], s = x / (1.0f + expf(-x));
                    o[i - n0] = s * u[i - n0];
                }
                a = b;
            }
        if (o != y) memcpy(y, o, sizeof(float) * cols);
    }
};

// R rows (from row t) times one gate panel and its up panel -> y's R rows at columns [n0, n0 + NR) of act.
template <int R>
static inline void silu_tile(const float *x, const float *gate, const float *up, const float *gb, const float *ub, float *y, int64_t K, int64_t t,
                             int64_t n0, const Silu &f, Ahead &ahead) {
    alignas(64) float g[R][NR], u[R][NR];
    {
        vec acc[R][NV];
        sums<R>(x, gate, K, ahead, acc);
        for (int r = 0; r < R; r++) put(acc[r], gb, g[r], NR);
    }
    {
        vec acc[R][NV];
        sums<R>(x, up, K, ahead, acc);
        for (int r = 0; r < R; r++) put(acc[r], ub, u[r], NR);
    }
    for (int r = 0; r < R; r++) f.apply(g[r], u[r], y + r * f.I, t + r, n0);
}

// A lone row times a gate panel and its up panel at once (row_sums' two streams).
static inline void silu_row(const float *x, const float *gate, const float *up, const float *gb, const float *ub, float *y, int64_t K, int64_t t,
                            int64_t n0, const Silu &f) {
    const float *panels[2] = {gate, up};
    vec acc[2][NV];
    row_sums<2>(x, panels, K, acc);
    alignas(64) float g[NR], u[NR];
    put(acc[0], gb, g, NR);
    put(acc[1], ub, u, NR);
    f.apply(g, u, y, t, n0);
}

// Rows [m0, m1) times gate panel p and its up panel: MR rows at a time, the leftover rows in one smaller tile.
static void silu_block(const float *x, const float *gate, const float *up, const float *gb, const float *ub, float *y, int64_t m0, int64_t m1,
                       int64_t n0, int64_t K, const Silu &f, Ahead &ahead) {
    for (int64_t m = m0; m < m1; m += MR) {
        const int64_t rows = m1 - m < MR ? m1 - m : MR;
        const float *xm = x + m * K;
        float *ym = y + m * f.I + n0;
        switch (rows) {
            case 1: silu_row(xm, gate, up, gb, ub, ym, K, m, n0, f); break;
            case 2: silu_tile<2>(xm, gate, up, gb, ub, ym, K, m, n0, f, ahead); break;
            case 3: silu_tile<3>(xm, gate, up, gb, ub, ym, K, m, n0, f, ahead); break;
            case 4: silu_tile<4>(xm, gate, up, gb, ub, ym, K, m, n0, f, ahead); break;
            case 5: silu_tile<5>(xm, gate, up, gb, ub, ym, K, m, n0, f, ahead); break;
            case 6: silu_tile<6>(xm, gate, up, gb, ub, ym, K, m, n0, f, ahead); break;
#if defined(__AVX512F__)
            case 7: silu_tile<7>(xm, gate, up, gb, ub, ym, K, m, n0, f, ahead); break;
            case 8: silu_tile<8>(xm, gate, up, gb, ub, ym, K, m, n0, f, ahead); break;
#endif
        }
    }
}
#endif

// act [M, I] = silu(x w_gate^T + b_gate) * (x w_up^T + b_up), bit for bit the matmul into gate_up then torch's
// F.silu(gate).mul_(up) at torch_threads threads: packed holds matmul_pack's panels of w_gate [I, K], then of w_up
// (each half P = ceil(I / NR) panels, zero columns past I: engine/linear.py's halves), bias [2 P NR] (b_gate, then
// b_up, each padded alike) or null; lanes and exp: torch's vector exp and its width (8 or 16). Each thread takes a gate
// panel and its up panel at a time, so gate_up is never written and the activation needs no pass of its own: a pass
// whose gate came from one core's panels and up from the other's. Returns 0, or -1 where lanes is a width this build
// has no loop for, or the build has no kernel; M = 0 only checks.
extern "C" int matmul_silu(const float *x, const float *packed, const float *bias, float *act, int64_t M, int64_t I, int64_t K, int threads, int lanes,
                           const void *exp, int torch_threads) {
#ifdef TOKENMILL_NO_MATMUL
    return -1;
#else
#if defined(__AVX512F__)
    const bool width_ok = lanes == 8 || lanes == 16;
#else
    const bool width_ok = lanes == 8;
#endif
    if (I <= 0 || !width_ok || exp == nullptr) return -1;
    if (M <= 0) return 0;
    const int64_t pairs = (I + NR - 1) / NR, n = M * I, grain = 32768;
    const int64_t ranges = n < grain ? 1 : std::max<int64_t>(1, std::min<int64_t>(torch_threads, (n + grain - 1) / grain));
    const int64_t range = (n + ranges - 1) / ranges;
    const Silu f{lanes, exp, I, range, !(I % (2 * lanes) == 0 && range % I == 0)};
    const float *ups = packed + pairs * K * NR;  // the up half's panels
    const int64_t nt = threads > 0 ? threads : 1;
    const Split split{nt, pairs, M, 1};
    Claims units(split);
#pragma omp parallel num_threads(nt)
    {
        const int64_t t = omp_get_thread_num();
        const Share own = split.of(t);
        const int64_t rows = own.r1 - own.r0;
        const int64_t fetches = fetch_calls(rows, 2, K);
        int64_t at = -1;  // the pair `ahead` was set up for
        Ahead ahead{nullptr, nullptr, 0};
        run_units(units.get(), t, nt, [&](int64_t o, int64_t u) {  // a gate panel and its up panel: a chunk of 2 panels, as matmul's
            int64_t p, m0, m1;
            const Share sh = o == t ? own : split.of(o);
            split.unit(sh, u, p, m0, m1);
            const float *gate = packed + p * K * NR, *up = ups + p * K * NR, *gb = bias ? bias + p * NR : nullptr, *ub = bias ? bias + (pairs + p) * NR : nullptr;
            Ahead none{nullptr, nullptr, 0};
            if (o == t && p != at) {  // the thread's own next pair, fetched while this one runs
                at = p, ahead = none;
                if (p + 1 < own.last && fetches) ahead = Ahead{gate + K * NR, gate + 2 * K * NR, (2 * K * NR / 16 + fetches - 1) / fetches, up + K * NR, up + 2 * K * NR};
            }
            silu_block(x, gate, up, gb, ub, act, m0, m1, p * NR, K, f, o == t ? ahead : none);
        });
    }
    return 0;
#endif
}

// x [M, K] contiguous, packed from matmul_pack, bias [N] or null, y [M, N]; returns 0, or -1 where this build has no kernel.
extern "C" int matmul(const float *x, const float *packed, const float *bias, float *y, int64_t M, int64_t N, int64_t K, int threads) {
#ifdef TOKENMILL_NO_MATMUL
    return -1;
#else
    const int64_t panels = (N + NR - 1) / NR;
    const int64_t n = threads > 0 ? threads : 1;
    const Split split{n, panels, M, CHUNK};
    Claims units(split);
#pragma omp parallel num_threads(n)
    {
        // each thread an equal share of the panels, every row (below ROW_SPLIT): with (chunk, row block) tasks a step of
        // one row block and an odd number of chunks (SmolLM2's q/k/v, o and down at up to 96 rows) left a thread idle
        const int64_t t = omp_get_thread_num();
        const Share own = split.of(t);
        const int64_t rows = own.r1 - own.r0;
        const int64_t fetches = fetch_calls(rows, CHUNK, K);
        int64_t at = -1;  // the chunk `ahead` was set up for
        Ahead ahead{nullptr, nullptr, 0};
        run_units(units.get(), t, n, [&](int64_t o, int64_t u) {  // the thread's units reuse their chunk from L2
            int64_t c, m0, m1;
            const Share sh = o == t ? own : split.of(o);
            split.unit(sh, u, c, m0, m1);
            const int64_t p1 = std::min(c + CHUNK, sh.last);
            Ahead none{nullptr, nullptr, 0};
            if (o == t && c != at) {  // the thread's own next chunk, fetched while this one runs
                const int64_t p2 = std::min(p1 + CHUNK, own.last);
                at = c, ahead = Ahead{packed + p1 * K * NR, packed + p2 * K * NR, fetches ? ((p2 - p1) * K * NR / 16 + fetches - 1) / fetches : 0};
            }
            block(x, packed, bias, y, m0, m1, c, p1, N, K, o == t ? ahead : none);
        });
    }
    return 0;
#endif
}

// How many units threads have taken from another thread's share (run_units) since the library was loaded.
extern "C" int64_t matmul_stolen() {
#ifdef TOKENMILL_NO_MATMUL
    return 0;
#else
    return stolen.load(std::memory_order_relaxed);
#endif
}

// ---- The argmax of a row's logits without computing all of them (screened_logits) ----
//
// A greedy row that reports no logprobs reads only its logits' first argmax, and the lm_head is 21% of SmolLM2's
// weights (28M of 135M). The screen multiplies bfloat16 copies of x and of the lm_head's weight in AMX tiles (half the
// weight's bytes, and on this family's cores some 4x the float32 FMAs' multiply-adds a second), then computes the
// float32 chain of matmul above, the same bits, only for the columns that can still be the argmax:
//
//   |screened - exact| <= C * sum_k |x_k w_nk| <= C * ||x||_2 ||w_n||_2 = e_n (Cauchy-Schwarz), where C covers x and w
//   each rounded to bfloat16 (2^-8 relative each), the float32 roundings of both sums (K each, 2^-24) and a 5% margin
//   for the second-order terms and the float32 arithmetic of the bounds themselves (|screened| <= 1.02 ||x|| ||w_n||,
//   so their rounding is below 2^-22 e_n / C).
//
// Column n is a candidate when screened_n + e_n >= max_m (screened_m - e_m): the exact argmax always is, and a column
// that is not has an exact logit strictly below the argmax's, so the first argmax over the candidates' exact logits is
// the row's. Every other column gets -inf: the sampler's argmax, and its 0.0 logprob for a greedy row (NaN only where
// the row's maximum is not finite), read the same. A row whose inputs are not finite or could overflow, or that has too
// many candidates at once (all logits tied), is flagged for the caller to run through the matmul.
//
// Where the tiles cannot be used (no AMX, or the kernel refuses them) the same screen runs in vdpbf16ps, which on that
// Xeon (family 6 model 207) issues at a quarter of the FMAs' rate: correct, but slower than the float32 lm_head, so
// the engine turns the screen on only where screen_tiles() says the tiles run.
#if defined(__AVX512BF16__) && !defined(TOKENMILL_NO_MATMUL)
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
static const int SV = 16;  // columns a screen panel holds
static const int64_t SK = 16, SROWS = 32;  // k pairs a tile holds; x's rows are padded to whole pairs of row tiles
static const int64_t CANDIDATES = 1024;  // a thread's list for one row
static inline uint16_t bf16(float f) {  // round to nearest even; NaN stays NaN
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}
static inline int64_t screen_panels(int64_t N) { return ((N + SV - 1) / SV + 1) / 2 * 2; }  // whole pairs of panels
static inline int64_t screen_pairs(int64_t K) { return ((K + 1) / 2 + SK - 1) / SK * SK; }    // k pairs, whole tiles
#endif

// Columns a screen panel holds (16), or 0 where this build has no screen (no AVX512-BF16, or no matmul kernel).
extern "C" int screen_width() {
#if defined(__AVX512BF16__) && !defined(TOKENMILL_NO_MATMUL)
    return SV;
#else
    return 0;
#endif
}

// 1 where screened_logits runs in AMX tiles: the build has them and the kernel lets this process use them.
extern "C" int screen_tiles() {
#if defined(__AVX512BF16__) && !defined(TOKENMILL_NO_MATMUL) && defined(__AMX_TILE__) && defined(__AMX_BF16__)
    static const int granted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
    return granted;
#else
    return 0;
#endif
}

// w [N, K] -> screen [screen_panels(N)][screen_pairs(K)][SV][2] bfloat16 (zeros past N and K), norms[n] >= ||w_n||_2
// (screen_panels(N) * SV floats, zeros past N), then the largest of them (read by every call, found once here).
// Sizes in screen_size.
extern "C" void screen_pack(const float *w, uint16_t *screen, float *norms, int64_t N, int64_t K) {
#if defined(__AVX512BF16__) && !defined(TOKENMILL_NO_MATMUL)
    const int64_t panels = screen_panels(N), K2 = screen_pairs(K);
    for (int64_t p = 0; p < panels; p++)
        for (int64_t k2 = 0; k2 < K2; k2++)
            for (int64_t j = 0; j < SV; j++)
                for (int64_t h = 0; h < 2; h++) {
                    const int64_t n = p * SV + j, k = 2 * k2 + h;
                    screen[((p * K2 + k2) * SV + j) * 2 + h] = n < N && k < K ? bf16(w[n * K + k]) : 0;
                }
    float largest = 0;
    for (int64_t n = 0; n < panels * SV; n++) {
        double s = 0;
        for (int64_t k = 0; n < N && k < K; k++) s += (double)w[n * K + k] * w[n * K + k];
        norms[n] = (float)(sqrt(s) * (1 + 1e-6));
        largest = std::max(largest, norms[n]);
    }
    norms[panels * SV] = largest;
#else
    (void)w, (void)screen, (void)norms, (void)N, (void)K;
#endif
}

// The bfloat16 elements of screen_pack's screen, then the floats of its norms (0, 0 without a screen).
extern "C" void screen_size(int64_t N, int64_t K, int64_t *elements, int64_t *norms) {
#if defined(__AVX512BF16__) && !defined(TOKENMILL_NO_MATMUL)
    *elements = screen_panels(N) * screen_pairs(K) * SV * 2, *norms = screen_panels(N) * SV + 1;
#else
    (void)N, (void)K;
    *elements = 0, *norms = 0;
#endif
}

#if defined(__AVX512BF16__) && !defined(TOKENMILL_NO_MATMUL)
struct Found {
    int32_t n;
    float v;  // the screened logit
};
struct Scan {  // one thread's candidates of one row
    __m512 top;  // the largest lower bounds seen, lane by lane
    float best;  // a lower bound of the row's largest lower bound (top's maximum, taken now and then)
    int64_t count;
    bool over;
    Found *list;
};
struct Screen {
    const uint32_t *xb;  // [Mp][K2] x's rows as bfloat16 pairs, zero rows past M
    const float *bound;  // [M] C ||x_m||_2: e_n = bound[m] * norms[n]
    const uint16_t *w;   // screen_pack's panels
    const float *norms;
    float *y;
    int64_t M, N, K2, limit;
};

// Drop the candidates no longer above the row's best lower bound.
static void compact(Scan &s, const float *norms, float bound) {
    int64_t kept = 0;
    for (int64_t i = 0; i < s.count; i++)
        if (s.list[i].v + bound * norms[s.list[i].n] >= s.best) s.list[kept++] = s.list[i];
    s.count = kept;
    if (kept > CANDIDATES / 2) s.over = true;
}

// Row m's screened sums at columns [c0, c0 + SV): its candidates into s, -inf into y's columns.
static inline void consider(const Screen &in, Scan &s, int64_t m, int64_t c0, __m512 sums) {
    if (c0 >= in.N) return;
    const __mmask16 inside = c0 + SV <= in.N ? (__mmask16)0xffff : (__mmask16)((1u << (in.N - c0)) - 1);
    const __mmask16 valid = c0 + SV <= in.limit ? (__mmask16)0xffff : c0 >= in.limit ? 0 : (__mmask16)((1u << (in.limit - c0)) - 1);
    const __m512 e = _mm512_mul_ps(_mm512_set1_ps(in.bound[m]), _mm512_loadu_ps(in.norms + c0));
    s.top = _mm512_mask_max_ps(s.top, valid, s.top, _mm512_sub_ps(sums, e));
    uint32_t found = _mm512_mask_cmp_ps_mask(valid, _mm512_add_ps(sums, e), _mm512_set1_ps(s.best), _CMP_GE_OQ);
    if (found && !s.over) {
        alignas(64) float v[SV];
        _mm512_store_ps(v, sums);
        for (; found; found &= found - 1) {
            if (s.count == CANDIDATES) compact(s, in.norms, in.bound[m]);
            if (s.over) break;
            const int i = __builtin_ctz(found);
            s.list[s.count++] = Found{(int32_t)(c0 + i), v[i]};
        }
    }
    _mm512_mask_storeu_ps(in.y + m * in.N + c0, inside, _mm512_set1_ps(-INFINITY));
}

static inline void refresh(Scan &s) { s.best = std::max(s.best, _mm512_reduce_max_ps(s.top)); }

// Rows [m0, m0 + R) times panels p, p + 1, in vdpbf16ps.
template <int R>
static void screen_vectors(const Screen &in, Scan *scans, int64_t m0, int64_t p) {
    __m512 acc[R][2];
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    const uint16_t *w = in.w + p * in.K2 * SV * 2;
    for (int64_t k2 = 0; k2 < in.K2; k2++) {
        const __m512bh w0 = (__m512bh)_mm512_load_si512((const void *)(w + k2 * SV * 2));
        const __m512bh w1 = (__m512bh)_mm512_load_si512((const void *)(w + (in.K2 + k2) * SV * 2));
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
            const __m512bh a = (__m512bh)_mm512_set1_epi32((int)in.xb[(m0 + r) * in.K2 + k2]);
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, w0);
            acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, w1);
        }
    }
    for (int r = 0; r < R; r++) {
        for (int j = 0; j < 2; j++) consider(in, scans[m0 + r], m0 + r, (p + j) * SV, acc[r][j]);
        refresh(scans[m0 + r]);
    }
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
struct alignas(64) TileConfig {
    uint8_t palette, start;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};
// Rows [m0, m0 + 16 RT) times panels p, p + 1 in tiles: sums C(r, j) in tiles 2r + j, x's rows in 4 + r, w's in 6 + j.
template <int RT>
static void screen_tile(const Screen &in, Scan *scans, int64_t m0, int64_t p) {
    _tile_zero(0);
    _tile_zero(1);
    if (RT == 2) {
        _tile_zero(2);
        _tile_zero(3);
    }
    const uint16_t *w = in.w + p * in.K2 * SV * 2;
    for (int64_t k2 = 0; k2 < in.K2; k2 += SK) {
        _tile_loadd(4, in.xb + m0 * in.K2 + k2, in.K2 * 4);
        _tile_loadd(6, w + k2 * SV * 2, SV * 4);
        _tile_loadd(7, w + (in.K2 + k2) * SV * 2, SV * 4);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        if (RT == 2) {
            _tile_loadd(5, in.xb + (m0 + 16) * in.K2 + k2, in.K2 * 4);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
        }
    }
    alignas(64) float c[4][16][SV];
    _tile_stored(0, c[0], SV * 4);
    _tile_stored(1, c[1], SV * 4);
    if (RT == 2) {
        _tile_stored(2, c[2], SV * 4);
        _tile_stored(3, c[3], SV * 4);
    }
    for (int64_t r = 0; r < 16 * RT && m0 + r < in.M; r++) {
        for (int j = 0; j < 2; j++) consider(in, scans[m0 + r], m0 + r, (p + j) * SV, _mm512_load_ps(c[r / 16 * 2 + j][r % 16]));
        refresh(scans[m0 + r]);
    }
}
#endif

// Row m's logit n as the matmul computes it: one FMA chain over k in order from 0, in packed's panel layout.
static inline float exact(const float *x, const float *packed, int64_t n, int64_t K) {
    const float *w = packed + n / NR * K * NR + n % NR;
    float acc = 0.0f;
    for (int64_t k = 0; k < K; k++) acc = __builtin_fmaf(x[k], w[k * NR], acc);
    return acc;
}

// One thread's pairs of panels [first, last) over every row: in tiles where `tiles`, else in vectors.
static void screen_share(const Screen &in, Scan *scans, int64_t first, int64_t last, bool tiles) {
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
    if (tiles) {
        TileConfig cfg{};
        cfg.palette = 1;
        for (int i = 0; i < 8; i++) cfg.colsb[i] = 64, cfg.rows[i] = 16;
        _tile_loadconfig(&cfg);
        for (int64_t q = first; q < last; q++)
            for (int64_t m = 0; m < in.M; m += SROWS) {
                if (in.M - m > 16) screen_tile<2>(in, scans, m, 2 * q);
                else screen_tile<1>(in, scans, m, 2 * q);
            }
        _tile_release();
        return;
    }
#endif
    (void)tiles;
    for (int64_t q = first; q < last; q++)
        for (int64_t m = 0; m < in.M; m += 8) switch (std::min<int64_t>(8, in.M - m)) {
                case 1: screen_vectors<1>(in, scans, m, 2 * q); break;
                case 2: screen_vectors<2>(in, scans, m, 2 * q); break;
                case 3: screen_vectors<3>(in, scans, m, 2 * q); break;
                case 4: screen_vectors<4>(in, scans, m, 2 * q); break;
                case 5: screen_vectors<5>(in, scans, m, 2 * q); break;
                case 6: screen_vectors<6>(in, scans, m, 2 * q); break;
                case 7: screen_vectors<7>(in, scans, m, 2 * q); break;
                default: screen_vectors<8>(in, scans, m, 2 * q); break;
            }
}

// Row m's candidates of every thread's list that survive the row's best lower bound, in exact float32 into y.
static void settle(const Screen &in, const Scan *scans, int64_t nt, int64_t m, const float *x, const float *packed, int64_t K, uint8_t *fallback) {
    float best = -INFINITY;
    for (int64_t u = 0; u < nt; u++) {
        const Scan &s = scans[u * in.M + m];
        best = std::max({best, s.best, _mm512_reduce_max_ps(s.top)});
        fallback[m] |= s.over;
    }
    if (fallback[m] || !std::isfinite(best)) {
        fallback[m] = 1;
        return;
    }
    for (int64_t u = 0; u < nt; u++) {
        const Scan &s = scans[u * in.M + m];
        for (int64_t i = 0; i < s.count; i++)
            if (s.list[i].v + in.bound[m] * in.norms[s.list[i].n] >= best) in.y[m * in.N + s.list[i].n] = exact(x + m * K, packed, s.list[i].n, K);
    }
}
#endif

// y [M, N]: for each row of x [M, K], its logits (x w^T, the bits matmul gives with packed) at every column below
// `limit` that could be the row's first argmax, -inf at every other column; fallback[m] = 1 where row m could not be
// screened (y's row then holds nothing useful: the caller runs it through matmul). screen and norms from screen_pack,
// packed from matmul_pack, of the same w; tiles: run in AMX tiles (where screen_tiles() is 1), else in vectors.
// Returns 0, or -1 where this build has no screen (screen_width() == 0).
extern "C" int screened_logits(const float *x, const uint16_t *screen, const float *norms, const float *packed, float *y, uint8_t *fallback,
                               int64_t M, int64_t N, int64_t K, int64_t limit, int threads, int tiles) {
#if defined(__AVX512BF16__) && !defined(TOKENMILL_NO_MATMUL)
    if (M <= 0) return 0;
    const int64_t K2 = screen_pairs(K), nt = threads > 0 ? threads : 1, pairs = screen_panels(N) / 2, Mp = (M + SROWS - 1) / SROWS * SROWS;
    const float wmax = norms[screen_panels(N) * SV];  // screen_pack's largest norm
    std::unique_ptr<uint32_t[]> xb(new uint32_t[Mp * K2]());
    std::unique_ptr<float[]> bound(new float[M]);
    const double C = (std::ldexp(1.0, -7) + std::ldexp(1.0, -15) + 2.0 * (K + 2) * std::ldexp(1.0, -24)) * 1.05;
    for (int64_t m = 0; m < M; m++) {
        double s = 0;
        bool finite = true;
        for (int64_t k = 0; k < K; k++) finite &= std::isfinite(x[m * K + k]), s += (double)x[m * K + k] * x[m * K + k];
        const double norm = sqrt(s) * (1 + 1e-6);
        fallback[m] = !finite || !(norm * wmax < 1e30) || limit <= 0;
        bound[m] = fallback[m] ? 0.0f : (float)(C * norm) + 1e-30f;  // + the flushed subnormals' share, tiny
        for (int64_t k = 0; k < K; k++) xb[m * K2 + k / 2] |= (uint32_t)bf16(x[m * K + k]) << (16 * (k % 2));
    }
    const Screen in{xb.get(), bound.get(), screen, norms, y, M, N, K2, std::min(limit, N)};
    std::unique_ptr<Found[]> lists(new Found[nt * M * CANDIDATES]);
    std::unique_ptr<Scan[]> scans(new Scan[nt * M]);
    for (int64_t i = 0; i < nt * M; i++) scans[i] = Scan{_mm512_set1_ps(-INFINITY), -INFINITY, 0, false, lists.get() + i * CANDIDATES};
    const bool amx = tiles && screen_tiles();
#pragma omp parallel num_threads(nt)
    {
        const int64_t t = omp_get_thread_num();
        screen_share(in, scans.get() + t * M, pairs * t / nt, pairs * (t + 1) / nt, amx);
#pragma omp barrier
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++) settle(in, scans.get(), nt, m, x, packed, K, fallback);
    }
    return 0;
#else
    (void)x, (void)screen, (void)norms, (void)packed, (void)y, (void)fallback, (void)M, (void)N, (void)K, (void)limit, (void)threads, (void)tiles;
    return -1;
#endif
}
