// Paged attention on the CPU over the block pool, read in place (the torch path gathers keys and values
// into a padded copy first: 3x the memory traffic).
//
// The pool keeps a block's keys as columns and its values as rows: one kv head's block of BS keys is [D][BS]
// (element d of key j at d * BS + j), its values [BS][D]. So element d of 16 consecutive keys is one vector load,
// and a lane's score is one chain of multiply-adds over the head's elements, with no tree of shuffles to sum it.
//
// paged_decode: each sequence's one new query. Every (sequence, kv head) is one task computed alone; where it is
// given the step's rotated keys it first writes its own new key into its column (the lines it is about to read:
// written earlier, one key across D cold lines, that write cost more than the columns saved).
// paged_prefill: prompt positions, chunk by chunk.
//
// Both run one recipe, fixed by the position alone: keys 16 at a time in the lanes, each lane's dot product one
// multiply-add per element in order, a fixed exp polynomial, values summed key by key in order. So a position's
// bits do not depend on the batch, its chunk, the threads, on whether it runs alone or paired with the next
// position (AVX-512 takes two prompt positions at a time where their sums fit in registers, loading each key and
// value vector once for both), nor on whether it was computed as a generated or as a prompt position.
//
// Keys and values are float32, or IEEE half (`Half`, --kv-cache-dtype float16: the _f16 entry points, built where
// the CPU converts half in hardware). A half is read into a float lane exactly, and every recipe then runs the
// same float operations on it, so with half keys and values the bits are still fixed by the position alone.
//
// Threads come from OpenMP, linked to the same libgomp.so.1 as torch, so the kernels run on torch's own
// thread pool instead of competing with it.
#ifdef __F16C__
#include <immintrin.h>
#endif
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef float v8 __attribute__((vector_size(32), aligned(4)));
typedef float v4 __attribute__((vector_size(16), aligned(4)));

// How many 16-lane vectors of partial sums the inner loops keep in flight. With AVX-512's 32 registers a
// 16-lane vector is one register; with AVX2's 16 it is two, so the tiles are smaller there. Only the tiling
// changes: every lane runs the same operations in the same order, so the bits are the same either way.
#ifdef __AVX512F__
enum { WIDE = 1 };
#else
enum { WIDE = 0 };
#endif

// Lane by lane, for any vector type V (16 or 8 lanes) and its int32 twin I; so both layouts of v16 below
// run the same operations.
template <class V>
static inline V raise_to(V x, float lowest) {  // x < lowest ? lowest : x
    const V l = V{} + lowest;
    return x < l ? l : x;
}

template <class V>
static inline V larger(V x, V top) {  // x > top ? x : top
    return x > top ? x : top;
}

template <class V, class I>
static inline V exp_lanes(V x) {  // e^x for x <= 0: 2^n * p(r), r = x - n ln2, p Taylor to r^7 (~1 ulp)
    x = raise_to(x, -87.0f);
    const V t = x * 1.44269504f;
    const I n = __builtin_convertvector(t + (t < 0 ? -0.5f : 0.5f), I);
    const V nf = __builtin_convertvector(n, V);
    const V r = x - nf * 0.693145751953125f - nf * 1.428606765330187e-06f;  // ln2 in two parts
    V p = V{} + 1.0f / 5040;
    p = p * r + 1.0f / 720;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const I bits = (n + 127) << 23;
    V scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

template <class V>
static inline V exp_shifted(V x, float m) {  // lanes at -inf (masked keys) give 0, the others e^(x - m)
    return x == -INFINITY ? V{} : exp_lanes<V, decltype(x == x)>(x - m);
}

#ifdef __AVX512F__
typedef float v16 __attribute__((vector_size(64), aligned(4)));

static inline v16 splat(float x) { return v16{} + x; }
static inline float lane(v16 a, int j) { return a[j]; }
static inline v8 low(v16 a) { return __builtin_shufflevector(a, a, 0, 1, 2, 3, 4, 5, 6, 7); }
static inline v8 high(v16 a) { return __builtin_shufflevector(a, a, 8, 9, 10, 11, 12, 13, 14, 15); }
// larger and exp_shifted: the lane-wise templates above take v16 itself
#else
// AVX2: 16 lanes as two 8-lane halves. GCC keeps a 64-byte vector type that the target has no register
// for in memory, and moved every partial sum through the stack and general registers; two v8s stay in
// registers. Same lanes, same operations, same bits. On a 2-core AVX2 EPYC, SmolLM2's 30 layers: a
// 64-sequence decode 156-176 -> 89-92 ms, a 320-row prefill 293-302 -> 38-45 ms.
struct v16 {
    v8 lo, hi;
};
static inline v16 operator+(v16 a, v16 b) { return {a.lo + b.lo, a.hi + b.hi}; }
static inline v16 operator*(v16 a, v16 b) { return {a.lo * b.lo, a.hi * b.hi}; }
static inline v16 operator*(float a, v16 b) { return {a * b.lo, a * b.hi}; }
static inline v16 operator*(v16 a, float b) { return {a.lo * b, a.hi * b}; }
static inline v16 &operator+=(v16 &a, v16 b) { return a = a + b; }
static inline v16 &operator*=(v16 &a, float b) { return a = a * b; }
static inline v16 splat(float x) { return {v8{} + x, v8{} + x}; }
static inline float lane(v16 a, int j) { return j < 8 ? a.lo[j] : a.hi[j - 8]; }
static inline v8 low(v16 a) { return a.lo; }
static inline v8 high(v16 a) { return a.hi; }
static inline v16 larger(v16 x, v16 top) { return {larger<v8>(x.lo, top.lo), larger<v8>(x.hi, top.hi)}; }
static inline v16 exp_shifted(v16 x, float m) { return {exp_shifted<v8>(x.lo, m), exp_shifted<v8>(x.hi, m)}; }
#endif

// 16 keys' or values' elements from p as float lanes.
struct Half {
    uint16_t bits;
};
static inline v16 load16(const float *p) { return *(const v16 *)p; }
#ifdef __F16C__
#ifdef __AVX512F__
static inline v16 load16(const Half *p) { return (v16)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }
#else
static inline v16 load16(const Half *p) {
    return {(v8)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)), (v8)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 8)))};
}
#endif
#endif

