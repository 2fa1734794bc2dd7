/* hfquant's fused weight-quantization loops: one pass over a weight for its min / max per group, one for its codes
 * and their squared error. The eager path (primitives.py) computes the same numbers as a chain of torch ops per row
 * chunk; here each element is read once. Compiled on first use by hfquant/quant/native.py with the system's C
 * compiler (-O3 -march=native, no -ffast-math: x / s must stay IEEE division and rintf must round half to even, as
 * torch.round does, so the codes are bit-identical to the eager path's).
 *
 * Layout: x is a contiguous (rows, cols) weight in bfloat16, float16 or float32. Column c belongs to group c / group
 * (the last group may be shorter); per-group values live at [row * groups + c / group]. Channel strategy is
 * group == cols. Every function returns 0, 1 when the weight holds NaN or Inf (the caller then takes the eager
 * path, which names the problem), or 2 for arguments its loop does not take. Work is split across `threads` POSIX
 * threads by rows.
 *
 * One more loop runs at inference, not quantization: hfq_dequant_int4 turns the cpu backend's packed int4 codes back
 * into float32 or bfloat16 weights for a prefill GEMM (layout at its definition).
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>


static inline float load_bf16(const void *p, int64_t i) {
    uint32_t u = (uint32_t)((const uint16_t *)p)[i] << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

#if defined(__FLT16_MAX__) && !defined(HFQ_SOFT_HALF)
static inline float load_f16(const void *p, int64_t i) { return (float)((const _Float16 *)p)[i]; }
#else /* compilers without _Float16: the conversion by hand (exact: every half is a float) */
static inline float load_f16(const void *p, int64_t i) {
    const uint16_t h = ((const uint16_t *)p)[i];
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exponent = (h >> 10) & 0x1Fu, mantissa = h & 0x3FFu;
    uint32_t u;
    if (exponent == 31)
        u = sign | 0x7F800000u | (mantissa << 13); /* Inf, NaN */
    else if (exponent)
        u = sign | ((exponent + 112u) << 23) | (mantissa << 13);
    else {
        float f = (float)mantissa * 0x1p-24f; /* zero and subnormals */
        memcpy(&u, &f, sizeof u);
        u |= sign;
    }
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
#endif

static inline float load_f32(const void *p, int64_t i) { return ((const float *)p)[i]; }

typedef struct {
    const void *x;
    int64_t rows, cols, group, row0, row1;
    /* min / max */
    float *lo, *hi;
    /* codes */
    const float *scale, *zero;
    int float_zero;
    float qmin, qmax;
    uint8_t *codes;
    /* packing */
    const uint8_t *in;
    int bits;
    uint8_t *packed;
    /* int4 dequantization */
    const uint16_t *sz;
    int64_t sz_rows, sz_row0;
    int out_bf16;
    void *out;
    double error, energy;
    int bad;
} job;

static inline int64_t groups_of(int64_t cols, int64_t group) { return (cols + group - 1) / group; }

#if defined(__AVX2__) && defined(__F16C__)
#include <immintrin.h>
#define VECTOR 8
/* 8 consecutive elements as float32 */
static inline __attribute__((always_inline)) __m256 load8(const void *x, int dtype, int64_t i) {
    if (dtype == 0)
        return _mm256_castsi256_ps(
            _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)x + i))), 16));
    if (dtype == 1) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)x + i)));
    return _mm256_loadu_ps((const float *)x + i);
}
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
static inline float hmin8(__m256 v) {
    __m128 s = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_min_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_min_ss(s, _mm_movehdup_ps(s)));
}
static inline float hmax8(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
/* bfloat16 bits of 8 floats (in the low half of each 32-bit lane), rounded to nearest even as torch does for finite
 * values; NaN → 0x7FC0 (a quiet NaN; torch's own bits for NaN differ by path) */
static inline __m256i bf16_bits8(__m256 v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i rounded = _mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF)));
    const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
    return _mm256_srli_epi32(_mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(rounded),
                                                                  _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC00000)),
                                                                  nan)), 16);
}
#else
#define VECTOR 0
#endif

