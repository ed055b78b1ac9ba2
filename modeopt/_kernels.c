/* Fused CPU kernels of the mode-space step (modeopt/kernels.py builds and loads this file).
 *
 *   reduce:  acc[lab[i]] += (double) a[i] * (double) g[i]     over a range of elements
 *   update:  w[i] += a[i] * delta[lab[i]]                      (float32 weights)
 *
 * One pass over each operand, no temporaries. The reduction accumulates in double into
 * UNROLL interleaved banks (element i goes to bank i % UNROLL) so that consecutive elements of the
 * same mode do not wait on each other's additions; the banks are then added in a fixed order,
 * so the result depends only on the data and the range, never on threads or timing.
 *
 * Coefficients are float32 or bfloat16 (stored as uint16: the high half of a float32); labels
 * are uint8, uint16 or int32.
 */
#include <stdint.h>
#include <string.h>

#define UNROLL 4

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = ((uint32_t) h) << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
static inline float f32_to_f32(float x) { return x; }

#define DEFINE_KERNELS(ANAME, ATYPE, ACONV, LNAME, LTYPE)                                          \
    void reduce_##ANAME##_##LNAME(const float *g, const ATYPE *a, const LTYPE *lab, int64_t n,     \
                                  double *acc /* UNROLL * m, zeroed by the caller */, int64_t m) {  \
        int64_t i = 0;                                                                             \
        for (; i + UNROLL <= n; i += UNROLL) {                                                     \
            for (int k = 0; k < UNROLL; ++k)                                                       \
                acc[k * m + lab[i + k]] += (double) ACONV(a[i + k]) * (double) g[i + k];           \
        }                                                                                          \
        for (; i < n; ++i) acc[lab[i]] += (double) ACONV(a[i]) * (double) g[i];                    \
    }                                                                                              \
    void update_##ANAME##_##LNAME(float *w, const ATYPE *a, const LTYPE *lab, const float *delta,  \
                                  int64_t n) {                                                     \
        for (int64_t i = 0; i < n; ++i) w[i] += ACONV(a[i]) * delta[lab[i]];                       \
    }

DEFINE_KERNELS(f32, float, f32_to_f32, u8, uint8_t)
DEFINE_KERNELS(f32, float, f32_to_f32, u16, uint16_t)
DEFINE_KERNELS(f32, float, f32_to_f32, i32, int32_t)
DEFINE_KERNELS(bf16, uint16_t, bf16_to_f32, u8, uint8_t)
DEFINE_KERNELS(bf16, uint16_t, bf16_to_f32, u16, uint16_t)
DEFINE_KERNELS(bf16, uint16_t, bf16_to_f32, i32, int32_t)

/* Sum the UNROLL banks into out[m] in bank order. */
void fold_banks(const double *acc, int64_t m, double *out) {
    for (int64_t j = 0; j < m; ++j) {
        double s = 0.0;
        for (int k = 0; k < UNROLL; ++k) s += acc[k * m + j];
        out[j] += s;
    }
}