static inline float hsum(v16 a) {  // a fixed tree of additions: lanes m + m+8, then m + m+4, m + m+2, m + m+1
    v8 b = low(a) + high(a);
    v4 c = __builtin_shufflevector(b, b, 0, 1, 2, 3) + __builtin_shufflevector(b, b, 4, 5, 6, 7);
    return (c[0] + c[2]) + (c[1] + c[3]);
}

// Forced inline (as sum_values_pass below): with the half kernels beside the float ones, GCC's inlining budget ran out
// and called them, and a c64 step ran 2-5% slower.
#define HOT static inline __attribute__((always_inline))

// The cache lines a decode thread reads next, in the order it reads them: task t's keys block by block, then
// its values, then task t + 1's, never more than one task ahead of the one computing (the L2 holds two). The
// loops fetch a few lines at a time as they go, a little faster than they read, so the memory always has
// misses in flight while the core computes. Fetching whole blocks at once filled the core's miss buffers and
// stalled its own loads: no faster than not prefetching at all. SmolLM2's 30 layers, 64 sequences, blocks
// shuffled, 2 cores: reading alone 32-39 ms, computing alone 23, the kernel with whole blocks 57-62; fetching
// as it goes, alternated: 61.9 -> 54.4 ms on 2 MiB pages, 100.2 -> 97.5 on 4 KiB ones at a slower hour.
// The lines go into L2 (prefetcht1), not into the 32 KiB L1 the loops read from: in the engine (Zen 4,
// kernel_ab, same bits) a decode-only step of 16 / 64 sequences then took 0.958 / 0.922x the time.
// E: the pool's element; half keys and values take half the lines, so N stays the float count and the fetches keep
// pace with the reads (for float the arithmetic folds away at compile time).
template <class E>
struct Stream {
    static constexpr int64_t bytes = sizeof(E);
    const char *k = nullptr, *v = nullptr;
    const int64_t *tables = nullptr, *lens = nullptr;
    int64_t KVH = 0, NB = 0, BS = 0, D = 0, NBT = 0;
    int64_t end = 0, limit = 0;  // the thread's tasks end here; the last task to fetch for now
    int64_t t = 0, blk = 0, line = 0, blocks = 0;  // the next line: task, its block, the line in it
    bool values = false;
    const char *base = nullptr;  // the block being fetched; null: nothing left

    void start(int64_t task) {
        t = task, blk = line = 0, values = false;
        blocks = t < end ? (lens[t / KVH] + BS - 1) / BS : 0;
        locate();
    }
    void locate() {
        const int64_t block = BS * D * bytes;
        base = t < end ? (values ? v : k) + (t % KVH) * NB * block + tables[(t / KVH) * NBT + blk] * block : nullptr;
    }
    template <int N>
    inline void fetch() {  // the next N lines of float elements (fewer at a block's end)
        if (base == nullptr || t > limit) return;
        constexpr int64_t n = (N * bytes + 3) / 4;
        const int64_t lines = BS * D * bytes / 64;
        for (int64_t i = line; i < line + n && i < lines; i++) __builtin_prefetch(base + i * 64, 0, 2);
        if ((line += n) < lines) return;
        line = 0;
        if (++blk < blocks) return locate();
        blk = 0;
        if (values) return start(t + 1);
        values = true;
        locate();
    }
};