static inline __attribute__((always_inline)) float load1(const void *x, int dtype, int64_t i) {
    return dtype == 0 ? load_bf16(x, i) : dtype == 1 ? load_f16(x, i) : load_f32(x, i);
}

/* Rows [row0, row1) of a weight: (min, max) per group. */
static inline __attribute__((always_inline)) int minmax_rows(const void *restrict x, int dtype, int64_t row0,
                                                             int64_t row1, int64_t cols, int64_t group,
                                                             float *restrict lo_out, float *restrict hi_out) {
    const int64_t groups = groups_of(cols, group);
    float nonfinite = 0.0f;
    for (int64_t r = row0; r < row1; r++) {
        const int64_t base = r * cols;
        for (int64_t g = 0; g < groups; g++) {
            const int64_t a = g * group, b = a + group < cols ? a + group : cols;
            float l = INFINITY, h = -INFINITY, nf = 0.0f;
            int64_t c = a;
#if VECTOR
            __m256 vl = _mm256_set1_ps(INFINITY), vh = _mm256_set1_ps(-INFINITY), vn = _mm256_setzero_ps();
            const __m256 zero = _mm256_setzero_ps();
            for (; c + VECTOR <= b; c += VECTOR) {
                const __m256 v = load8(x, dtype, base + c);
                vl = _mm256_min_ps(vl, v);
                vh = _mm256_max_ps(vh, v);
                vn = _mm256_add_ps(vn, _mm256_mul_ps(v, zero)); /* NaN for NaN or Inf, 0 otherwise */
            }
            l = hmin8(vl);
            h = hmax8(vh);
            nf = hsum8(vn);
#endif
            for (; c < b; c++) {
                const float v = load1(x, dtype, base + c);
                l = v < l ? v : l;
                h = v > h ? v : h;
                nf += v * 0.0f;
            }
            nonfinite += nf;
            lo_out[r * groups + g] = l;
            hi_out[r * groups + g] = h;
        }
    }
    return !(nonfinite == 0.0f);
}

/* codes = clamp(rint(x / s) + z) (integer zero point) or clamp(rint(x / s + z)) (float zero point), as bytes (an int8
 * code's two's-complement byte); error = Σ (s·(q − z − x/s))², the eager path's expression; energy = Σ x². */
static inline __attribute__((always_inline)) int codes_rows(const void *restrict x, int dtype, int64_t row0,
                                                            int64_t row1, int64_t cols, int64_t group,
                                                            const float *restrict scale, const float *restrict zero,
                                                            int float_zero, float qmin, float qmax,
                                                            uint8_t *restrict codes, double *error_out,
                                                            double *energy_out) {
    const int64_t groups = groups_of(cols, group);
    double error = 0.0, energy = 0.0;
    float nonfinite = 0.0f;
    for (int64_t r = row0; r < row1; r++) {
        const int64_t base = r * cols;
        for (int64_t g = 0; g < groups; g++) {
            const int64_t a = g * group, b = a + group < cols ? a + group : cols;
            const float s = scale[r * groups + g];
            const float z = zero ? zero[r * groups + g] : 0.0f;
            const float zi = float_zero ? 0.0f : z, zf = float_zero ? z : 0.0f;
            float e = 0.0f, en = 0.0f, nf = 0.0f;
            int64_t c = a;
#if VECTOR
            const __m256 vs = _mm256_set1_ps(s), vz = _mm256_set1_ps(z), vzi = _mm256_set1_ps(zi),
                         vzf = _mm256_set1_ps(zf), lo = _mm256_set1_ps(qmin), hi = _mm256_set1_ps(qmax),
                         zeros = _mm256_setzero_ps();
            const __m128i low_bytes = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, -1, -1, -1, -1, -1, -1, -1, -1);
            __m256 ve = zeros, ven = zeros, vn = zeros;
            for (; c + VECTOR <= b; c += VECTOR) {
                const __m256 v = load8(x, dtype, base + c);
                const __m256 y = _mm256_div_ps(v, vs);
                __m256 q = _mm256_add_ps(
                    _mm256_round_ps(_mm256_add_ps(y, vzf), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), vzi);
                q = _mm256_min_ps(_mm256_max_ps(q, lo), hi);
                const __m256i qi = _mm256_cvttps_epi32(q); /* exact: q is a small integer (truncation, as torch converts) */
                const __m128i words = _mm_packs_epi32(_mm256_castsi256_si128(qi), _mm256_extracti128_si256(qi, 1));
                _mm_storel_epi64((__m128i *)(codes + base + c), _mm_shuffle_epi8(words, low_bytes));
                const __m256 d = _mm256_sub_ps(_mm256_sub_ps(q, vz), y);
                ve = _mm256_add_ps(ve, _mm256_mul_ps(d, d));
                ven = _mm256_add_ps(ven, _mm256_mul_ps(v, v));
                vn = _mm256_add_ps(vn, _mm256_mul_ps(v, zeros));
            }
            e = hsum8(ve);
            en = hsum8(ven);
            nf = hsum8(vn);
#endif
            for (; c < b; c++) {
                const float v = load1(x, dtype, base + c);
                const float y = v / s;
                float q = rintf(y + zf) + zi;
                q = q < qmin ? qmin : q;
                q = q > qmax ? qmax : q;
                codes[base + c] = q == q ? (uint8_t)(int32_t)q : 0; /* NaN only with a non-finite x: refused */
                const float d = (q - z) - y;
                e += d * d;
                en += v * v;
                nf += v * 0.0f;
            }
            energy += en;
            nonfinite += nf;
            error += (double)e * (double)s * (double)s;
        }
    }
    *error_out = error;
    *energy_out = energy;
    return !(nonfinite == 0.0f);
}

