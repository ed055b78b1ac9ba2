/* Fused CPU kernels of the mode-space step (modeopt/modespace/kernels/c_library.py builds and loads this file).
 *
 *   reduce:  acc[bank][lab[i]] += (double)(a[i] * g[i])        over a range of elements
 *            (g float32, bfloat16 or float16, converted exactly to float32 before the product)
 *   update:  w[i] += a[i] * delta[lab[i]]                       (float32 weights, in place)
 *
 * Both are memory-light passes whose cost on CPU is set by loads per element, not bandwidth:
 * the reduction forms a*g in vectorised blocks of BLK elements held in L1, reads uint8 labels
 * eight at a time with one 64-bit load, and scatters into UNROLL banks (element j of a group of
 * UNROLL goes to bank j) so that consecutive elements of one mode do not wait on each other.
 * The caller folds the banks in a fixed order (fold_banks): results depend only on the data and
 * the range, never on threads or timing. Each product is rounded once to float32, and the sums
 * are accumulated in double.
 *
 * Coefficients are float32, bfloat16 (stored as uint16: the high half of a float32) or int8 codes
 * (the 8-bit encoding: the caller multiplies the sums by the per-mode scales, fold_banks_scaled, and
 * scales delta before update); labels are uint8, uint16, int32, or 4-bit packed two per byte ("u4":
 * element i in the low nibble of byte i/2 when i is even, the high nibble when odd; ranges start at
 * even elements).
 *
 *   form:    out[i] = half(float(w[i]) + a[i] * delta[lab[i]])  (bf16/fp16 weights, out of place)
 *
 * form is the forward of a half-precision weight kept as its frozen switch-time value: the sum is
 * formed in float32 (product rounded, then the add: no FMA, -ffp-contract=off) and rounded once
 * to the weight's dtype, to nearest even exactly as torch's .to() does (the conversions below are
 * c10's, bit for bit, including infinities and subnormals; a NaN stays a NaN).
 */
#include <stdint.h>
#include <string.h>
#include <math.h>

#define UNROLL 8
#define BLK 256

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = ((uint32_t) h) << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
static inline float f32_to_f32(float x) { return x; }
static inline float i8_to_f32(int8_t x) { return (float) x; }

/* Label i of a range, and the label pointer at element i (i even for packed labels). */
#define LGET_u8(L, i) ((uint32_t) (L)[i])
#define LGET_u16(L, i) ((uint32_t) (L)[i])
#define LGET_i32(L, i) ((uint32_t) (L)[i])
#define LGET_u4(L, i) ((uint32_t) (((L)[(i) >> 1] >> (((i) & 1) << 2)) & 15))
#define LOFF_u8(L, i) ((L) + (i))
#define LOFF_u16(L, i) ((L) + (i))
#define LOFF_i32(L, i) ((L) + (i))
#define LOFF_u4(L, i) ((L) + ((i) >> 1))

static inline uint32_t f32_bits(float f) { uint32_t u; memcpy(&u, &f, sizeof u); return u; }
static inline float bits_f32(uint32_t u) { float f; memcpy(&f, &u, sizeof f); return f; }