// A float into the pool: as it is, or as IEEE half rounded to nearest and saturated at +-65504 (llama_ops.cpp's
// store_row, element by element: the same rounding, so a key has the same bits whichever kernel wrote it).
static inline void put(float *dst, float x) { *dst = x; }
#ifdef __F16C__
static inline void put(Half *dst, float x) {
    const float y = x > 65504.0f ? 65504.0f : x < -65504.0f ? -65504.0f : x;  // a NaN stays NaN
    dst->bits = _cvtss_sh(y, _MM_FROUND_TO_NEAREST_INT);
}
#endif

// Key `pos` of one kv head's keys (a column of its block) <- key [D].
template <class E>
static void store_key(E *keys, const int64_t *table, int64_t pos, int64_t BS, int64_t D, const float *key) {
    E *col = keys + table[pos / BS] * BS * D + pos % BS;
    for (int64_t d = 0; d < D; d++) put(col + d * BS, key[d]);
}

// Where 16 keys of one kv head start, from key l0 (a multiple of 16), their element d `ld` further per d: in the
// block itself where a block holds a multiple of 16 keys (the 16 then lie in one block), else (table null) in a copy
// laid out [D][ld] by gather_keys.
template <class E>
struct KeyCols {
    const E *keys;
    const int64_t *table;
    int64_t BS, block, ld;
    const E *at(int64_t l0) const { return table ? keys + table[l0 / BS] * block + l0 % BS : keys + l0; }
};

// Keys from..len-1 of one kv head (blocks of BS keys, BS not a multiple of 16) copied into kT [D, ld], whose keys
// 0..from-1 are already there; the rest of the last group of 16 is 0 (its scores are masked).
template <class E>
static void gather_keys(const E *keys, const int64_t *table, int64_t from, int64_t len, int64_t BS, int64_t D, E *kT, int64_t ld) {
    const int64_t end = (len + 15) / 16 * 16;
    for (int64_t l = from; l < end; l++) {
        const E *col = l < len ? keys + table[l / BS] * BS * D + l % BS : nullptr;
        for (int64_t d = 0; d < D; d++) kT[d * ld + l] = col ? col[d * BS] : E{};
    }
}

// One kv head's keys 0..len-1 as columns: in place, or gathered into kT (room for D x ld) where blocks are not a
// multiple of 16; `have` keys are already gathered there.
template <class E>
static KeyCols<E> key_cols(const E *keys, const int64_t *table, int64_t have, int64_t len, int64_t BS, int64_t D, E *kT, int64_t ld) {
    if (BS % 16 == 0) return {keys, table, BS, BS * D, BS};
    gather_keys(keys, table, have, len, BS, D, kT, ld);
    return {kT, nullptr, BS, BS * D, ld};
}

// Scores of P positions' G query rows each (position p's head g at q[p * qt + g * qh + d]) against NG groups of 16
// keys from key `first` on, one multiply-add a head element in order, scaled, into score row p * GN + g: every lane
// runs the same operations whichever pass or pair its group falls in, and whichever kernel calls it. The decode
// kernel fetches its stream as it goes (GN x NG / 2 lines an element, a little faster than it reads).
template <int P, int GN, int NG, class E>
HOT void score_groups(const float *q, int64_t qt, int64_t qh, const KeyCols<E> &cols, int64_t D, int64_t first, float scale, float *scores,
                      int64_t stride, Stream<E> *stream) {
    v16 acc[P][GN][NG];
    const E *key[NG];
    for (int j = 0; j < NG; j++) key[j] = cols.at(first + 16 * j);
    for (int p = 0; p < P; p++)
        for (int g = 0; g < GN; g++)
            for (int j = 0; j < NG; j++) acc[p][g][j] = splat(0.0f);
    for (int64_t d = 0; d < D; d++) {
        if (stream && d % 2 == 0) stream->template fetch<GN * NG>();
        v16 k[NG];
        for (int j = 0; j < NG; j++) k[j] = load16(key[j] + d * cols.ld);
        for (int p = 0; p < P; p++)
            for (int g = 0; g < GN; g++) {
                const float x = q[p * qt + g * qh + d];
                for (int j = 0; j < NG; j++) acc[p][g][j] += x * k[j];
            }
    }
    for (int p = 0; p < P; p++)
        for (int g = 0; g < GN; g++)
            for (int j = 0; j < NG; j++) *(v16 *)(scores + (p * GN + g) * stride + first + 16 * j) = acc[p][g][j] * scale;
}