#define DEFINE_WORKERS(SUFFIX, DTYPE)                                                                                \
    static void *minmax_##SUFFIX(void *arg) {                                                                       \
        job *j = (job *)arg;                                                                                        \
        j->bad = minmax_rows(j->x, DTYPE, j->row0, j->row1, j->cols, j->group, j->lo, j->hi);                        \
        return NULL;                                                                                                \
    }                                                                                                               \
    static void *codes_##SUFFIX(void *arg) {                                                                        \
        job *j = (job *)arg;                                                                                        \
        j->bad = codes_rows(j->x, DTYPE, j->row0, j->row1, j->cols, j->group, j->scale, j->zero, j->float_zero,      \
                            j->qmin, j->qmax, j->codes, &j->error, &j->energy);                                     \
        return NULL;                                                                                                \
    }

DEFINE_WORKERS(bf16, 0)
DEFINE_WORKERS(f16, 1)
DEFINE_WORKERS(f32, 2)

/* Rows of codes packed low bits first: stored value (code − qmin) & mask, 8 / bits per byte, the last byte of a row
 * zero-padded — quant/packing.py's layout. */
static void *pack_worker(void *arg) {
    job *j = (job *)arg;
    const int64_t n = j->cols, width = (n * j->bits + 7) / 8;
    const int bits = j->bits, per = 8 / bits;
    const uint8_t mask = (uint8_t)((1u << bits) - 1u), qmin = (uint8_t)(int8_t)j->qmin;
    for (int64_t r = j->row0; r < j->row1; r++) {
        const uint8_t *restrict c = j->in + r * n;
        uint8_t *restrict o = j->packed + r * width;
        if (bits == 8) { /* one code per byte: the offset alone (the compiler vectorises it) */
            for (int64_t k = 0; k < n; k++) o[k] = (uint8_t)(c[k] - qmin);
            continue;
        }
        if (bits == 4) {
            int64_t k = 0;
#if VECTOR
            /* 32 codes → 16 bytes: (c0 − qmin) + 16·(c1 − qmin) per pair, one multiply-add of bytes into words */
            const __m256i offset = _mm256_set1_epi8((char)qmin), low = _mm256_set1_epi8(0x0F),
                          weights = _mm256_set1_epi16(0x1001); /* bytes 1, 16 */
            for (; 2 * k + 32 <= n; k += 16) {
                __m256i v = _mm256_and_si256(_mm256_sub_epi8(_mm256_loadu_si256((const __m256i *)(c + 2 * k)), offset), low);
                __m256i words = _mm256_maddubs_epi16(v, weights);
                __m128i bytes = _mm_packus_epi16(_mm256_castsi256_si128(words), _mm256_extracti128_si256(words, 1));
                _mm_storeu_si128((__m128i *)(o + k), bytes);
            }
#endif
            for (; 2 * k + 1 < n; k++)
                o[k] = (uint8_t)(((uint8_t)(c[2 * k] - qmin) & 0x0F) | (((uint8_t)(c[2 * k + 1] - qmin) & 0x0F) << 4));
            if (n % 2) o[k] = (uint8_t)(c[n - 1] - qmin) & 0x0F;
            continue;
        }
        for (int64_t b = 0; b < width; b++) {
            uint8_t v = 0;
            for (int i = 0; i < per; i++) {
                const int64_t at = b * per + i;
                if (at < n) v |= (uint8_t)(((uint8_t)(c[at] - qmin) & mask) << (bits * i));
            }
            o[b] = v;
        }
    }
    return NULL;
}