/* float32 -> bfloat16, round to nearest even; NaN -> 0x7FC0 (c10::round_to_nearest_even). */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u = f32_bits(f);
    if (f != f) return 0x7FC0;
    return (uint16_t) ((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* fp16 <-> float32 as c10::detail::fp16_ieee_{to,from}_fp32_value (exact, RNE, subnormals). */
static inline float f16_to_f32(uint16_t h) {
    const uint32_t w = (uint32_t) h << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    const float normalized = bits_f32((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const float denormalized = bits_f32((two_w >> 17) | (126u << 23)) - 0.5f;
    const uint32_t result = sign | (two_w < (1u << 27) ? f32_bits(denormalized) : f32_bits(normalized));
    return bits_f32(result);
}
static inline uint16_t f32_to_f16(float f) {
    float base = (fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
    const uint32_t w = f32_bits(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    base = bits_f32((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = f32_bits(base);
    const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
    const uint32_t mantissa_bits = bits & 0x00000FFFu;
    const uint32_t nonsign = exp_bits + mantissa_bits;
    return (uint16_t) ((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

/* Scatter v[0..len) into the banks, labels read one by one (wide label types). */
#define SCATTER_GENERIC(LNAME, LTYPE)                                                              \
    static inline void scatter_##LNAME(const float *v, const LTYPE *L, int64_t len, double *acc,   \
                                       int64_t m) {                                                \
        int64_t j = 0;                                                                             \
        for (; j + UNROLL <= len; j += UNROLL)                                                     \
            for (int k = 0; k < UNROLL; ++k) acc[k * m + (uint32_t) L[j + k]] += v[j + k];          \
        for (; j < len; ++j) acc[(uint32_t) L[j]] += v[j];                                         \
    }
SCATTER_GENERIC(u16, uint16_t)
SCATTER_GENERIC(i32, int32_t)

/* uint8 labels: one 64-bit load gives eight of them. */
static inline void scatter_u8(const float *v, const uint8_t *L, int64_t len, double *acc, int64_t m) {
    int64_t j = 0;
    for (; j + 8 <= len; j += 8) {
        uint64_t w8;
        memcpy(&w8, L + j, 8);
        acc[0 * m + (w8 & 255)] += v[j];
        acc[1 * m + ((w8 >> 8) & 255)] += v[j + 1];
        acc[2 * m + ((w8 >> 16) & 255)] += v[j + 2];
        acc[3 * m + ((w8 >> 24) & 255)] += v[j + 3];
        acc[4 * m + ((w8 >> 32) & 255)] += v[j + 4];
        acc[5 * m + ((w8 >> 40) & 255)] += v[j + 5];
        acc[6 * m + ((w8 >> 48) & 255)] += v[j + 6];
        acc[7 * m + (w8 >> 56)] += v[j + 7];
    }
    for (; j < len; ++j) acc[L[j]] += v[j];
}

/* Packed 4-bit labels: one 64-bit load gives sixteen; element j goes to bank j % UNROLL. */
static inline void scatter_u4(const float *v, const uint8_t *L, int64_t len, double *acc, int64_t m) {
    int64_t j = 0;
    for (; j + 16 <= len; j += 16) {
        uint64_t w16;
        memcpy(&w16, L + (j >> 1), 8);
        for (int k = 0; k < 16; ++k) acc[(k & (UNROLL - 1)) * m + ((w16 >> (4 * k)) & 15)] += v[j + k];
    }
    for (; j < len; ++j) acc[LGET_u4(L, j)] += v[j];
}

/* The reduction NAME over gradients of GTYPE, read as float32 by GCONV (exact for every gradient
 * dtype: float32 itself, bfloat16 or float16), so that each product a[i] * g[i] is the float32
 * product of torch's g.float() * a.float(), and the scatter (banks, order) is the same whatever
 * the gradient dtype: a half gradient reduces bit for bit as its float32 conversion. */
#define DEFINE_REDUCE_G(NAME, GTYPE, GCONV, ATYPE, ACONV, LNAME, LTYPE)                           \
    void NAME(const GTYPE *restrict g, const ATYPE *restrict a, const LTYPE *restrict lab,         \
              int64_t n, double *restrict acc /* UNROLL * m, zeroed */, int64_t m) {               \
        float v[BLK] __attribute__((aligned(64)));                                                 \
        for (int64_t b0 = 0; b0 < n; b0 += BLK) {                                                  \
            int64_t len = n - b0 < BLK ? n - b0 : BLK;                                             \
            for (int64_t j = 0; j < len; ++j) v[j] = ACONV(a[b0 + j]) * GCONV(g[b0 + j]);          \
            scatter_##LNAME(v, LOFF_##LNAME(lab, b0), len, acc, m);                                \
        }                                                                                          \
    }
/* float32 gradients: reduce_<a>_<l>. */
#define DEFINE_REDUCE(ANAME, ATYPE, ACONV, LNAME, LTYPE)                                           \
    DEFINE_REDUCE_G(reduce_##ANAME##_##LNAME, float, f32_to_f32, ATYPE, ACONV, LNAME, LTYPE)

#define DEFINE_KERNELS(ANAME, ATYPE, ACONV, LNAME, LTYPE)                                          \
    DEFINE_REDUCE(ANAME, ATYPE, ACONV, LNAME, LTYPE)                                               \
    void update_##ANAME##_##LNAME(float *restrict w, const ATYPE *restrict a,                      \
                                  const LTYPE *restrict lab, const float *restrict delta,          \
                                  int64_t n) {                                                     \
        for (int64_t i = 0; i < n; ++i) w[i] += ACONV(a[i]) * delta[(uint32_t) lab[i]];             \
    }

/* Online CMD. welford: one sample of Welford/Chan moments, in place, one pass:
 *   dw = w[i] - mean[i];  mean[i] += dw * inv_n;  com[i] += dw * dr[lab[i]]
 * (dr: the references' deviation from their updated means). assign: w[i] = a[i] * r[lab[i]] + b[i]. */
#define DEFINE_ONLINE(LNAME, LTYPE)                                                                 \
    void welford_##LNAME(const float *restrict w, double *restrict mean, double *restrict com,      \
                         const LTYPE *restrict lab, const double *restrict dr, double inv_n,        \
                         int64_t n) {                                                              \
        for (int64_t i = 0; i < n; ++i) {                                                          \
            double dw = (double) w[i] - mean[i];                                                   \
            mean[i] += dw * inv_n;                                                                 \
            com[i] += dw * dr[(uint32_t) lab[i]];                                                   \
        }                                                                                          \
    }                                                                                              \
    void assign_##LNAME(float *restrict w, const float *restrict a, const float *restrict b,       \
                        const LTYPE *restrict lab, const float *restrict r, int64_t n) {           \
        for (int64_t i = 0; i < n; ++i) w[i] = a[i] * r[(uint32_t) lab[i]] + b[i];                  \
    }
DEFINE_ONLINE(u8, uint8_t)
DEFINE_ONLINE(u16, uint16_t)
DEFINE_ONLINE(i32, int32_t)

/* Packed labels: one byte gives the labels of two consecutive elements (n may be odd). */
#define DEFINE_UPDATE_U4(ANAME, ATYPE, ACONV)                                                      \
    void update_##ANAME##_u4(float *restrict w, const ATYPE *restrict a,                           \
                             const uint8_t *restrict lab, const float *restrict delta, int64_t n) { \
        int64_t i = 0;                                                                             \
        for (; i + 2 <= n; i += 2) {                                                               \
            uint32_t b = lab[i >> 1];                                                              \
            w[i] += ACONV(a[i]) * delta[b & 15];                                                   \
            w[i + 1] += ACONV(a[i + 1]) * delta[b >> 4];                                           \
        }                                                                                          \
        if (i < n) w[i] += ACONV(a[i]) * delta[lab[i >> 1] & 15];                                  \
    }

#define DEFINE_FOR_A(ANAME, ATYPE, ACONV)                                                          \
    DEFINE_KERNELS(ANAME, ATYPE, ACONV, u8, uint8_t)                                               \
    DEFINE_KERNELS(ANAME, ATYPE, ACONV, u16, uint16_t)                                             \
    DEFINE_KERNELS(ANAME, ATYPE, ACONV, i32, int32_t)                                              \
    DEFINE_REDUCE(ANAME, ATYPE, ACONV, u4, uint8_t)                                                \
    DEFINE_UPDATE_U4(ANAME, ATYPE, ACONV)
DEFINE_FOR_A(f32, float, f32_to_f32)
DEFINE_FOR_A(bf16, uint16_t, bf16_to_f32)
DEFINE_FOR_A(i8, int8_t, i8_to_f32)

/* Half-precision gradients (bf16/fp16 models), stored as uint16: reduce_<g>_<a>_<l>. */
#define DEFINE_REDUCE_HALF_A(GNAME, GCONV, ANAME, ATYPE, ACONV)                                    \
    DEFINE_REDUCE_G(reduce_##GNAME##_##ANAME##_u8, uint16_t, GCONV, ATYPE, ACONV, u8, uint8_t)     \
    DEFINE_REDUCE_G(reduce_##GNAME##_##ANAME##_u16, uint16_t, GCONV, ATYPE, ACONV, u16, uint16_t)  \
    DEFINE_REDUCE_G(reduce_##GNAME##_##ANAME##_i32, uint16_t, GCONV, ATYPE, ACONV, i32, int32_t)   \
    DEFINE_REDUCE_G(reduce_##GNAME##_##ANAME##_u4, uint16_t, GCONV, ATYPE, ACONV, u4, uint8_t)
#define DEFINE_REDUCE_HALF(GNAME, GCONV)                                                           \
    DEFINE_REDUCE_HALF_A(GNAME, GCONV, f32, float, f32_to_f32)                                     \
    DEFINE_REDUCE_HALF_A(GNAME, GCONV, bf16, uint16_t, bf16_to_f32)                                \
    DEFINE_REDUCE_HALF_A(GNAME, GCONV, i8, int8_t, i8_to_f32)
DEFINE_REDUCE_HALF(bf16, bf16_to_f32)
DEFINE_REDUCE_HALF(f16, f16_to_f32)

/* out[j] += sum over banks of acc[bank][j], banks in order. */
void fold_banks(const double *acc, int64_t m, double *out) {
    for (int64_t j = 0; j < m; ++j) {
        double s = 0.0;
        for (int k = 0; k < UNROLL; ++k) s += acc[k * m + j];
        out[j] += s;
    }
}

/* out[j] += scale[j] * (sum over banks of acc[bank][j], banks in order): the 8-bit encoding. */
void fold_banks_scaled(const double *acc, int64_t m, const double *scale, double *out) {
    for (int64_t j = 0; j < m; ++j) {
        double s = 0.0;
        for (int k = 0; k < UNROLL; ++k) s += acc[k * m + j];
        out[j] += scale[j] * s;
    }
}

/* out[i] = W(float(w[i]) + a[i] * delta[lab[i]]) for bf16/fp16 weights (stored as uint16). The
 * product is a separate statement, and the build passes -ffp-contract=off: never an FMA. */
#define DEFINE_FORM(WNAME, WTO, WFROM, ANAME, ATYPE, ACONV, LNAME, LTYPE)                          \
    void form_##WNAME##_##ANAME##_##LNAME(const uint16_t *restrict w, const ATYPE *restrict a,     \
                                          const LTYPE *restrict lab, uint16_t *restrict out,       \
                                          const float *restrict delta, int64_t n) {                \
        for (int64_t i = 0; i < n; ++i) {                                                          \
            const float p = ACONV(a[i]) * delta[LGET_##LNAME(lab, i)];                             \
            out[i] = WFROM(WTO(w[i]) + p);                                                         \
        }                                                                                          \
    }
#define DEFINE_FORM_A(WNAME, WTO, WFROM, ANAME, ATYPE, ACONV)                                      \
    DEFINE_FORM(WNAME, WTO, WFROM, ANAME, ATYPE, ACONV, u8, uint8_t)                               \
    DEFINE_FORM(WNAME, WTO, WFROM, ANAME, ATYPE, ACONV, u16, uint16_t)                             \
    DEFINE_FORM(WNAME, WTO, WFROM, ANAME, ATYPE, ACONV, i32, int32_t)                              \
    DEFINE_FORM(WNAME, WTO, WFROM, ANAME, ATYPE, ACONV, u4, uint8_t)
#define DEFINE_FORM_W(WNAME, WTO, WFROM)                                                           \
    DEFINE_FORM_A(WNAME, WTO, WFROM, f32, float, f32_to_f32)                                       \
    DEFINE_FORM_A(WNAME, WTO, WFROM, bf16, uint16_t, bf16_to_f32)                                  \
    DEFINE_FORM_A(WNAME, WTO, WFROM, i8, int8_t, i8_to_f32)
DEFINE_FORM_W(bf16, bf16_to_f32, f32_to_bf16)
DEFINE_FORM_W(f16, f16_to_f32, f32_to_f16)