// The same for any G, one group and head at a time (shapes without a fixed instance): the same operations per lane.
template <class E>
static void score_any(const float *q, int64_t qh, int64_t G, const KeyCols<E> &cols, int64_t D, int64_t len, float scale, float *scores,
                      int64_t stride, Stream<E> *stream) {
    for (int64_t l0 = 0; l0 < len; l0 += 16) {
        const E *key = cols.at(l0);
        for (int64_t g = 0; g < G; g++) {
            v16 acc = splat(0.0f);
            for (int64_t d = 0; d < D; d++) {
                if (stream && d % 8 == 0) stream->template fetch<4>();
                acc += q[g * qh + d] * load16(key + d * cols.ld);
            }
            *(v16 *)(scores + g * stride + l0) = acc * scale;
        }
    }
}

// Scores of P positions of GN heads over keys 0..len+P-2 (the last position's), NG groups a pass, the rest one by one.
template <int P, int GN, int NG, class E>
HOT void score_all(const float *q, int64_t qt, int64_t qh, const KeyCols<E> &cols, int64_t D, int64_t len, float scale, float *scores, int64_t stride,
                   Stream<E> *stream) {
    const int64_t groups = (len + P - 1 + 15) / 16;
    int64_t j = 0;
    for (; j + NG <= groups; j += NG) score_groups<P, GN, NG, E>(q, qt, qh, cols, D, 16 * j, scale, scores, stride, stream);
    for (; j < groups; j++) score_groups<P, GN, 1, E>(q, qt, qh, cols, D, 16 * j, scale, scores, stride, stream);
}

// Groups a pass: about a dozen independent sums a position in flight with AVX-512, half that with AVX2. Two
// positions of 3 heads take 3: with 4, GCC kept two of the 4 key vectors on the stack (SmolLM2's prompts: 0.96x the time).
template <int P, int GN>
static constexpr int groups_a_pass() {
    return WIDE ? (GN >= 3 ? (P == 2 ? 3 : 4) : GN == 2 ? 6 : 8) : (GN >= 3 ? 2 : GN == 2 ? 3 : 4);
}

// sc[0, len) -> softmax, in place; sc is padded with -inf to whole 16-lane vectors.
static void softmax(float *sc, int64_t len) {
    const int64_t padded = (len + 15) / 16 * 16;
    for (int64_t l = len; l < padded; l++) sc[l] = -INFINITY;
    v16 top = splat(-INFINITY);
    for (int64_t l = 0; l < padded; l += 16) top = larger(*(v16 *)(sc + l), top);
    float m = lane(top, 0);
    for (int j = 1; j < 16; j++) m = lane(top, j) > m ? lane(top, j) : m;
    v16 sum = splat(0.0f);
    for (int64_t l = 0; l < padded; l += 16) {
        const v16 e = exp_shifted(*(v16 *)(sc + l), m);
        *(v16 *)(sc + l) = e;
        sum += e;
    }
    const float inv = 1.0f / hsum(sum);
    for (int64_t l = 0; l < padded; l += 16) *(v16 *)(sc + l) *= inv;
}

// out [G, D] = the G score rows [G, stride] (softmaxed) times values 0..len-1 of one kv head, key by key
// in order, the sums in registers; block by block, so no division per key.
// Chunks [c0, c0 + CP) of out's rows: one pass over the keys with GN x CP sums in registers.
template <int GN, int CN, int CP, class E>
HOT void sum_values_pass(const float *scores, int64_t stride, const E *values, const int64_t *table, int64_t len, int64_t BS, float *out,
                            int c0, Stream<E> *stream) {
    const int64_t D = CN * 16, block = BS * D;
    v16 acc[GN][CP];
    for (int g = 0; g < GN; g++)
        for (int c = 0; c < CP; c++) acc[g][c] = splat(0.0f);
    for (int64_t l0 = 0; l0 < len; l0 += BS) {
        const E *block_values = values + table[l0 / BS] * block;
        for (int64_t l = l0; l < l0 + BS && l < len; l++) {
            const E *val = block_values + (l - l0) * D + 16 * c0;
            if (stream) stream->template fetch<2 * CP>();  // CN / CP passes: 2 CN lines a key in all
            for (int g = 0; g < GN; g++) {
                const float p = scores[g * stride + l];
                for (int c = 0; c < CP; c++) acc[g][c] += p * load16(val + 16 * c);
            }
        }
    }
    v16 *o = (v16 *)out;
    for (int g = 0; g < GN; g++)
        for (int c = 0; c < CP; c++) o[g * CN + c0 + c] = acc[g][c];
}