/* bfloat16 bits of a float, rounded to nearest even — what torch's float → bfloat16 conversion gives for finite values
 * (NaN → 0x7FC0, a quiet NaN; torch's bits for NaN differ by path). */
static inline uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    const uint32_t rounded = u + 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)((f != f ? 0x7FC00000u : rounded) >> 16); /* a select, not a branch: the loop vectorises */
}

/* Rows of int4 codes (packed low nibble first, stored value q in 0..15) dequantized as (q − 8)·scale + zero, the
 * int4 kernel's rule, into float32 or bfloat16 rows of `cols` values. (scale, zero) are bfloat16 pairs in the kernel's
 * layout (groups, sz_rows, 2), per group of `group` columns; row r of this call is row sz_row0 + r there. (q − 8)·scale
 * is exact in float32 (a 4-bit integer times a bfloat16) unless it overflows, so the one rounding is the add's, with
 * or without a fused multiply-add: for finite products the values are bit-identical to the eager path's float32
 * addcmul (and its bfloat16 conversion). Each group's 16 possible values are computed once; the codes then look them
 * up (with AVX2, 16 bytes of codes at a time: byte shuffles for bfloat16, lane permutes for float32). */
static void *dequant_int4_worker(void *arg) {
    job *j = (job *)arg;
    const int64_t cols = j->cols, width = (cols + 1) / 2, group = j->group, groups = groups_of(cols, group);
    for (int64_t r = j->row0; r < j->row1; r++) {
        const uint8_t *restrict p = j->in + r * width;
        for (int64_t g = 0; g < groups; g++) {
            const int64_t a = g * group, n = a + group < cols ? group : cols - a;
            const uint16_t *pair = j->sz + (g * j->sz_rows + j->sz_row0 + r) * 2;
            const float s = load_bf16(pair, 0), z = load_bf16(pair, 1);
            float table[16];
            uint16_t table_bf16[16];
#if VECTOR
            /* the 16 values as two float vectors, and (for bfloat16) their low and high bytes as two shuffle tables */
            const __m256 vs = _mm256_set1_ps(s), vz = _mm256_set1_ps(z);
            const __m256 t0 = _mm256_add_ps(_mm256_mul_ps(_mm256_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1), vs), vz),
                         t1 = _mm256_add_ps(_mm256_mul_ps(_mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), vs), vz);
            __m128i tlo = _mm_setzero_si128(), thi = _mm_setzero_si128();
            _mm256_storeu_ps(table, t0);
            _mm256_storeu_ps(table + 8, t1);
            if (j->out_bf16) {
                const __m256i r0 = bf16_bits8(t0), r1 = bf16_bits8(t1); /* 32-bit lanes holding bfloat16 bits */
                const __m256i words = _mm256_permute4x64_epi64(_mm256_packus_epi32(r0, r1), 0xD8); /* entries 0..15 */
                const __m256i split = _mm256_shuffle_epi8(words, _mm256_setr_epi8( /* low bytes, then high */
                    0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                    0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15));
                const __m128i first = _mm256_castsi256_si128(split), second = _mm256_extracti128_si256(split, 1);
                tlo = _mm_unpacklo_epi64(first, second);
                thi = _mm_unpackhi_epi64(first, second);
                _mm_storeu_si128((__m128i *)table_bf16, _mm_unpacklo_epi8(tlo, thi));
                _mm_storeu_si128((__m128i *)(table_bf16 + 8), _mm_unpackhi_epi8(tlo, thi));
            }
#else
            for (int k = 0; k < 16; k++) {
                table[k] = (float)(k - 8) * s + z;
                table_bf16[k] = to_bf16(table[k]);
            }
#endif
            const uint8_t *restrict codes = p + a / 2;
            int64_t k = 0; /* codes done */
            if (j->out_bf16) {
                uint16_t *restrict o = (uint16_t *)j->out + r * cols + a;
#if VECTOR
                const __m128i mask = _mm_set1_epi8(0x0F);
                for (; k + 32 <= n; k += 32) {
                    const __m128i b = _mm_loadu_si128((const __m128i *)(codes + k / 2));
                    const __m128i lo = _mm_and_si128(b, mask), hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
                    const __m128i first = _mm_unpacklo_epi8(lo, hi), second = _mm_unpackhi_epi8(lo, hi);
                    __m128i l = _mm_shuffle_epi8(tlo, first), h = _mm_shuffle_epi8(thi, first);
                    _mm_storeu_si128((__m128i *)(o + k), _mm_unpacklo_epi8(l, h));
                    _mm_storeu_si128((__m128i *)(o + k + 8), _mm_unpackhi_epi8(l, h));
                    l = _mm_shuffle_epi8(tlo, second);
                    h = _mm_shuffle_epi8(thi, second);
                    _mm_storeu_si128((__m128i *)(o + k + 16), _mm_unpacklo_epi8(l, h));
                    _mm_storeu_si128((__m128i *)(o + k + 24), _mm_unpackhi_epi8(l, h));
                }
#endif
                for (; k < n; k++) o[k] = table_bf16[(codes[k / 2] >> (4 * (k % 2))) & 15];
            } else {
                float *restrict o = (float *)j->out + r * cols + a;
#if VECTOR
                const __m128i mask = _mm_set1_epi8(0x0F);
                const __m256i seven = _mm256_set1_epi32(7);
                for (; k + 32 <= n; k += 32) {
                    const __m128i b = _mm_loadu_si128((const __m128i *)(codes + k / 2));
                    const __m128i lo = _mm_and_si128(b, mask), hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
                    const __m128i halves[2] = {_mm_unpacklo_epi8(lo, hi), _mm_unpackhi_epi8(lo, hi)};
                    for (int half = 0; half < 2; half++) {
                        for (int eighth = 0; eighth < 2; eighth++) {
                            const __m256i idx = _mm256_cvtepu8_epi32(
                                eighth ? _mm_srli_si128(halves[half], 8) : halves[half]);
                            const __m256 v = _mm256_blendv_ps(_mm256_permutevar8x32_ps(t0, idx),
                                                              _mm256_permutevar8x32_ps(t1, idx),
                                                              _mm256_castsi256_ps(_mm256_cmpgt_epi32(idx, seven)));
                            _mm256_storeu_ps(o + k + 16 * half + 8 * eighth, v);
                        }
                    }
                }
#endif
                for (; k < n; k++) o[k] = table[(codes[k / 2] >> (4 * (k % 2))) & 15];
            }
        }
    }
    return NULL;
}

typedef void *(*worker)(void *);

#define MAX_THREADS 64

/* Split rows across threads (the calling thread takes the first share), run `fn` on each share, gather. */
static int run_split(worker fn, job *proto, int threads, double *sums) {
    job jobs[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > proto->rows) threads = (int)(proto->rows > 0 ? proto->rows : 1);
    for (int t = 0; t < threads; t++) {
        jobs[t] = *proto;
        jobs[t].row0 = proto->rows * t / threads;
        jobs[t].row1 = proto->rows * (t + 1) / threads;
    }
    for (int t = 1; t < threads; t++) started[t] = pthread_create(&ids[t], NULL, fn, &jobs[t]) == 0;
    fn(&jobs[0]);
    int bad = jobs[0].bad;
    double error = jobs[0].error, energy = jobs[0].energy;
    for (int t = 1; t < threads; t++) {
        if (started[t])
            pthread_join(ids[t], NULL);
        else
            fn(&jobs[t]); /* no thread to be had: do its share here */
        bad |= jobs[t].bad;
        error += jobs[t].error;
        energy += jobs[t].energy;
    }
    if (sums) {
        sums[0] = error;
        sums[1] = energy;
    }
    return bad;
}

static worker pick(int dtype, worker bf16, worker f16, worker f32) {
    return dtype == 0 ? bf16 : dtype == 1 ? f16 : dtype == 2 ? f32 : NULL;
}