// The output sums of all GN x CN chunks at once with AVX-512; with AVX2 in passes of at most 6 vectors
// (12 of its 16 registers). Each output lane adds its keys in order in every pass, so the bits are the same.
template <int GN, int CN, class E>
static void sum_values(const float *scores, int64_t stride, const E *values, const int64_t *table, int64_t len, int64_t BS, float *out,
                       Stream<E> *stream = nullptr) {
    constexpr int fit = GN == 1 ? 4 : GN <= 3 ? 2 : 1, CP = WIDE || CN < fit ? CN : fit;  // CP divides CN (both powers of 2)
    for (int c0 = 0; c0 < CN; c0 += CP) sum_values_pass<GN, CN, CP, E>(scores, stride, values, table, len, BS, out, c0, stream);
}

struct Shape {
    int64_t B, H, KVH, NB, BS, D, NBT;  // sequences, query heads, kv heads, pool blocks, block size, head size, table width
    int64_t QH, QT;  // query element (head h, sequence b, d) at q[h * QH + b * QT + d]
};

// One (sequence b, kv head) task: its G query heads over its len keys, after writing its new key where knew is given.
// GN and CN fix G and the head size in 16-lane chunks at compile time (0: read from s), so the common shapes keep the
// queries and the output sums in registers; every shape runs the same operations in the same order. kT: room for
// the keys gathered where a block is not a multiple of 16 keys.
template <int GN, int CN, class E>
static void attend(const float *q, const E *k, const E *v, const int64_t *table, int64_t len, float *out, const Shape &s, int64_t kvh,
                   float scale, float *scores, int64_t stride, Stream<E> &stream, const float *knew, E *kT) {
    const int64_t G = GN ? GN : s.H / s.KVH, C = CN ? CN : s.D / 16, D = C * 16, BS = s.BS, block = BS * D;
    const E *keys = k + kvh * s.NB * block, *values = v + kvh * s.NB * block;
    if (knew != nullptr) store_key((E *)keys, table, len - 1, BS, D, knew);
    const KeyCols<E> cols = key_cols(keys, table, 0, len, BS, D, kT, stride);
    if (GN) score_all<1, GN ? GN : 1, groups_a_pass<1, GN ? GN : 1>(), E>(q, 0, s.QH, cols, D, len, scale, scores, stride, &stream);
    else score_any(q, s.QH, G, cols, D, len, scale, scores, stride, &stream);
    for (int64_t g = 0; g < G; g++) softmax(scores + g * stride, len);
    if (GN && CN) {  // the output sums in registers
        sum_values<GN ? GN : 1, CN ? CN : 1, E>(scores, stride, values, table, len, BS, out, &stream);
        return;
    }
    v16 *o = (v16 *)out;
    memset(out, 0, sizeof(float) * G * D);
    for (int64_t l = 0; l < len; l++) {
        stream.template fetch<8>();  // the keys and values take 2 C lines a key: 8 at the common C = 4
        const E *val = values + table[l / BS] * block + (l % BS) * D;
        for (int64_t g = 0; g < G; g++) {
            const float p = scores[g * stride + l];
            for (int64_t c = 0; c < C; c++) o[g * C + c] += p * load16(val + 16 * c);
        }
    }
}

template <class E>
using Attend = void (*)(const float *, const E *, const E *, const int64_t *, int64_t, float *, const Shape &, int64_t, float, float *, int64_t,
                        Stream<E> &, const float *, E *);

// kernel<G, CN, E> for G query heads a kv head (1 to 8), else `otherwise`: one instance of a kernel per group size.
#define BY_GROUP(kernel, G, CN, E, otherwise) \
    switch (G) {                              \
        case 1: return kernel<1, CN, E>;      \
        case 2: return kernel<2, CN, E>;      \
        case 3: return kernel<3, CN, E>;      \
        case 4: return kernel<4, CN, E>;      \
        case 5: return kernel<5, CN, E>;      \
        case 6: return kernel<6, CN, E>;      \
        case 7: return kernel<7, CN, E>;      \
        case 8: return kernel<8, CN, E>;      \
        default: return otherwise;            \
    }

template <int CN, class E>
static Attend<E> pick_group(int64_t G) {
    BY_GROUP(attend, G, CN, E, (attend<0, 0, E>))
}

template <class E>
static Attend<E> pick(int64_t G, int64_t C) {  // head sizes 64 and 128 with up to 8 query heads a kv head: fixed shapes
    return C == 4 ? pick_group<4, E>(G) : C == 8 ? pick_group<8, E>(G) : attend<0, 0, E>;
}

// The first (sequence, kv head) task of thread i of n: each thread takes about as many keys, not as many tasks.
// Sequences arrive in order, so with equal task counts the older, longer ones fell to the first thread.
static int64_t split(const int64_t *lens, int64_t KVH, int64_t B, int64_t i, int64_t n) {
    if (i >= n) return B * KVH;
    int64_t total = 0;
    for (int64_t b = 0; b < B; b++) total += lens[b];
    const int64_t want = total * KVH * i / n;  // keys before thread i's first task
    int64_t seen = 0, t = 0;
    for (; t < B * KVH && seen + lens[t / KVH] / 2 < want; t++) seen += lens[t / KVH];  // a task goes where most of it falls
    return t;
}

// q: element (head h, sequence b, d) at q[h * qh + b * qt + d]; k, v [KVH, NB, BS, D] (one layer of the pool, keys as
// columns); tables [B, NBT]; lens [B] keys each query sees; knew: element (sequence b, kv head j, d) of the step's
// rotated keys at knew[b * kt + j * D + d], written here at position lens[b] - 1, or null where the pool has them
// already; out [B, H, D]. Returns 0, or -1 when D is not a multiple of 16 (the caller falls back to torch ops).
template <class E>
static int decode(const float *q, int64_t qh, int64_t qt, const E *k, const E *v, const int64_t *tables, const int64_t *lens, const float *knew,
                  int64_t kt, float *out, int64_t B, int64_t H, int64_t KVH, int64_t NB, int64_t BS, int64_t D, int64_t NBT, float scale,
                  int threads) {
    if (D % 16) return -1;
    const Shape s{B, H, KVH, NB, BS, D, NBT, qh, qt};
    const int64_t tasks = B * KVH, G = H / KVH, stride = (NBT * BS + 15) / 16 * 16;
    if (threads > tasks) threads = (int)tasks;
    const Attend<E> run = pick<E>(G, D / 16);
#pragma omp parallel num_threads(threads > 0 ? threads : 1)
    {
        const int64_t i = omp_get_thread_num(), n = omp_get_num_threads();
        float *scores = (float *)aligned_alloc(64, sizeof(float) * G * stride);
        E *kT = BS % 16 ? (E *)aligned_alloc(64, sizeof(E) * D * stride) : nullptr;
        const int64_t first = split(lens, KVH, B, i, n), end = split(lens, KVH, B, i + 1, n);
        Stream<E> stream{(const char *)k, (const char *)v, tables, lens, KVH, NB, BS, D, NBT, end, first};
        stream.start(first);
        for (int j = 0; j < 16; j++) stream.template fetch<4>();  // a head start of 64 lines
        for (int64_t t = first; t < end; t++) {
            const int64_t b = t / KVH, kvh = t % KVH;
            stream.limit = t + 1;
            run(q + b * qt + kvh * G * qh, k, v, tables + b * NBT, lens[b], out + (b * H + kvh * G) * D, s, kvh, scale, scores, stride, stream,
                knew ? knew + b * kt + kvh * D : nullptr, kT);
        }
        free(scores);
        free(kT);
    }
    return 0;
}

extern "C" int paged_decode(const float *q, int64_t qh, int64_t qt, const float *k, const float *v, const int64_t *tables, const int64_t *lens,
                            const float *knew, int64_t kt, float *out, int64_t B, int64_t H, int64_t KVH, int64_t NB, int64_t BS, int64_t D,
                            int64_t NBT, float scale, int threads) {
    return decode(q, qh, qt, k, v, tables, lens, knew, kt, out, B, H, KVH, NB, BS, D, NBT, scale, threads);
}

#ifdef __F16C__
extern "C" int paged_decode_f16(const float *q, int64_t qh, int64_t qt, const void *k, const void *v, const int64_t *tables, const int64_t *lens,
                                const float *knew, int64_t kt, float *out, int64_t B, int64_t H, int64_t KVH, int64_t NB, int64_t BS, int64_t D,
                                int64_t NBT, float scale, int threads) {
    return decode(q, qh, qt, (const Half *)k, (const Half *)v, tables, lens, knew, kt, out, B, H, KVH, NB, BS, D, NBT, scale, threads);
}
#endif