/* dtype: 0 bfloat16, 1 float16, 2 float32. Returns 0, 1 (NaN or Inf seen), or 2 (unknown dtype). */
int hfq_min_max(const void *x, int dtype, int64_t rows, int64_t cols, int64_t group, float *lo, float *hi, int threads) {
    worker fn = pick(dtype, minmax_bf16, minmax_f16, minmax_f32);
    if (!fn) return 2;
    job proto = {.x = x, .rows = rows, .cols = cols, .group = group, .lo = lo, .hi = hi};
    return run_split(fn, &proto, threads, NULL);
}

/* zero may be NULL (zero point 0). sums[0] = squared error of the dequantized codes, sums[1] = Σ x². */
int hfq_codes(const void *x, int dtype, int64_t rows, int64_t cols, int64_t group, const float *scale, const float *zero,
              int float_zero, float qmin, float qmax, uint8_t *codes, double *sums, int threads) {
    worker fn = pick(dtype, codes_bf16, codes_f16, codes_f32);
    if (!fn) return 2;
    job proto = {.x = x, .rows = rows, .cols = cols, .group = group, .scale = scale, .zero = zero,
                 .float_zero = float_zero, .qmin = qmin, .qmax = qmax, .codes = codes};
    return run_split(fn, &proto, threads, sums);
}

/* codes: (rows, cols) bytes (int8 codes as their two's-complement bytes); packed: (rows, ceil(cols·bits/8)). bits 2, 4
 * or 8. Returns 0, or 2 for a bit width this layout does not pack. */
int hfq_pack(const uint8_t *codes, int64_t rows, int64_t cols, int bits, int qmin, uint8_t *packed, int threads) {
    if (bits != 2 && bits != 4 && bits != 8) return 2;
    job proto = {.in = codes, .rows = rows, .cols = cols, .bits = bits, .qmin = (float)qmin, .packed = packed};
    return run_split(pack_worker, &proto, threads, NULL);
}

/* packed: (rows, ceil(cols / 2)) int4 codes; sz: the int4 kernel's (groups, sz_rows, 2) bfloat16 (scale, zero) pairs,
 * this call's rows starting at row sz_row0; out: (rows, cols) float32 (out_bf16 = 0) or bfloat16 (1). Returns 0, or 2
 * for a group under 2 columns, an odd group that is not the whole row (each group must start on a whole byte), or
 * rows outside the pairs. */
int hfq_dequant_int4(const uint8_t *packed, int64_t rows, int64_t cols, int64_t group, const uint16_t *sz,
                     int64_t sz_rows, int64_t sz_row0, int out_bf16, void *out, int threads) {
    if (group < 2 || (group % 2 && group < cols)) return 2;
    if (rows < 0 || cols < 1 || sz_row0 < 0 || sz_row0 + rows > sz_rows) return 2; /* rows past the pairs' end */
    job proto = {.in = packed, .rows = rows, .cols = cols, .group = group, .sz = sz, .sz_rows = sz_rows,
                 .sz_row0 = sz_row0, .out_bf16 = out_bf16, .out = out};
    return run_split(dequant_int4_worker, &proto, threads, NULL);
}