// Two positions' output sums at once (score rows 0..GN-1 the first's over len keys, GN..2GN-1 the second's over
// len + 1), each value vector loaded once for both: every sum still adds its keys in order, so the bits are a
// lone position's.
template <int GN, int CN, class E>
HOT void sum_values_pair(const float *scores, int64_t stride, const E *values, const int64_t *table, int64_t len, int64_t BS, float *out0,
                         float *out1) {
    const int64_t D = CN * 16, block = BS * D;
    v16 acc[2][GN][CN];
    for (int p = 0; p < 2; p++)
        for (int g = 0; g < GN; g++)
            for (int c = 0; c < CN; c++) acc[p][g][c] = splat(0.0f);
    for (int64_t l0 = 0; l0 < len; l0 += BS) {
        const E *block_values = values + table[l0 / BS] * block;
        for (int64_t l = l0; l < l0 + BS && l < len; l++) {
            const E *val = block_values + (l - l0) * D;
            v16 v[CN];
            for (int c = 0; c < CN; c++) v[c] = load16(val + 16 * c);
            for (int p = 0; p < 2; p++)
                for (int g = 0; g < GN; g++) {
                    const float s = scores[(p * GN + g) * stride + l];
                    for (int c = 0; c < CN; c++) acc[p][g][c] += s * v[c];
                }
        }
    }
    const E *val = values + table[len / BS] * block + (len % BS) * D;  // the second position's last key
    for (int g = 0; g < GN; g++) {
        const float s = scores[(GN + g) * stride + len];
        for (int c = 0; c < CN; c++) acc[1][g][c] += s * load16(val + 16 * c);
    }
    for (int g = 0; g < GN; g++)
        for (int c = 0; c < CN; c++) ((v16 *)out0)[g * CN + c] = acc[0][g][c], ((v16 *)out1)[g * CN + c] = acc[1][g][c];
}

// P (1 or 2) consecutive prompt positions, the first seeing keys 0..len-1: their G query heads each
// (q[p * qt + g * qh + d]) -> out [G, D] of each, the second's ot after the first's.
template <int GN, int CN, class E, int P>
static void prefill_rows(const float *q, int64_t qt, int64_t qh, const KeyCols<E> &cols, const E *values, const int64_t *table, int64_t len,
                         float *out, int64_t ot, int64_t BS, float scale, float *scores, int64_t stride) {
    score_all<P, GN, groups_a_pass<P, GN>(), E>(q, qt, qh, cols, CN * 16, len, scale, scores, stride, nullptr);
    for (int p = 0; p < P; p++)
        for (int g = 0; g < GN; g++) softmax(scores + (p * GN + g) * stride, len + p);
    if constexpr (P == 2) sum_values_pair<GN, CN, E>(scores, stride, values, table, len, BS, out, out + ot);
    else sum_values<GN, CN, E>(scores, stride, values, table, len, BS, out);
}

// Whether two positions at once keep their sums in registers (AVX-512's 32): 2 x G x C of them. Pairs load each
// key and value vector once for two positions: SmolLM2's 30 layers, alternated, a step of 7 64-row chunks 45 -> 35
// ms, the last 464 rows of a 2,000-token prompt 530-550 -> 370-390 ms; an offline c16 / c64 run's calls 0.89x the time.
static constexpr bool pairs(int GN, int CN) { return WIDE && 2 * GN * CN <= 24; }

template <int GN, int CN, class E>
static int prefill_row(const float *q, int64_t qt, int64_t qh, const KeyCols<E> &cols, const E *values, const int64_t *table, int64_t len,
                       float *out, int64_t ot, int64_t BS, float scale, float *scores, int64_t stride, int n) {  // n positions offered; returns those done
    if constexpr (pairs(GN, CN)) {
        if (n == 2) {
            prefill_rows<GN, CN, E, 2>(q, qt, qh, cols, values, table, len, out, ot, BS, scale, scores, stride);
            return 2;
        }
    }
    prefill_rows<GN, CN, E, 1>(q, qt, qh, cols, values, table, len, out, ot, BS, scale, scores, stride);
    return 1;
}

template <class E>
using PrefillRow = int (*)(const float *, int64_t, int64_t, const KeyCols<E> &, const E *, const int64_t *, int64_t, float *, int64_t, int64_t,
                           float, float *, int64_t, int);

template <int CN, class E>
static PrefillRow<E> pick_prefill_group(int64_t G) {
    BY_GROUP(prefill_row, G, CN, E, nullptr)
}

template <class E>
static PrefillRow<E> pick_prefill(int64_t G, int64_t C) {
    switch (C) {
        case 1: return pick_prefill_group<1, E>(G);
        case 2: return pick_prefill_group<2, E>(G);
        case 4: return pick_prefill_group<4, E>(G);
        case 8: return pick_prefill_group<8, E>(G);
        default: return nullptr;
    }
}

enum { ROWS = 16 };  // prompt positions a task

// Prompt chunks: chunk c's positions start..start+count-1 sit at rows row0..row0+count-1 of the step.
// q: element (head h, row t, d) at q[h * qh + t * qt + d]; k, v [KVH, NB, BS, D] (one layer of the pool, keys as columns);
// chunks [C, 4] (row0, start, count, offset of its block table in tables); out [T, H, D], chunk rows written.
// Returns 0, or -1 for a shape it does not take (head size not 16, 32, 64 or 128, more than 8 query heads a kv head).
template <class E>
static int prefill(const float *q, int64_t qh, int64_t qt, const E *k, const E *v, const int64_t *chunks, const int64_t *tables, int64_t C, float *out,
                   int64_t H, int64_t KVH, int64_t NB, int64_t BS, int64_t D, float scale, int threads) {
    const int64_t G = H / KVH;
    const PrefillRow<E> row = D % 16 ? nullptr : pick_prefill<E>(G, D / 16);
    if (row == nullptr) return -1;
    int64_t tasks = 0, longest = 0;
    for (int64_t c = 0; c < C; c++) {
        tasks += KVH * ((chunks[4 * c + 2] + ROWS - 1) / ROWS);
        longest = chunks[4 * c + 1] + chunks[4 * c + 2] > longest ? chunks[4 * c + 1] + chunks[4 * c + 2] : longest;
    }
    const int64_t ld = (longest + 15) / 16 * 16 + 16, block = BS * D;  // + 16: rows of kT not a power of two apart (cache sets)
    if (threads > tasks) threads = (int)tasks;
#pragma omp parallel num_threads(threads > 0 ? threads : 1)
    {
        E *kT = BS % 16 ? (E *)aligned_alloc(64, sizeof(E) * D * ld) : nullptr;  // keys gathered where blocks are not a multiple of 16
        float *scores = (float *)aligned_alloc(64, sizeof(float) * 2 * G * ld);
        int64_t held = -1, have = 0;  // kT holds keys 0..have-1 of (chunk, kv head) pair `held`
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < tasks; t++) {
            int64_t c = 0, rest = t;  // task t -> (chunk c, kv head, ROWS positions), a pair's tasks in a row
            while (rest >= KVH * ((chunks[4 * c + 2] + ROWS - 1) / ROWS)) rest -= KVH * ((chunks[4 * c + 2] + ROWS - 1) / ROWS), c++;
            const int64_t row0 = chunks[4 * c], start = chunks[4 * c + 1], count = chunks[4 * c + 2], runs = (count + ROWS - 1) / ROWS;
            const int64_t *table = tables + chunks[4 * c + 3];
            const int64_t kvh = rest / runs, first = (rest % runs) * ROWS, last = first + ROWS < count ? first + ROWS : count;
            const E *keys = k + kvh * NB * block, *values = v + kvh * NB * block;
            // A thread's next task is mostly the pair's next run: only the keys it adds are gathered.
            if (held != c * KVH + kvh || have > start + last) held = c * KVH + kvh, have = 0;
            const KeyCols<E> cols = key_cols(keys, table, have / 16 * 16, start + last, BS, D, kT, ld);
            have = start + last;
            for (int64_t i = first, n; i < last; i += n) {  // two positions at a time where the kernel takes pairs
                const int64_t t_row = row0 + i;
                n = last - i < 2 ? 1 : 2;
                n = row(q + kvh * G * qh + t_row * qt, qt, qh, cols, values, table, start + i + 1, out + (t_row * H + kvh * G) * D, H * D, BS,
                        scale, scores, ld, (int)n);
            }
        }
        free(kT);
        free(scores);
    }
    return 0;
}

extern "C" int paged_prefill(const float *q, int64_t qh, int64_t qt, const float *k, const float *v, const int64_t *chunks, const int64_t *tables,
                             int64_t C, float *out, int64_t H, int64_t KVH, int64_t NB, int64_t BS, int64_t D, float scale, int threads) {
    return prefill(q, qh, qt, k, v, chunks, tables, C, out, H, KVH, NB, BS, D, scale, threads);
}

#ifdef __F16C__
extern "C" int paged_prefill_f16(const float *q, int64_t qh, int64_t qt, const void *k, const void *v, const int64_t *chunks, const int64_t *tables,
                                 int64_t C, float *out, int64_t H, int64_t KVH, int64_t NB, int64_t BS, int64_t D, float scale, int threads) {
    return prefill(q, qh, qt, (const Half *)k, (const Half *)v, chunks, tables, C, out, H, KVH, NB, BS, D, scale, threads);
}
#endif
