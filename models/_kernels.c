/* Compiled kernels of voxarc's predictor features (models/kernels.py loads them with ctypes).
 *
 * voxarc_features computes exactly what models.features.default_features and flat_contexts
 * compute in numpy, fused in one pass over cache-sized blocks of voxels, and leaves flat
 * contexts out of the network inputs it writes. Every value is an integer; the one division,
 * floor(d * 64 / s), is done as numpy does it (float32 d / (s / 64), correctly rounded, then
 * floored), so both paths agree bit for bit (tests/test_kernels.py checks it).
 * voxarc_features_runs reads the same neighbours from the sheared decoder's buffer (models.skew),
 * voxarc_mlp runs the exact integer network (models.intnet) on those inputs, and
 * voxarc_outputs turns the network's accumulators into predictions and table rows.
 *
 * Plain C without Python.h: setuptools builds it as the optional extension models._kernels.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <stdlib.h>

#define BLOCK 256          /* voxels per block: the block's K rows stay in L1/L2 */
#define KMAX 32           /* at most 32 neighbours (the shipped models have 19 or 26) */
#define CURRENT 9          /* neighbours 0..8: current slice (activity s) */
#define PREVIOUS_END 19    /* neighbours 9..18: earlier slices (activity of the previous) */
#define NB_W 0
#define NB_N 1
#define NB_NW 2
#define NB_P 9
#define NB_PP 18
#define INPUT_LOW -1024
#define INPUT_HIGH 1023
#define S_MAX (1 << 17)
#define ABI 19             /* models/kernels.py's ABI: raised whenever an entry point changes */

/* Which set of entry points and signatures this build has. */
int64_t voxarc_abi(void)
{
    return ABI;
}

/* malloc on a cache-line boundary (free() releases it): the vector kernels' loads and stores
 * then never straddle two lines. */
static void *aligned_block(size_t bytes)
{
    return aligned_alloc(64, (bytes + 63) / 64 * 64);
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define VECTOR_CLONES
#endif

/* LOCO-I reference of each voxel of a block from W, N, NW (previous slice's P, else 0, when W
 * and N are both outside), as models.features.reference. Masks instead of branches, so that
 * the loop vectorises. */
static inline __attribute__((always_inline)) void
block_reference(const int32_t *const *v, const uint8_t *const *ok, int64_t m, int32_t *ref)
{
    for (int64_t i = 0; i < m; i++) {
        int32_t mw = -(int32_t)ok[NB_W][i], mn = -(int32_t)ok[NB_N][i];
        int32_t mnw = -(int32_t)ok[NB_NW][i], mp = -(int32_t)ok[NB_P][i];
        int32_t vw = v[NB_W][i], vn = v[NB_N][i], vnw = v[NB_NW][i], vp = v[NB_P][i];
        int32_t w = (vw & mw) | (~mw & ((vn & mn) | (~mn & vp & mp)));
        int32_t n = (vn & mn) | (~mn & w);
        int32_t nw = (vnw & mnw) | (~mnw & n);
        int32_t lo = w < n ? w : n, hi = w < n ? n : w, c = w + n - nw;
        int32_t mid = hi < c ? hi : c;
        ref[i] = lo > mid ? lo : mid;
    }
}

/* Features of the m (<= BLOCK) voxels of one block, whose neighbour k has values v[k][i] and
 * validity ok[k][i]; ``a`` is the block's first voxel, ``kept`` how many voxels earlier blocks
 * kept. Returns how many of this block's voxels it kept (see voxarc_features). */
static inline __attribute__((always_inline)) int64_t
block_features(const int32_t *const *v, const uint8_t *const *ok, int64_t m, int K,
               int compact, const int16_t *log2q, float *x, int64_t xstride, int64_t a,
               int64_t kept, int64_t *ref_all, int64_t *busy, int64_t *s_out, int64_t *lq_out,
               int64_t *ref_busy)
{
    int32_t d[KMAX][BLOCK];
    int32_t ref[BLOCK], lp[BLOCK], sc[BLOCK], sp[BLOCK], any[BLOCK], cur[BLOCK], idx[BLOCK];
    float sf[BLOCK], xb[BLOCK];
    block_reference(v, ok, m, ref);
    for (int64_t i = 0; i < m; i++) {
        sc[i] = 0; sp[i] = 0; any[i] = 0; cur[i] = 1;
    }
    for (int k = 0; k < K; k++) {
        const int32_t *vk = v[k];
        const uint8_t *okk = ok[k];
        int32_t *dk = d[k];
        for (int64_t i = 0; i < m; i++) {
            int32_t e = (vk[i] - ref[i]) & -(int32_t)okk[i];
            dk[i] = e;
            any[i] |= e;
        }
        if (k < CURRENT) {
            for (int64_t i = 0; i < m; i++) {
                sc[i] += abs(dk[i]);
                cur[i] &= okk[i];
            }
        } else if (k < PREVIOUS_END) {
            for (int64_t i = 0; i < m; i++)
                sp[i] += abs(dk[i]);
        }
    }
    int64_t cnt = 0;
    for (int64_t i = 0; i < m; i++) {
        int32_t si = (sc[i] >> 1) + 1;
        si = si > S_MAX ? S_MAX : si;
        sf[i] = (float)si * 0.015625f;   /* s / 64, exact */
        lp[i] = log2q[(sp[i] >> 1) + 1];
        ref_all[a + i] = ref[i];
        if (!compact || any[i]) {
            busy[kept + cnt] = a + i;
            s_out[kept + cnt] = si;
            lq_out[kept + cnt] = log2q[si];
            ref_busy[kept + cnt] = ref[i];
            idx[cnt++] = (int32_t)i;
        }
    }
    int whole = cnt == m;
    for (int k = 0; k < K; k++) {
        float *xk = x + (int64_t)k * xstride + kept;
        float *dst = whole ? xk : xb;
        const int32_t *dk = d[k];
        for (int64_t i = 0; i < m; i++) {
            float q = (float)dk[i] / sf[i];
            int32_t t = (int32_t)q;          /* toward zero (|q| < 2**24) ... */
            t -= (float)t > q;               /* ... then down: floor */
            t = t < INPUT_LOW ? INPUT_LOW : (t > INPUT_HIGH ? INPUT_HIGH : t);
            dst[i] = (float)t;
        }
        if (!whole)
            for (int64_t c = 0; c < cnt; c++)
                xk[c] = xb[idx[c]];
    }
    float *xq = x + (int64_t)K * xstride + kept, *xp = xq + xstride, *xpp = xp + xstride;
    float *xedge = xpp + xstride, *xlp = xedge + xstride;
    for (int64_t c = 0; c < cnt; c++) {
        int64_t i = idx[c];
        xq[c] = (float)(lq_out[kept + c] * 8);
        xp[c] = ok[NB_P][i] ? 256.0f : 0.0f;
        xpp[c] = ok[NB_PP][i] ? 256.0f : 0.0f;
        xedge[c] = cur[i] ? 0.0f : 256.0f;
        xlp[c] = (float)(lp[i] * 8);
    }
    return cnt;
}

/* ---------------------------------------------------------------- the exact integer network */

#define MLP_VV 3           /* vectors per pass of the vector kernels */
#define MLP_VB 48          /* voxels per network block: three vectors of 16, or twice 8 */
#define MLP_OB 4           /* outputs per pass of the AVX2 kernel */
#define MLP_OB512 8        /* outputs per pass of the AVX-512 kernel */
#define MLP_WIDTH 256      /* widest layer the kernel takes */
#define MLP_ACT_MAX 1023.0f
#define MLP_RELU 2         /* ``hidden`` of the float layers for a plain ReLU (training) */

/* One layer on a block of MLP_VB voxels: in is feature-major (row f at in + f * ld), out is
 * (nout, MLP_VB); hidden layers give h = clip(floor(acc), 0, ACT_MAX) (their 2**-shift is in
 * w and b), or with hidden == MLP_RELU max(acc, 0) (the float twin, in training). Plain C:
 * the fallback for CPUs without AVX2 and FMA. */
static void mlp_layer_plain(const float *in, int64_t ld, int nin, const float *w,
                            const float *b, int nout, int hidden, float *out)
{
    for (int o = 0; o < nout; o++) {
        float *r = out + (int64_t)o * MLP_VB;
        for (int i = 0; i < MLP_VB; i++)
            r[i] = b[o];
        for (int f = 0; f < nin; f++)
            for (int i = 0; i < MLP_VB; i++)
                r[i] += w[(int64_t)o * nin + f] * in[(int64_t)f * ld + i];
        if (hidden == MLP_RELU)
            for (int i = 0; i < MLP_VB; i++)
                r[i] = r[i] < 0.0f ? 0.0f : r[i];
        else if (hidden)
            for (int i = 0; i < MLP_VB; i++) {
                float h = __builtin_floorf(r[i]);
                r[i] = h < 0.0f ? 0.0f : (h > MLP_ACT_MAX ? MLP_ACT_MAX : h);
            }
    }
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define MLP_VECTOR 1

/* mlp_layer_plain with AVX2 and FMA: four outputs by three vectors of eight voxels per pass
 * (the block in two halves), twelve independent accumulators (with the inputs and a broadcast
 * weight, the sixteen registers). An FMA rounds once, and every exact sum here is
 * representable, so the result is that of separate multiplies and adds. */
__attribute__((target("avx2,fma")))
static void mlp_layer_avx2(const float *in, int64_t ld, int nin, const float *w,
                           const float *b, int nout, int hidden, float *out)
{
    const __m256 zero = _mm256_setzero_ps(), top = _mm256_set1_ps(MLP_ACT_MAX);
    for (int half = 0; half < MLP_VB; half += 8 * MLP_VV)
    for (int o = 0; o < nout; o += MLP_OB) {
        const float *wr[MLP_OB];
        __m256 a[MLP_OB][MLP_VV];
        for (int k = 0; k < MLP_OB; k++) {
            int ok = o + k < nout ? o + k : nout - 1;    /* past the last output: a repeat */
            wr[k] = w + (int64_t)ok * nin;
            for (int v = 0; v < MLP_VV; v++)
                a[k][v] = _mm256_set1_ps(b[ok]);
        }
        for (int f = 0; f < nin; f++) {
            const float *row = in + (int64_t)f * ld + half;
            __m256 x[MLP_VV];
            for (int v = 0; v < MLP_VV; v++)
                x[v] = _mm256_loadu_ps(row + 8 * v);
            for (int k = 0; k < MLP_OB; k++) {
                __m256 u = _mm256_broadcast_ss(wr[k] + f);
                for (int v = 0; v < MLP_VV; v++)
                    a[k][v] = _mm256_fmadd_ps(u, x[v], a[k][v]);
            }
        }
        for (int k = 0; k < MLP_OB && o + k < nout; k++)
            for (int v = 0; v < MLP_VV; v++) {
                __m256 h = a[k][v];
                if (hidden == MLP_RELU)
                    h = _mm256_max_ps(h, zero);
                else if (hidden)
                    h = _mm256_min_ps(_mm256_max_ps(_mm256_floor_ps(h), zero), top);
                _mm256_storeu_ps(out + (int64_t)(o + k) * MLP_VB + half + 8 * v, h);
            }
    }
}

/* The same with AVX-512: eight outputs by three vectors of sixteen voxels per pass, 24
 * accumulators of the 32 registers; twice the voxels per instruction (Zen 4/5, Intel server
 * cores), the same exact sums. */
__attribute__((target("avx512f")))
static void mlp_layer_avx512(const float *in, int64_t ld, int nin, const float *w,
                             const float *b, int nout, int hidden, float *out)
{
    const __m512 zero = _mm512_setzero_ps(), top = _mm512_set1_ps(MLP_ACT_MAX);
    for (int o = 0; o < nout; o += MLP_OB512) {
        const float *wr[MLP_OB512];
        __m512 a[MLP_OB512][MLP_VV];
        for (int k = 0; k < MLP_OB512; k++) {
            int ok = o + k < nout ? o + k : nout - 1;
            wr[k] = w + (int64_t)ok * nin;
            for (int v = 0; v < MLP_VV; v++)
                a[k][v] = _mm512_set1_ps(b[ok]);
        }
        for (int f = 0; f < nin; f++) {
            const float *row = in + (int64_t)f * ld;
            __m512 x[MLP_VV];
            for (int v = 0; v < MLP_VV; v++)
                x[v] = _mm512_loadu_ps(row + 16 * v);
            for (int k = 0; k < MLP_OB512; k++) {
                __m512 u = _mm512_set1_ps(wr[k][f]);
                for (int v = 0; v < MLP_VV; v++)
                    a[k][v] = _mm512_fmadd_ps(u, x[v], a[k][v]);
            }
        }
        for (int k = 0; k < MLP_OB512 && o + k < nout; k++)
            for (int v = 0; v < MLP_VV; v++) {
                __m512 h = a[k][v];
                if (hidden == MLP_RELU)
                    h = _mm512_max_ps(h, zero);
                else if (hidden)
                    h = _mm512_min_ps(_mm512_max_ps(
                        _mm512_roundscale_ps(h, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC),
                        zero), top);
                _mm512_storeu_ps(out + (int64_t)(o + k) * MLP_VB + 16 * v, h);
            }
    }
}

/* The integer form of the layers for AVX-512 VNNI: VPDPWSSD multiplies pairs of int16 and adds
 * both products to an int32 lane, twice the products per instruction of an FMA. Activations
 * travel as pairs: row p of a pair buffer holds, for each voxel, input 2p in its low and 2p + 1
 * in its high half; a weight pair the same. Layer l's integer form q is its (nout, npairs)
 * weight pairs, then nout biases, then nout shifts (hidden rows: acc >> shift, which is the
 * float layers' floor(acc * 2**-shift)). Integer sums are exact by construction, so the
 * results equal the float layers' bit for bit (models/kernels.py builds q only where every
 * sum stays below 2**31). */
__attribute__((target("avx512f")))
static void mlp_pairs_avx512(const float *in, int64_t ld, int nin, int32_t *out)
{
    const __m512i low = _mm512_set1_epi32(0xFFFF);
    for (int p = 0; 2 * p < nin; p++)
        for (int v = 0; v < MLP_VV; v++) {
            __m512i lo = _mm512_cvtps_epi32(_mm512_loadu_ps(in + (int64_t)2 * p * ld + 16 * v));
            __m512i hi = 2 * p + 1 < nin
                ? _mm512_cvtps_epi32(_mm512_loadu_ps(in + (int64_t)(2 * p + 1) * ld + 16 * v))
                : _mm512_setzero_si512();
            _mm512_storeu_si512(out + (int64_t)p * MLP_VB + 16 * v,
                                _mm512_or_si512(_mm512_and_si512(lo, low),
                                                _mm512_slli_epi32(hi, 16)));
        }
}

__attribute__((target("avx512f,avx512vnni")))
static void mlp_layer_vnni(const int32_t *in, int nin, const int32_t *q, int nout, int hidden,
                           int32_t *pairs, float *out)
{
    const int np = (nin + 1) / 2;
    const int32_t *bias = q + (int64_t)nout * np, *shift = bias + nout;
    const __m512i zero = _mm512_setzero_si512(), top = _mm512_set1_epi32((int)MLP_ACT_MAX);
    for (int o = 0; o < nout; o += MLP_OB512) {
        const int32_t *wr[MLP_OB512];
        __m512i a[MLP_OB512][MLP_VV];
        for (int k = 0; k < MLP_OB512; k++) {
            int ok = o + k < nout ? o + k : nout - 1;
            wr[k] = q + (int64_t)ok * np;
            for (int v = 0; v < MLP_VV; v++)
                a[k][v] = _mm512_set1_epi32(bias[ok]);
        }
        for (int p = 0; p < np; p++) {
            const int32_t *row = in + (int64_t)p * MLP_VB;
            __m512i x[MLP_VV];
            for (int v = 0; v < MLP_VV; v++)
                x[v] = _mm512_loadu_si512(row + 16 * v);
            for (int k = 0; k < MLP_OB512; k++) {
                __m512i u = _mm512_set1_epi32(wr[k][p]);
                for (int v = 0; v < MLP_VV; v++)    /* GCC 12 copies the intrinsic's
                                                       accumulators around: asm keeps them */
                    __asm__("vpdpwssd %2, %1, %0" : "+v"(a[k][v]) : "v"(x[v]), "v"(u));
            }
        }
        if (!hidden) {
            for (int k = 0; k < MLP_OB512 && o + k < nout; k++)
                for (int v = 0; v < MLP_VV; v++)
                    _mm512_storeu_ps(out + (int64_t)(o + k) * MLP_VB + 16 * v,
                                     _mm512_cvtepi32_ps(a[k][v]));
            continue;
        }
        for (int k = 0; k < MLP_OB512 && o + k < nout; k += 2)    /* o is even */
            for (int v = 0; v < MLP_VV; v++) {
                __m512i h[2];
                for (int j = 0; j < 2; j++)
                    h[j] = o + k + j < nout
                        ? _mm512_min_epi32(_mm512_max_epi32(_mm512_srav_epi32(
                              a[k + j][v], _mm512_set1_epi32(shift[o + k + j])), zero), top)
                        : zero;
                _mm512_storeu_si512(pairs + (int64_t)(o + k) / 2 * MLP_VB + 16 * v,
                                    _mm512_or_si512(h[0], _mm512_slli_epi32(h[1], 16)));
            }
    }
}

/* The integer form on AVX2 alone (Zen 2/3, Intel before AVX-512): VPMADDWD multiplies the same
 * int16 pairs as VPDPWSSD, and an add puts both products into the int32 lane; sixteen products
 * in two instructions where an FMA does eight (on a Zen 3, 1.45x the products per second of
 * the FMA layers in a loop of registers). Three outputs by three vectors per pass, as many
 * accumulators as leave room for the inputs, the weight pair and the product. Hidden rows go
 * straight to the next layer's pair buffer (activations are 0..ACT_MAX, so a pair is
 * even | odd << 16); the same exact integer sums as the VNNI and float layers. */
#define MLP_OBI 3

__attribute__((target("avx2,fma")))
static void mlp_pairs_avx2(const float *in, int64_t ld, int nin, int32_t *out)
{
    const __m256i low = _mm256_set1_epi32(0xFFFF);
    for (int p = 0; 2 * p < nin; p++)
        for (int v = 0; v < MLP_VB / 8; v++) {
            __m256i lo = _mm256_cvtps_epi32(_mm256_loadu_ps(in + (int64_t)2 * p * ld + 8 * v));
            __m256i hi = 2 * p + 1 < nin
                ? _mm256_cvtps_epi32(_mm256_loadu_ps(in + (int64_t)(2 * p + 1) * ld + 8 * v))
                : _mm256_setzero_si256();
            _mm256_storeu_si256((__m256i *)(out + (int64_t)p * MLP_VB + 8 * v),
                                _mm256_or_si256(_mm256_and_si256(lo, low),
                                                _mm256_slli_epi32(hi, 16)));
        }
}

__attribute__((target("avx2,fma")))
static void mlp_layer_madd(const int32_t *in, int nin, const int32_t *q, int nout, int hidden,
                           int32_t *pairs, float *out)
{
    const int np = (nin + 1) / 2;
    const int32_t *bias = q + (int64_t)nout * np, *shift = bias + nout;
    const __m256i zero = _mm256_setzero_si256(), top = _mm256_set1_epi32((int)MLP_ACT_MAX);
    for (int half = 0; half < MLP_VB; half += 8 * MLP_VV)
    for (int o = 0; o < nout; o += MLP_OBI) {
        const int32_t *wr[MLP_OBI];
        __m256i a[MLP_OBI][MLP_VV];
        for (int k = 0; k < MLP_OBI; k++) {
            int ok = o + k < nout ? o + k : nout - 1;    /* past the last output: a repeat */
            wr[k] = q + (int64_t)ok * np;
            for (int v = 0; v < MLP_VV; v++)
                a[k][v] = _mm256_set1_epi32(bias[ok]);
        }
        for (int p = 0; p < np; p++) {
            const int32_t *row = in + (int64_t)p * MLP_VB + half;
            __m256i x[MLP_VV];
            for (int v = 0; v < MLP_VV; v++)
                x[v] = _mm256_loadu_si256((const __m256i *)(row + 8 * v));
            for (int k = 0; k < MLP_OBI; k++) {
                __m256i u = _mm256_set1_epi32(wr[k][p]);
                for (int v = 0; v < MLP_VV; v++)
                    a[k][v] = _mm256_add_epi32(a[k][v], _mm256_madd_epi16(x[v], u));
            }
        }
        for (int k = 0; k < MLP_OBI && o + k < nout; k++)
            for (int v = 0; v < MLP_VV; v++) {
                int oo = o + k;
                if (!hidden) {
                    _mm256_storeu_ps(out + (int64_t)oo * MLP_VB + half + 8 * v,
                                     _mm256_cvtepi32_ps(a[k][v]));
                    continue;
                }
                __m256i h = _mm256_min_epi32(_mm256_max_epi32(_mm256_srav_epi32(
                    a[k][v], _mm256_set1_epi32(shift[oo])), zero), top);
                __m256i *at = (__m256i *)(pairs + (int64_t)(oo / 2) * MLP_VB + half + 8 * v);
                if (oo % 2)    /* the even output of the pair was stored before */
                    h = _mm256_or_si256(_mm256_loadu_si256(at), _mm256_slli_epi32(h, 16));
                _mm256_storeu_si256(at, h);
            }
    }
}
#endif

/* The integer form in plain C (CPUs without AVX2, other architectures): the same pair layout
 * and the same exact int32 sums as the vector integer layers. Networks whose sums float32
 * cannot hold (10-bit weights, models/intnet.py) run on these where there are no others. */
static void mlp_pairs_plain(const float *in, int64_t ld, int nin, int32_t *out)
{
    for (int p = 0; 2 * p < nin; p++)
        for (int i = 0; i < MLP_VB; i++) {
            uint32_t lo = (uint32_t)(int32_t)in[(int64_t)2 * p * ld + i];
            uint32_t hi = 2 * p + 1 < nin ? (uint32_t)(int32_t)in[(int64_t)(2 * p + 1) * ld + i]
                                          : 0u;
            out[(int64_t)p * MLP_VB + i] = (int32_t)((lo & 0xFFFFu) | (hi << 16));
        }
}

static inline int32_t pair_low(int32_t v)
{
    return (int16_t)(uint16_t)((uint32_t)v & 0xFFFFu);
}

static inline int32_t pair_high(int32_t v)
{
    return (int16_t)(uint16_t)((uint32_t)v >> 16);
}

static void mlp_layer_int_plain(const int32_t *in, int nin, const int32_t *q, int nout,
                                int hidden, int32_t *pairs, float *out)
{
    const int np = (nin + 1) / 2;
    const int32_t *bias = q + (int64_t)nout * np, *shift = bias + nout;
    int32_t acc[MLP_VB];
    for (int o = 0; o < nout; o++) {
        const int32_t *wr = q + (int64_t)o * np;
        for (int i = 0; i < MLP_VB; i++)
            acc[i] = bias[o];
        for (int p = 0; p < np; p++) {
            const int32_t *row = in + (int64_t)p * MLP_VB;
            const int32_t wl = pair_low(wr[p]), wh = pair_high(wr[p]);
            for (int i = 0; i < MLP_VB; i++)
                acc[i] += pair_low(row[i]) * wl + pair_high(row[i]) * wh;
        }
        if (!hidden) {
            for (int i = 0; i < MLP_VB; i++)
                out[(int64_t)o * MLP_VB + i] = (float)acc[i];
            continue;
        }
        int32_t *at = pairs + (int64_t)(o / 2) * MLP_VB;
        for (int i = 0; i < MLP_VB; i++) {
            int32_t h = acc[i] >> shift[o];     /* arithmetic: floor, as the vector layers */
            h = h < 0 ? 0 : (h > (int32_t)MLP_ACT_MAX ? (int32_t)MLP_ACT_MAX : h);
            at[i] = o % 2 ? (int32_t)((uint32_t)at[i] | ((uint32_t)h << 16)) : h;
        }
    }
}

typedef void (*mlp_layer_fn)(const float *, int64_t, int, const float *, const float *, int,
                            int, float *);

/* The network on a growing set of input columns (input f of column c at x[f * ld + c * step];
 * step 1, feature-major, is read in place, any other step packed block by block): mlp_feed
 * evaluates every whole block of columns up to ``upto`` (and with ``last``, the rest,
 * zero-padded), writing the last
 * layer's accumulators to acc (column c at acc + c * size[layers]); a run that was never
 * opened (acc NULL: no network wanted) does nothing. */
typedef struct {
    int32_t layers;
    const int32_t *size;
    const float *const *w, *const *b;
    const int32_t *const *q;   /* the layers' integer form, or NULL: the float layers */
    int32_t vnni;              /* with q: the VNNI layers (1) or the AVX2 ones (0) */
    int32_t plain_int;         /* with q: the plain C integer layers instead */
    float *acc, *buf;
    int32_t *pairs;            /* three pair buffers (the integer layers), inside buf */
    mlp_layer_fn layer;
    int64_t done;
} mlp_run;

static int mlp_open(mlp_run *r, int32_t layers, const int32_t *size, const float *const *w,
                    const float *const *b, const int32_t *const *q, int32_t vector, float *acc)
{
    r->buf = NULL;
    r->pairs = NULL;
    for (int l = 0; l <= layers; l++)
        if (size[l] < 1 || size[l] > MLP_WIDTH)
            return -1;
    r->layers = layers;
    r->size = size;
    r->w = w;
    r->b = b;
    r->q = NULL;
    r->acc = acc;
    r->done = 0;
    r->layer = mlp_layer_plain;
    r->vnni = 0;
    r->plain_int = 0;
#ifdef MLP_VECTOR
    if (vector && vector != 5 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        r->layer = mlp_layer_avx2;
    if ((vector == 1 || vector == 3) && __builtin_cpu_supports("avx512f"))
        r->layer = mlp_layer_avx512;
    r->vnni = 0;
    if (vector == 1 && q != NULL && __builtin_cpu_supports("avx512f")
            && __builtin_cpu_supports("avx512vnni")) {
        r->q = q;
        r->vnni = 1;
    } else if (((vector == 1 && !__builtin_cpu_supports("avx512f")) || vector == 4)
               && q != NULL && __builtin_cpu_supports("avx2")) {
        r->q = q;    /* AVX-512 without VNNI keeps its float layers: as many products */
    }
#endif
    if (vector == 5 && q != NULL) {    /* the plain C integer layers, on any CPU */
        r->q = q;
        r->vnni = 0;
        r->plain_int = 1;
    }
    /* the float buffers, then (integer layers) the pair buffers, in one allocation */
    size_t floats = sizeof(float) * MLP_VB * MLP_WIDTH * 3;
    r->buf = aligned_block(floats + (r->q != NULL ? sizeof(int32_t) * MLP_VB * (MLP_WIDTH / 2) * 3
                                                 : 0));
    if (r->buf == NULL)
        return -1;
    if (r->q != NULL)
        r->pairs = (int32_t *)((char *)r->buf + floats);
    return 0;
}

static void mlp_close(mlp_run *r)
{
    free(r->buf);
}

/* Which layers mlp_open picks for ``vector`` on this CPU, with (integer nonzero) or without an
 * integer form: 0 plain C, 2 AVX2 and FMA, 3 AVX-512, 4 AVX-512 VNNI, 5 AVX2 integer, 6 plain
 * C integer. */
int64_t voxarc_layers(int32_t vector, int32_t integer)
{
    mlp_run r;
    int32_t size[2] = {2, 2};
    static const int32_t q[1] = {0};
    const int32_t *qs[1] = {q};
    if (mlp_open(&r, 1, size, NULL, NULL, integer ? qs : NULL, vector, NULL) < 0) {
        mlp_close(&r);
        return -1;
    }
    int64_t kind = r.q != NULL ? (r.plain_int ? 6 : r.vnni ? 4 : 5)
                               : r.layer == mlp_layer_plain ? 0 : 2;
#ifdef MLP_VECTOR
    if (r.q == NULL && r.layer == mlp_layer_avx512)
        kind = 3;
#endif
    mlp_close(&r);
    return kind;
}

/* The network on one block of MLP_VB voxels (feature-major inputs at in, rows ld apart):
 * the last layer's accumulators land in out, (nout, MLP_VB), which is returned. */
static const float *mlp_block(mlp_run *r, const float *in, int64_t ld)
{
    float *h[2] = {r->buf + MLP_VB * MLP_WIDTH, r->buf + 2 * MLP_VB * MLP_WIDTH};
    if (r->q != NULL) {
        int32_t *pairs[2] = {r->pairs + MLP_VB * (MLP_WIDTH / 2),
                             r->pairs + 2 * MLP_VB * (MLP_WIDTH / 2)}, *pin = r->pairs;
        if (r->plain_int)
            mlp_pairs_plain(in, ld, r->size[0], pin);
#ifdef MLP_VECTOR
        else if (r->vnni)
            mlp_pairs_avx512(in, ld, r->size[0], pin);
        else
            mlp_pairs_avx2(in, ld, r->size[0], pin);
#endif
        for (int l = 0; l < r->layers; l++) {
            int hidden = l < r->layers - 1;
            if (r->plain_int)
                mlp_layer_int_plain(pin, r->size[l], r->q[l], r->size[l + 1], hidden,
                                    pairs[l & 1], h[0]);
#ifdef MLP_VECTOR
            else if (r->vnni)
                mlp_layer_vnni(pin, r->size[l], r->q[l], r->size[l + 1], hidden, pairs[l & 1],
                               h[0]);
            else
                mlp_layer_madd(pin, r->size[l], r->q[l], r->size[l + 1], hidden, pairs[l & 1],
                               h[0]);
#endif
            pin = pairs[l & 1];
        }
        return h[0];
    }
    for (int l = 0; l < r->layers; l++) {
        float *out = h[l & 1];
        r->layer(in, ld, r->size[l], r->w[l], r->b[l], r->size[l + 1], l < r->layers - 1, out);
        in = out;
        ld = MLP_VB;
    }
    return in;
}

/* Voxels a .. a + m - 1 of x (input f of voxel i at x[f * ld + i * step]) as a feature-major
 * block of MLP_VB columns, zero-padded past m; read along x's contiguous direction. */
static void mlp_pack(float *block, const float *x, int64_t ld, int64_t step, int64_t a,
                     int64_t m, int nin)
{
    if (step == 1) {
        for (int f = 0; f < nin; f++)
            for (int64_t i = 0; i < MLP_VB; i++)
                block[f * MLP_VB + i] = i < m ? x[f * ld + a + i] : 0.0f;
        return;
    }
    for (int64_t i = 0; i < MLP_VB; i++)
        for (int f = 0; f < nin; f++)
            block[f * MLP_VB + i] = i < m ? x[f * ld + (a + i) * step] : 0.0f;
}

static void mlp_feed(mlp_run *r, const float *x, int64_t ld, int64_t step, int64_t upto,
                     int last)
{
    if (r->acc == NULL)
        return;
    float *tail = r->buf;
    int nout = r->size[r->layers];
    for (int64_t a = r->done; a < upto; a += MLP_VB) {
        int64_t m = upto - a < MLP_VB ? upto - a : MLP_VB;
        if (m < MLP_VB && !last)
            break;
        const float *in = x + a;
        int64_t in_ld = ld;
        if (m < MLP_VB || step != 1) {   /* a partial or voxel-major block: packed */
            mlp_pack(tail, x, ld, step, a, m, r->size[0]);
            in = tail;
            in_ld = MLP_VB;
        }
        const float *out = mlp_block(r, in, in_ld);
        for (int64_t i = 0; i < m; i++)
            for (int o = 0; o < nout; o++)
                r->acc[(a + i) * nout + o] = out[o * MLP_VB + i];
        r->done = a + m;
    }
}

/* The default integer network (models.intnet.IntMLP.float_accumulators) on n voxels: input
 * f of voxel i at x[f * ld + i * step] (step 1: feature-major, used in place; otherwise each
 * block of voxels is packed feature-major first, so voxel-major samples need no transposed
 * copy). Layer l has size[l] inputs
 * and size[l + 1] outputs; its weights (row-major, out by in) and biases come pre-scaled by
 * the hidden layers' 2**-shift, so every partial sum is an exact float32 integer times a power
 * of two and any summation order gives the same result. Writes the last layer's accumulators
 * to acc (n, size[layers]); ``vector``: 1 the widest vector layers the CPU has (on the
 * integer form q when there is one: AVX-512 VNNI, or AVX2 where there is no AVX-512; else
 * AVX-512, else AVX2 and FMA), 4 the AVX2 integer layers, 3 the AVX-512 float layers, 2 AVX2
 * and FMA even where AVX-512 is, 0 the plain C layers (4, 3, 2 and 0 to compare). Returns 0,
 * or -1 when a layer is wider than MLP_WIDTH. */
int64_t voxarc_mlp(const float *x, int64_t ld, int64_t step, int64_t n, int32_t layers,
                   const int32_t *size, const float *const *w, const float *const *b,
                   const int32_t *const *q, int32_t vector, float *acc)
{
    mlp_run r;
    if (mlp_open(&r, layers, size, w, b, q, vector, acc) < 0) {
        mlp_close(&r);
        return -1;
    }
    mlp_feed(&r, x, ld, step, n, 1);
    mlp_close(&r);
    return 0;
}

/* Features of n voxels.
 *
 * values, valid: (K, n) neighbour values (int32) and validity (0/1 bytes), rows vstride and
 *   ostride elements apart; K >= 19 and the first 19 neighbours are the default neighbourhood's.
 * compact: when nonzero, flat contexts (every difference to the reference 0) are left out of
 *   x, s_out, lq_out, ref_busy and busy; else every voxel is kept.
 * log2q: floor(4 log2 s) for s = 0 .. 2**20 (models.features._LOG2Q_TABLE).
 * x: (K + 5, xstride) float32 network inputs of the kept voxels, in order.
 * ref_all: (n) the reference of every voxel.
 * busy, s_out, lq_out, ref_busy: (n) index, activity, floor(4 log2 s) and reference of the
 *   kept voxels.
 * layers, size, w, b, vector, acc: with acc not NULL, the network of voxarc_mlp is run on the
 *   kept voxels' inputs block by block, as they are written (still in cache), and its
 *   accumulators written to acc (kept, size[layers]).
 * Returns the number of kept voxels, or -1 when K is out of range, the network is too wide or
 * memory is short.
 */
VECTOR_CLONES
int64_t voxarc_features(const int32_t *values, int64_t vstride, const uint8_t *valid,
                        int64_t ostride, int64_t n, int32_t K, int32_t compact,
                        const int16_t *log2q, float *x, int64_t xstride, int64_t *ref_all,
                        int64_t *busy, int64_t *s_out, int64_t *lq_out, int64_t *ref_busy,
                        int32_t layers, const int32_t *size, const float *const *w,
                        const float *const *b, const int32_t *const *q, int32_t vector,
                        float *acc)
{
    mlp_run net = {.buf = NULL, .acc = NULL};
    if (K < PREVIOUS_END || K > KMAX
            || (acc != NULL && mlp_open(&net, layers, size, w, b, q, vector, acc) < 0)) {
        mlp_close(&net);
        return -1;
    }
    const int32_t *v[KMAX];
    const uint8_t *ok[KMAX];
    int64_t kept = 0;
    for (int64_t a = 0; a < n; a += BLOCK) {
        int64_t m = n - a < BLOCK ? n - a : BLOCK;
        for (int k = 0; k < K; k++) {
            v[k] = values + (int64_t)k * vstride + a;
            ok[k] = valid + (int64_t)k * ostride + a;
        }
        kept += block_features(v, ok, m, K, compact, log2q, x, xstride, a, kept, ref_all, busy,
                               s_out, lq_out, ref_busy);
        mlp_feed(&net, x, xstride, 1, kept, 0);   /* while the block's inputs are in cache */
    }
    mlp_feed(&net, x, xstride, 1, kept, 1);
    mlp_close(&net);
    return kept;
}

/* voxarc_features for voxels read from a decoder buffer in runs (models.skew): run r holds
 * len[r] voxels; the neighbour k of its voxel i is buf[origin[r] + koff[k] + i], and its
 * validity is byte k * ostride[r] + i of the array at address vptr[r], and-ed with bit k of
 * depth[r]. The voxels are numbered in run order. Runs are short (a tile's row in a wavefront
 * step: tens of voxels), so their neighbours are copied into whole blocks first: the block
 * loops then run at full vector length. */
VECTOR_CLONES
int64_t voxarc_features_runs(const int32_t *buf, const int64_t *origin, const int64_t *len,
                             const uint64_t *vptr, const int64_t *ostride,
                             const uint64_t *depth, int64_t runs, const int64_t *koff,
                             int32_t K, int32_t compact, const int16_t *log2q, float *x,
                             int64_t xstride, int64_t *ref_all, int64_t *busy, int64_t *s_out,
                             int64_t *lq_out, int64_t *ref_busy, int32_t layers,
                             const int32_t *size, const float *const *w, const float *const *b,
                             const int32_t *const *q, int32_t vector, float *acc)
{
    if (K < PREVIOUS_END || K > KMAX)
        return -1;
    mlp_run net = {.buf = NULL, .acc = NULL};
    int32_t (*vals)[BLOCK] = aligned_block(sizeof(int32_t) * KMAX * BLOCK);
    uint8_t (*oks)[BLOCK] = aligned_block(KMAX * BLOCK);
    if (vals == NULL || oks == NULL
            || (acc != NULL && mlp_open(&net, layers, size, w, b, q, vector, acc) < 0)) {
        free(vals);
        free(oks);
        mlp_close(&net);
        return -1;
    }
    const int32_t *v[KMAX];
    const uint8_t *ok[KMAX];
    for (int k = 0; k < K; k++) {
        v[k] = vals[k];
        ok[k] = oks[k];
    }
    int64_t kept = 0, a = 0, fill = 0;
    for (int64_t r = 0; r < runs; r++) {
        const uint8_t *okr = (const uint8_t *)(uintptr_t)vptr[r];
        for (int64_t at = 0; at < len[r];) {    /* a run may straddle blocks */
            int64_t m = len[r] - at < BLOCK - fill ? len[r] - at : BLOCK - fill;
            for (int k = 0; k < K; k++) {
                __builtin_memcpy(vals[k] + fill, buf + origin[r] + koff[k] + at, 4 * m);
                if ((depth[r] >> k) & 1u)
                    __builtin_memcpy(oks[k] + fill, okr + (int64_t)k * ostride[r] + at, m);
                else   /* a neighbour in no earlier slice */
                    __builtin_memset(oks[k] + fill, 0, m);
            }
            fill += m;
            at += m;
            if (fill == BLOCK) {
                kept += block_features(v, ok, fill, K, compact, log2q, x, xstride, a, kept,
                                       ref_all, busy, s_out, lq_out, ref_busy);
                mlp_feed(&net, x, xstride, 1, kept, 0);   /* inputs still in cache */
                a += fill;
                fill = 0;
            }
        }
    }
    if (fill > 0)
        kept += block_features(v, ok, fill, K, compact, log2q, x, xstride, a, kept, ref_all,
                               busy, s_out, lq_out, ref_busy);
    mlp_feed(&net, x, xstride, 1, kept, 1);
    free(vals);
    free(oks);
    mlp_close(&net);
    return kept;
}

/* The predictor's outputs from the network's accumulators, as models.predictor computes them
 * in numpy (prediction, scale_index, fraction_bin): acc is the (kept, 2) float32 output of the
 * integer network (exact integers below 2**24) for the kept voxels busy[c] (busy NULL: every
 * voxel, kept == n); every other voxel is a flat context and predicts its reference with table
 * row flat_row. head = (mean_mult, mean_shift, scale_mult, scale_shift). */
VECTOR_CLONES
void voxarc_outputs(const float *acc, int64_t kept, const int64_t *busy, const int64_t *ref_busy,
                    const int64_t *s, const int64_t *lq, const int64_t *ref_all, int64_t n,
                    const int64_t *head, int64_t bins_log2, int64_t scale_zero,
                    int64_t n_scales, int64_t flat_row, int64_t lo, int64_t hi,
                    int64_t *pred, int64_t *row)
{
    int64_t mm = head[0], shift = head[1] + 6, sm = head[2], ss = head[3];
    int64_t half = (int64_t)1 << (shift - 1), frac = ((int64_t)1 << shift) - 1;
    int64_t shalf = (int64_t)1 << (ss - 1);
    if (busy != NULL) {
        for (int64_t i = 0; i < n; i++) {
            int64_t r = ref_all[i];
            pred[i] = r < lo ? lo : (r > hi ? hi : r);
            row[i] = flat_row;
        }
    }
    for (int64_t c = 0; c < kept; c++) {
        int64_t i = busy != NULL ? busy[c] : c;
        int64_t t = (int64_t)acc[2 * c] * mm * s[c] + half;
        int64_t p = ref_busy[c] + (t >> shift);
        pred[i] = p < lo ? lo : (p > hi ? hi : p);
        int64_t j = (((int64_t)acc[2 * c + 1] * sm + shalf) >> ss) + lq[c] + scale_zero;
        j = j < 0 ? 0 : (j > n_scales - 1 ? n_scales - 1 : j);
        if (bins_log2 > 0)
            j = (j << bins_log2) + ((t & frac) >> (shift - bins_log2));
        row[i] = j;
    }
}

/* One symbol's probability row: dst = src (width columns: 2C direct tokens, ESC_NEG, ESC_POS,
 * then padding), with no probability for tokens outside [qmin, qmax] when that range ends
 * within `edge` tokens (models.entropy.truncate_rows). */
static inline void bounded_row(const double *src, int64_t width, int64_t token_range,
                               int64_t qmin, int64_t qmax, int64_t edge, double *dst)
{
    for (int64_t k = 0; k < width; k++)
        dst[k] = src[k];
    if (qmin < -edge && qmax >= edge)
        return;
    for (int64_t k = 0; k < 2 * token_range; k++) {
        int64_t q = k - token_range;
        if (q < qmin || q > qmax)
            dst[k] = 0.0;
    }
    if (!(qmin < -token_range))
        dst[2 * token_range] = 0.0;
    if (!(qmax >= token_range))
        dst[2 * token_range + 1] = 0.0;
}

/* The sum of a row's direct tokens [a, b) within [lo, hi), from its prefix sums cum. */
static inline double span_sum(const double *cum, int64_t a, int64_t b, int64_t lo, int64_t hi)
{
    a = a < lo ? lo : (a > hi ? hi : a);
    b = b < lo ? lo : (b > hi ? hi : b);
    return b > a ? cum[b] - cum[a] : 0.0;
}

/* One symbol's first-stage row (blob format 5, models.entropy.stage_rows): the 2S direct
 * tokens q in [-S, S) of its bounded_row, then the sums of what lies beyond on each side (the
 * farther direct tokens and that side's escape), from the row's prefix sums cum (cum[k]: the
 * sum of its first k direct tokens). The frequencies are integers, so these sums are exact and
 * equal to a sum in any order. */
static inline void stage_row(const double *src, const double *cum, int64_t token_range,
                             int64_t stage, int64_t qmin, int64_t qmax, int64_t edge,
                             double *dst)
{
    int64_t T = token_range, S = stage;
    if (qmin < -edge && qmax >= edge) {
        for (int64_t k = 0; k < 2 * S; k++)
            dst[k] = src[T - S + k];
        dst[2 * S] = (cum[T - S] - cum[0]) + src[2 * T];
        dst[2 * S + 1] = (cum[2 * T] - cum[T + S]) + src[2 * T + 1];
        return;
    }
    for (int64_t k = 0; k < 2 * S; k++) {
        int64_t q = k - S;
        dst[k] = q >= qmin && q <= qmax ? src[T + q] : 0.0;
    }
    dst[2 * S] = span_sum(cum, qmin + T, qmax + T + 1, 0, T - S)
                 + (qmin < -T ? src[2 * T] : 0.0);
    dst[2 * S + 1] = span_sum(cum, qmin + T, qmax + T + 1, T + S, 2 * T)
                     + (qmax >= T ? src[2 * T + 1] : 0.0);
}

/* A symbol's coder row: its bounded_row (stage 0) or its stage_row (stage S > 0). */
static inline void coder_row(const double *src, const double *cum, int64_t width,
                             int64_t token_range, int64_t stage, int64_t qmin, int64_t qmax,
                             int64_t edge, double *dst)
{
    if (stage > 0)
        stage_row(src, cum, token_range, stage, qmin, qmax, edge, dst);
    else
        bounded_row(src, width, token_range, qmin, qmax, edge, dst);
}

/* Whether coder rows of this layout can be written for these n table rows (voxarc_token_rows,
 * voxarc_bounded_rows): the table wide enough, a stage within the token range with its prefix
 * sums, every row inside the table. */
static int coder_rows_ok(int64_t rows, int64_t width, int64_t token_range, int64_t stage,
                         const double *cum, const int64_t *row, int64_t n)
{
    if (width < 2 * token_range + 2 || stage < 0 || stage > token_range
            || (stage > 0 && cum == NULL))
        return 0;
    for (int64_t i = 0; i < n; i++)
        if (row[i] < 0 || row[i] >= rows)
            return 0;
    return 1;
}

/* The range decoder's probability rows of one wavefront step: out[i] = table[row[i]], for n
 * symbols; with bounded, truncated (bounded_row) to the tokens a symbol predicted as pred[i]
 * can take within [lo, hi]; with stage > 0 their first-stage rows (stage_row, 2 * stage + 2
 * columns). Also writes each symbol's low-bit count (shift of its row) to sh. */
int64_t voxarc_token_rows(const double *table, const double *cum, int64_t rows, int64_t width,
                          int64_t token_range, const int64_t *shifts, const int64_t *row,
                          const int64_t *pred, int64_t n, int32_t bounded, int64_t lo,
                          int64_t hi, int64_t edge, int64_t stage, double *out, int64_t *sh)
{
    if (!coder_rows_ok(rows, width, token_range, stage, cum, row, n))
        return -1;
    int64_t out_width = stage > 0 ? 2 * stage + 2 : width;
    for (int64_t i = 0; i < n; i++) {
        int64_t s = shifts[row[i]];
        sh[i] = s;
        /* unbounded: a range that ends nowhere near */
        int64_t qmin = bounded ? (lo - pred[i]) >> s : -edge - 1;
        int64_t qmax = bounded ? (hi - pred[i]) >> s : edge;
        coder_row(table + row[i] * width, stage > 0 ? cum + row[i] * (2 * token_range + 1)
                  : NULL, width, token_range, stage, qmin, qmax, edge, out + i * out_width);
    }
    return 0;
}

/* One symbol's second-stage row (voxarc_tail_rows) from its table row src, token bounds
 * [qmin, qmax] and side (above). */
static void tail_row(const double *src, int64_t T, int64_t S, int64_t qmin, int64_t qmax,
                     int above, int64_t edge, int64_t out_width, double *dst)
{
    int64_t beyond = T - S;
    int open = qmin < -edge && qmax >= edge;
    int64_t q0 = above ? S : -T;             /* the side's first direct token */
    for (int64_t k = 0; k < beyond; k++) {
        int64_t q = q0 + k;
        dst[k] = open || (q >= qmin && q <= qmax) ? src[T + q] : 0.0;
    }
    if (above)
        dst[beyond] = open || qmax >= T ? src[2 * T + 1] : 0.0;
    else
        dst[beyond] = open || qmin < -T ? src[2 * T] : 0.0;
    for (int64_t k = beyond + 1; k < out_width; k++)
        dst[k] = 0.0;
}

/* Second-stage rows (blob format 5, models.entropy.tail_rows) of n symbols beyond their first
 * stage, at table row row[i] with token bounds [qmin[i], qmax[i]]: the direct tokens beyond the
 * first stage on the symbol's side (above[i]: q in [S, T), else q in [-T, -S)), then that
 * side's escape, each kept or dropped as bounded_row keeps them; zeros after, to out_width
 * columns. */
int64_t voxarc_tail_rows(const double *table, int64_t rows, int64_t width, int64_t token_range,
                         int64_t stage, const int64_t *row, const int64_t *qmin_of,
                         const int64_t *qmax_of, const uint8_t *above, int64_t n, int64_t edge,
                         int64_t out_width, double *out)
{
    int64_t T = token_range, S = stage;
    if (width < 2 * T + 2 || S < 1 || S > T || out_width < T - S + 1)
        return -1;
    for (int64_t i = 0; i < n; i++)
        if (row[i] < 0 || row[i] >= rows)
            return -1;
    for (int64_t i = 0; i < n; i++)
        tail_row(table + row[i] * width, T, S, qmin_of[i], qmax_of[i], above[i], edge,
                 out_width, out + i * out_width);
    return 0;
}

/* One two-stage wavefront step's symbols beyond their first stage (models.entropy.StepDecoder):
 * first[i] (n of them) is symbol i's first-stage symbol, its table row row[i], prediction
 * pred[i] and shift sh[i]; the step's segments (one stream each) end at seg_end[0..nseg).
 * Writes the second-stage rows (voxarc_tail_rows, token bounds within [lo, hi]) of the symbols
 * beyond, in order, to out, and count[s] = how many of them lie in the segments before s
 * (nseg + 1 entries). Returns how many are beyond, or -1 for a first-stage symbol outside its
 * alphabet, a row outside the table or segments that do not end at n. */
int64_t voxarc_step_tail(const int64_t *first, int64_t n, const int64_t *row,
                         const int64_t *pred, const int64_t *sh, const double *table,
                         int64_t rows, int64_t width, int64_t token_range, int64_t stage,
                         int64_t lo, int64_t hi, int64_t edge, int64_t out_width,
                         const int64_t *seg_end, int64_t nseg, int64_t *count, double *out)
{
    int64_t T = token_range, S = stage, m = 0, i = 0;
    if (width < 2 * T + 2 || S < 1 || S > T || out_width < T - S + 1
            || (nseg > 0 && seg_end[nseg - 1] != n) || (nseg == 0 && n != 0))
        return -1;
    for (int64_t g = 0; g < nseg; g++) {
        count[g] = m;
        if (seg_end[g] < i || seg_end[g] > n)
            return -1;
        for (; i < seg_end[g]; i++) {
            int64_t f = first[i];
            if (f < 0 || f > 2 * S + 1 || row[i] < 0 || row[i] >= rows)
                return -1;
            if (f < 2 * S)
                continue;
            tail_row(table + row[i] * width, T, S, (lo - pred[i]) >> sh[i],
                     (hi - pred[i]) >> sh[i], f == 2 * S + 1, edge, out_width,
                     out + m * out_width);
            m++;
        }
    }
    count[nseg] = m;
    return m;
}

/* A format-5 slice's symbols for its three range coders (models.entropy.encode_slice), from its
 * n residuals r[i] in wavefront order (step[i] non-decreasing), at table rows row[i] with
 * low-bit counts sh[i] and predictions pred[i] within [lo, hi]: first[i], each token's
 * first-stage symbol; the tail stream's values and rows, per step the second stages of the
 * symbols beyond the first (rows as voxarc_tail_rows) then the escapes' classes (rows:
 * classes); the uniform stream's values and sizes, per step the low bits (sh > 0) then the
 * escapes' extra bits (models.entropy.split_residuals), at most tail_cap and uni_cap of each.
 * counts gets the tail's and the uniform stream's lengths (each at most 2 n). Returns 0, -2
 * when they do not fit the capacities (counts then says what is needed; what was written is
 * to be discarded), or -1 for a row outside the table or a field wider than the uniform
 * coder's 31 bits. */
int64_t voxarc_slice_symbols(const int64_t *r, const int64_t *row, const int64_t *sh,
                             const int64_t *pred, const int64_t *step, int64_t n,
                             const double *table, int64_t rows, int64_t width,
                             const double *classes, int64_t token_range, int64_t stage,
                             int64_t lo, int64_t hi, int64_t edge, int64_t out_width,
                             int32_t *first, int64_t tail_cap, int32_t *tail,
                             double *tail_rows, int64_t uni_cap, int32_t *uni, int32_t *size,
                             int64_t *counts)
{
    int64_t T = token_range, S = stage, nt = 0, nu = 0;
    if (width < 2 * T + 2 || S < 1 || S > T || out_width < T - S + 1)
        return -1;
    for (int64_t a = 0, b; a < n; a = b) {
        for (b = a + 1; b < n && step[b] == step[a]; b++)
            ;
        for (int64_t i = a; i < b; i++) {       /* first stages, second stages, low bits */
            if (row[i] < 0 || row[i] >= rows || sh[i] < 0 || sh[i] > 30)
                return -1;
            int64_t q = r[i] >> sh[i], token = q + T;
            if (token < 0 || token >= 2 * T)
                token = q >= T ? 2 * T + 1 : 2 * T;                   /* an escape */
            int below = token == 2 * T || token < T - S;
            int above = token == 2 * T + 1 || (token >= T + S && token < 2 * T);
            first[i] = (int32_t)(below ? 2 * S : above ? 2 * S + 1 : token - (T - S));
            if ((below || above) && nt++ < tail_cap) {
                tail[nt - 1] = (int32_t)(token >= 2 * T ? T - S
                                         : above ? token - (T + S) : token);
                tail_row(table + row[i] * width, T, S, (lo - pred[i]) >> sh[i],
                         (hi - pred[i]) >> sh[i], above, edge, out_width,
                         tail_rows + (nt - 1) * out_width);
            }
            if (sh[i] > 0 && nu++ < uni_cap) {
                uni[nu - 1] = (int32_t)(r[i] - (q << sh[i]));
                size[nu - 1] = (int32_t)1 << sh[i];
            }
        }
        for (int64_t i = a; i < b; i++) {       /* the escapes' classes and extra bits */
            int64_t q = r[i] >> sh[i];
            if (q >= -T && q < T)
                continue;
            uint64_t e = (uint64_t)(q >= T ? q - T : -T - 1 - q);
            int64_t c = e ? 64 - __builtin_clzll(e) : 0;
            if (c > 31)
                return -1;
            if (nt++ < tail_cap) {
                tail[nt - 1] = (int32_t)c;
                for (int64_t k = 0; k < out_width; k++)
                    tail_rows[(nt - 1) * out_width + k] = classes[k];
            }
            if (c > 1 && nu++ < uni_cap) {
                uni[nu - 1] = (int32_t)(e - ((uint64_t)1 << (c - 1)));
                size[nu - 1] = (int32_t)1 << (c - 1);
            }
        }
    }
    counts[0] = nt;
    counts[1] = nu;
    return nt > tail_cap || nu > uni_cap ? -2 : 0;
}

/* Tokens (models.entropy.stage_tokens) from n first-stage symbols and the m second-stage ones
 * of those beyond [-S, S) (in order). Returns -1 when the counts do not match or a symbol is
 * outside its alphabet (a corrupt stream). */
int64_t voxarc_stage_tokens(const int64_t *first, int64_t n, const int64_t *second, int64_t m,
                            int64_t token_range, int64_t stage, int64_t *token)
{
    int64_t T = token_range, S = stage, beyond = token_range - stage, used = 0;
    for (int64_t i = 0; i < n; i++) {
        int64_t f = first[i];
        if (f < 0 || f > 2 * S + 1)
            return -1;
        if (f < 2 * S) {
            token[i] = f + T - S;
            continue;
        }
        if (used >= m)
            return -1;
        int64_t t = second[used++];
        if (t < 0 || t > beyond)
            return -1;
        if (f == 2 * S + 1)
            token[i] = t == beyond ? 2 * T + 1 : t + T + S;
        else
            token[i] = t == beyond ? 2 * T : t;
    }
    return used == m ? 0 : -1;
}

/* The range encoder's probability rows: out[i] = table[row[i]] truncated to [qmin[i],
 * qmax[i]] (bounded_row), or with stage > 0 their first-stage rows (stage_row), for n symbols
 * whose token bounds the caller has. */
int64_t voxarc_bounded_rows(const double *table, const double *cum, int64_t rows,
                            int64_t width, int64_t token_range, const int64_t *row,
                            const int64_t *qmin, const int64_t *qmax, int64_t n, int64_t edge,
                            int64_t stage, double *out)
{
    if (!coder_rows_ok(rows, width, token_range, stage, cum, row, n))
        return -1;
    int64_t out_width = stage > 0 ? 2 * stage + 2 : width;
    for (int64_t i = 0; i < n; i++)
        coder_row(table + row[i] * width, stage > 0 ? cum + row[i] * (2 * token_range + 1)
                  : NULL, width, token_range, stage, qmin[i], qmax[i], edge, out + i * out_width);
    return 0;
}

/* Residuals of one step from their tokens (models.entropy.join_residuals), with the other
 * fields in decoding order: low[] holds the low bits of the symbols whose shift sh is > 0,
 * cls[] the escape class of each escape token, extra[] the extra bits of each class > 1.
 * Returns -1 when those counts do not match the tokens (nothing is read past an array). */
int64_t voxarc_join(const int64_t *token, const int64_t *sh, int64_t n, const int64_t *low,
                    int64_t n_low, const int64_t *cls, int64_t n_cls, const int64_t *extra,
                    int64_t n_extra, int64_t token_range, int64_t *out)
{
    int64_t nl = 0, nc = 0, ne = 0;
    for (int64_t i = 0; i < n; i++) {
        int64_t t = token[i], q = t - token_range;
        if (t >= 2 * token_range) {
            if (nc >= n_cls)
                return -1;
            int64_t c = cls[nc++];
            if (c < 0 || c > 62)
                return -1;
            int64_t e = c > 0 ? ((int64_t)1 << (c - 1)) : 0;
            if (c > 1) {
                if (ne >= n_extra)
                    return -1;
                e += extra[ne++];
            }
            q = t == 2 * token_range ? -token_range - 1 - e : token_range + e;
        }
        int64_t r = q * ((int64_t)1 << sh[i]);
        if (sh[i] > 0) {
            if (nl >= n_low)
                return -1;
            r += low[nl++];
        }
        out[i] = r;
    }
    return nl == n_low && nc == n_cls && ne == n_extra ? 0 : -1;
}

/* A two-stage step's tokens (voxarc_stage_tokens) from its n first-stage and m second-stage
 * symbols, and what the step's other fields need, per segment (ending at seg_end[0..nseg)):
 * esc[s], low[s] = the escape tokens and the symbols with low bits (sh > 0) in the segments
 * before s (nseg + 1 entries each), and size[] = 1 << sh of the latter, in order (the uniform
 * stream's sizes). Returns 0, or -1 when the symbols do not fit (a corrupt stream). */
int64_t voxarc_step_tokens(const int64_t *first, int64_t n, const int64_t *second, int64_t m,
                           const int64_t *sh, int64_t token_range, int64_t stage,
                           const int64_t *seg_end, int64_t nseg, int64_t *token, int64_t *esc,
                           int64_t *low, int32_t *size)
{
    if (voxarc_stage_tokens(first, n, second, m, token_range, stage, token) < 0)
        return -1;
    int64_t ne = 0, nl = 0, i = 0;
    for (int64_t g = 0; g < nseg; g++) {
        esc[g] = ne;
        low[g] = nl;
        if (seg_end[g] < i || seg_end[g] > n)
            return -1;
        for (; i < seg_end[g]; i++) {
            ne += token[i] >= 2 * token_range;
            if (sh[i] > 0) {
                if (sh[i] > 30)
                    return -1;
                size[nl++] = (int32_t)1 << sh[i];
            }
        }
    }
    esc[nseg] = ne;
    low[nseg] = nl;
    return i == n ? 0 : -1;
}

/* A step's decoded values: pred[i] plus the residual voxarc_join makes of its fields. Returns
 * 0, -1 when the fields do not fit the tokens, -2 when a value falls outside [lo, hi] (a
 * corrupt stream). */
int64_t voxarc_step_join(const int64_t *token, const int64_t *sh, int64_t n, const int64_t *low,
                         int64_t n_low, const int64_t *cls, int64_t n_cls, const int64_t *extra,
                         int64_t n_extra, int64_t token_range, const int64_t *pred, int64_t lo,
                         int64_t hi, int64_t *out)
{
    if (voxarc_join(token, sh, n, low, n_low, cls, n_cls, extra, n_extra, token_range, out) < 0)
        return -1;
    int bad = 0;
    for (int64_t i = 0; i < n; i++) {
        out[i] += pred[i];
        bad |= out[i] < lo || out[i] > hi;
    }
    return bad ? -2 : 0;
}

/* One wavefront step of the sheared decoder in one call: the features of the runs' n voxels
 * and the network on the kept ones (voxarc_features_runs), their predictions and table rows
 * (voxarc_outputs), and, with a table, the range decoder's probability rows and low-bit
 * counts (voxarc_token_rows). The decoder's constants travel in two arrays built once:
 *   p: buf, koff, log2q, size, w, b, head, table (0: no probability rows), shifts,
 *      q (the network's integer form, 0: none), the table's prefix sums (for stage > 0)
 *   q: K, compact, layers, vector, bins_log2, scale_zero, n_scales, flat_row, lo, hi,
 *      table_rows, width, token_range, bounded, edge, stage (first-stage rows, 0: whole)
 * Returns 0, or -1 when a step's arrays cannot be had or an argument is out of range. */
int64_t voxarc_step_predict(const uint64_t *p, const int64_t *q, int64_t n, int64_t runs,
                            const int64_t *origin, const int64_t *len, const uint64_t *vptr,
                            const int64_t *ostride, const uint64_t *depth, int64_t *pred,
                            int64_t *row, int64_t *sh, double *rows)
{
    int32_t K = (int32_t)q[0];
    if (K < PREVIOUS_END || K > KMAX || q[2] < 1)
        return -1;
    const int32_t *size = (const int32_t *)(uintptr_t)p[3];
    int64_t nout = size[q[2]], m = n > 0 ? n : 1;
    float *x = aligned_block(sizeof(float) * (K + 5) * m);
    float *acc = aligned_block(sizeof(float) * nout * m);
    int64_t *ints = aligned_block(sizeof(int64_t) * 5 * m);
    int64_t status = -1;
    if (x == NULL || acc == NULL || ints == NULL)
        goto done;
    int64_t *ref_all = ints, *busy = ints + m, *s = ints + 2 * m, *lq = ints + 3 * m,
            *ref_busy = ints + 4 * m;
    int64_t kept = voxarc_features_runs(
        (const int32_t *)(uintptr_t)p[0], origin, len, vptr, ostride, depth, runs,
        (const int64_t *)(uintptr_t)p[1], K, (int32_t)q[1], (const int16_t *)(uintptr_t)p[2],
        x, m, ref_all, busy, s, lq, ref_busy, (int32_t)q[2], size,
        (const float *const *)(uintptr_t)p[4], (const float *const *)(uintptr_t)p[5],
        (const int32_t *const *)(uintptr_t)p[9], (int32_t)q[3], acc);
    if (kept < 0)
        goto done;
    voxarc_outputs(acc, kept, kept < n ? busy : NULL, ref_busy, s, lq, ref_all, n,
                   (const int64_t *)(uintptr_t)p[6], q[4], q[5], q[6], q[7], q[8], q[9], pred,
                   row);
    status = 0;
    if (p[7] != 0)
        status = voxarc_token_rows((const double *)(uintptr_t)p[7],
                                   (const double *)(uintptr_t)p[10], q[10], q[11], q[12],
                                   (const int64_t *)(uintptr_t)p[8], row, pred, n,
                                   (int32_t)q[13], q[8], q[9], q[14], q[15], rows, sh);
done:
    free(x);
    free(acc);
    free(ints);
    return status;
}

/* The fine-tuning loss (models.train.laplace_bits) and its gradient in one pass: for each
 * sample, the bits of the integer value[i] under a discretised Laplace of mean
 * ref + out0 * s / unit and scale 2**((out1 + lq) / scale_steps) (log2 scale clamped to
 * [-3, 18]), and d bits / d out0, d bits / d out1 in grad (n, 2). out is (n, 2) row-major.
 * Returns the sum of the bits. Float32 arithmetic like the torch expression it replaces; the
 * branches are the same (central: |e| < 0.5, where the value is the rounded mean). */
double voxarc_laplace_bits(const float *value, const float *ref, const float *s, const float *lq,
                           const float *out, int64_t n, float unit, float scale_steps,
                           float *grad)
{
    const float inv_ln2 = 1.4426950408889634f;
    double total = 0.0;
    for (int64_t i = 0; i < n; i++) {
        float mu = ref[i] + out[2 * i] * s[i] / unit;
        float log2b = (out[2 * i + 1] + lq[i]) / scale_steps;
        float live = log2b >= -3.0f && log2b <= 18.0f;   /* the clamp passes a gradient */
        log2b = log2b < -3.0f ? -3.0f : (log2b > 18.0f ? 18.0f : log2b);
        float inv_b = exp2f(-log2b);
        float d = value[i] - mu, e = fabsf(d);
        float sign = d > 0.0f ? 1.0f : (d < 0.0f ? -1.0f : 0.0f);
        /* log_p, its derivative in e, and b times its derivative in b */
        float log_p, dlp_de, b_dlp_db;
        if (e < 0.5f) {
            float a = expf(-(0.5f - e) * inv_b), c = expf(-(0.5f + e) * inv_b);
            float central = 1.0f - 0.5f * a - 0.5f * c;
            float live_c = central > 1e-12f;
            central = live_c ? central : 1e-12f;
            float inv_c = live_c / central;
            log_p = logf(central);
            dlp_de = inv_c * (c - a) * 0.5f * inv_b;
            b_dlp_db = -inv_c * 0.5f * inv_b * (a * (0.5f - e) + c * (0.5f + e));
        } else {
            /* P = 0.5 exp(-t/b) (1 - exp(-1/b)), t = e - 0.5; m1 = exp(-1/b) - 1 */
            float t = e - 0.5f, m1 = expm1f(-inv_b);
            log_p = -0.69314718f - t * inv_b + logf(-m1);
            dlp_de = -inv_b;
            b_dlp_db = t * inv_b + (1.0f + m1) * inv_b / m1;
        }
        total += (double)(-log_p * inv_ln2);
        /* bits = -log_p / ln2; e = |value - mu|, mu = ref + out0 s / unit; b = 2**log2b,
         * d b / d out1 = b ln2 / scale_steps */
        grad[2 * i] = inv_ln2 * dlp_de * sign * s[i] / unit;
        grad[2 * i + 1] = -b_dlp_db * live / scale_steps;
    }
    return total;
}

#define PLANAR_CHUNK 64     /* samples interleaved at a time by laplace_bits_planar_scalar */
_Static_assert(MLP_VB <= PLANAR_CHUNK, "a fine-tuning block's loss in one scalar call");

/* voxarc_laplace_bits on planar outputs (o0: the means' corrections, o1: the log-scales),
 * writing planar gradients g0 and g1: its scalar expressions, through interleaved buffers of
 * PLANAR_CHUNK samples (one call for a fine-tuning block's). Returns the sum of the bits. */
static double laplace_bits_planar_scalar(const float *value, const float *ref, const float *s,
                                         const float *lq, const float *o0, const float *o1,
                                         int64_t n, float unit, float scale_steps, float *g0,
                                         float *g1)
{
    double total = 0.0;
    float out[2 * PLANAR_CHUNK], grad[2 * PLANAR_CHUNK];
    for (int64_t a = 0; a < n; a += PLANAR_CHUNK) {
        int64_t m = n - a < PLANAR_CHUNK ? n - a : PLANAR_CHUNK;
        for (int64_t k = 0; k < m; k++) {
            out[2 * k] = o0[a + k];
            out[2 * k + 1] = o1[a + k];
        }
        total += voxarc_laplace_bits(value + a, ref + a, s + a, lq + a, out, m, unit,
                                     scale_steps, grad);
        for (int64_t k = 0; k < m; k++) {
            g0[a + k] = grad[2 * k];
            g1[a + k] = grad[2 * k + 1];
        }
    }
    return total;
}

#ifdef MLP_VECTOR
/* e**r 2**n for |r| <= ln2 / 2 and whole n: Cephes' expf polynomial of degree 6 for e**r,
 * times 2**n put into the exponent. */
__attribute__((target("avx2,fma")))
static inline __m256 exp_reduced_avx2(__m256 r, __m256 n)
{
    static const float c[] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                              4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
    __m256 p = _mm256_set1_ps(c[0]);
    for (int k = 1; k < 6; k++)
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c[k]));
    __m256 y = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
                                  23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

/* e**x, eight at a time, within about an ulp of expf (x = n ln2 + r, ln2 in two parts); x
 * clamped to where expf is normal. */
__attribute__((target("avx2,fma")))
static inline __m256 exp_avx2(__m256 x)
{
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    return exp_reduced_avx2(_mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r), n);
}

/* 2**x for x in [-18, 3] (the clamped log-scales): n = round(x), and e**((x - n) ln2), whose
 * argument is within [-0.35, 0.35]. */
__attribute__((target("avx2,fma")))
static inline __m256 exp2_avx2(__m256 x)
{
    __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return exp_reduced_avx2(_mm256_mul_ps(_mm256_sub_ps(x, n),
                                          _mm256_set1_ps(0.693147180559945f)), n);
}

/* e**x - 1 for x <= 0: a degree-9 Taylor polynomial where |x| < 0.5 (no cancellation), e**x - 1
 * below. */
__attribute__((target("avx2,fma")))
static inline __m256 expm1_avx2(__m256 x)
{
    static const float c[] = {1.0f / 362880, 1.0f / 40320, 1.0f / 5040, 1.0f / 720, 1.0f / 120,
                              1.0f / 24, 1.0f / 6, 0.5f, 1.0f};
    __m256 p = _mm256_set1_ps(c[0]);
    for (int k = 1; k < 9; k++)
        p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(c[k]));
    __m256 small = _mm256_mul_ps(p, x);
    __m256 large = _mm256_sub_ps(exp_avx2(x), _mm256_set1_ps(1.0f));
    __m256 near = _mm256_cmp_ps(x, _mm256_set1_ps(-0.5f), _CMP_GT_OQ);
    return _mm256_blendv_ps(large, small, near);
}

/* ln x for normal positive x, within about an ulp of logf (Cephes' logf: x = m 2**e, m in
 * [sqrt(1/2), sqrt(2)), a polynomial in m - 1). */
__attribute__((target("avx2,fma")))
static inline __m256 log_avx2(__m256 x)
{
    __m256i xi = _mm256_castps_si256(x);
    __m256 e = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(xi, 23),
                                                   _mm256_set1_epi32(126)));
    __m256 m = _mm256_castsi256_ps(_mm256_or_si256(
        _mm256_and_si256(xi, _mm256_set1_epi32(0x007fffff)), _mm256_set1_epi32(0x3f000000)));
    /* m in [0.5, 1): below sqrt(1/2), m + m - 1 and e - 1; else m - 1 */
    __m256 low = _mm256_cmp_ps(m, _mm256_set1_ps(0.707106781186547524f), _CMP_LT_OQ);
    e = _mm256_sub_ps(e, _mm256_and_ps(low, _mm256_set1_ps(1.0f)));
    m = _mm256_sub_ps(_mm256_add_ps(m, _mm256_and_ps(low, m)), _mm256_set1_ps(1.0f));
    __m256 z = _mm256_mul_ps(m, m);
    __m256 p = _mm256_set1_ps(7.0376836292e-2f);
    p = _mm256_fmadd_ps(p, m, _mm256_set1_ps(-1.1514610310e-1f));
    p = _mm256_fmadd_ps(p, m, _mm256_set1_ps(1.1676998740e-1f));
    p = _mm256_fmadd_ps(p, m, _mm256_set1_ps(-1.2420140846e-1f));
    p = _mm256_fmadd_ps(p, m, _mm256_set1_ps(1.4249322787e-1f));
    p = _mm256_fmadd_ps(p, m, _mm256_set1_ps(-1.6668057665e-1f));
    p = _mm256_fmadd_ps(p, m, _mm256_set1_ps(2.0000714765e-1f));
    p = _mm256_fmadd_ps(p, m, _mm256_set1_ps(-2.4999993993e-1f));
    p = _mm256_fmadd_ps(p, m, _mm256_set1_ps(3.3333331174e-1f));
    __m256 y = _mm256_mul_ps(_mm256_mul_ps(p, m), z);
    y = _mm256_fmadd_ps(e, _mm256_set1_ps(-2.12194440e-4f), y);
    y = _mm256_fnmadd_ps(_mm256_set1_ps(0.5f), z, y);
    return _mm256_fmadd_ps(e, _mm256_set1_ps(0.693359375f), _mm256_add_ps(m, y));
}

/* voxarc_laplace_bits on planar outputs (o0: the means' corrections, o1: the log-scales),
 * eight samples at a time, writing the gradients to g0 and g1: the same expressions, the
 * transcendental functions by exp_avx2 and friends instead of the C library's (a fine-tuning
 * step on 2048 samples spent 130-150 of its 800 us in them, scalar); the last n % 8 samples by
 * the scalar expressions. Returns the sum of the bits. */
__attribute__((target("avx2,fma")))
static double laplace_bits_planar_avx2(const float *value, const float *ref, const float *s,
                                       const float *lq, const float *o0, const float *o1,
                                       int64_t n, float unit, float scale_steps, float *g0,
                                       float *g1)
{
    const __m256 inv_ln2 = _mm256_set1_ps(1.4426950408889634f), half = _mm256_set1_ps(0.5f);
    const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
    const __m256 vunit = _mm256_set1_ps(unit), vsteps = _mm256_set1_ps(scale_steps);
    const __m256 sign_bit = _mm256_set1_ps(-0.0f);
    __m256d acc = _mm256_setzero_pd();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 vs = _mm256_loadu_ps(s + i);
        __m256 mu = _mm256_add_ps(_mm256_loadu_ps(ref + i),
                                  _mm256_div_ps(_mm256_mul_ps(_mm256_loadu_ps(o0 + i), vs), vunit));
        __m256 log2b = _mm256_div_ps(_mm256_add_ps(_mm256_loadu_ps(o1 + i),
                                                   _mm256_loadu_ps(lq + i)), vsteps);
        __m256 live = _mm256_and_ps(_mm256_and_ps(
            _mm256_cmp_ps(log2b, _mm256_set1_ps(-3.0f), _CMP_GE_OQ),
            _mm256_cmp_ps(log2b, _mm256_set1_ps(18.0f), _CMP_LE_OQ)), one);
        log2b = _mm256_min_ps(_mm256_max_ps(log2b, _mm256_set1_ps(-3.0f)), _mm256_set1_ps(18.0f));
        __m256 inv_b = exp2_avx2(_mm256_sub_ps(zero, log2b));
        __m256 d = _mm256_sub_ps(_mm256_loadu_ps(value + i), mu);
        __m256 e = _mm256_andnot_ps(sign_bit, d);
        __m256 sign = _mm256_sub_ps(_mm256_and_ps(_mm256_cmp_ps(d, zero, _CMP_GT_OQ), one),
                                    _mm256_and_ps(_mm256_cmp_ps(d, zero, _CMP_LT_OQ), one));
        /* near the mode (e < 0.5) */
        __m256 a = exp_avx2(_mm256_mul_ps(_mm256_sub_ps(zero, _mm256_sub_ps(half, e)), inv_b));
        __m256 c = exp_avx2(_mm256_mul_ps(_mm256_sub_ps(zero, _mm256_add_ps(half, e)), inv_b));
        __m256 central = _mm256_sub_ps(_mm256_sub_ps(one, _mm256_mul_ps(half, a)),
                                       _mm256_mul_ps(half, c));
        __m256 live_c = _mm256_cmp_ps(central, _mm256_set1_ps(1e-12f), _CMP_GT_OQ);
        central = _mm256_blendv_ps(_mm256_set1_ps(1e-12f), central, live_c);
        __m256 inv_c = _mm256_div_ps(_mm256_and_ps(live_c, one), central);
        __m256 lp_c = log_avx2(central);
        __m256 de_c = _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(inv_c, _mm256_sub_ps(c, a)), half),
                                    inv_b);
        __m256 db_c = _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(_mm256_sub_ps(zero, inv_c), half),
                                                  inv_b),
                                    _mm256_add_ps(_mm256_mul_ps(a, _mm256_sub_ps(half, e)),
                                                  _mm256_mul_ps(c, _mm256_add_ps(half, e))));
        /* the tails */
        __m256 t = _mm256_sub_ps(e, half);
        __m256 m1 = expm1_avx2(_mm256_sub_ps(zero, inv_b));
        __m256 lp_t = _mm256_add_ps(_mm256_sub_ps(_mm256_set1_ps(-0.69314718f),
                                                  _mm256_mul_ps(t, inv_b)),
                                    log_avx2(_mm256_sub_ps(zero, m1)));
        __m256 de_t = _mm256_sub_ps(zero, inv_b);
        __m256 db_t = _mm256_add_ps(_mm256_mul_ps(t, inv_b),
                                    _mm256_div_ps(_mm256_mul_ps(_mm256_add_ps(one, m1), inv_b), m1));
        __m256 mode = _mm256_cmp_ps(e, half, _CMP_LT_OQ);
        __m256 log_p = _mm256_blendv_ps(lp_t, lp_c, mode);
        __m256 dlp_de = _mm256_blendv_ps(de_t, de_c, mode);
        __m256 b_dlp_db = _mm256_blendv_ps(db_t, db_c, mode);
        __m256 bits = _mm256_mul_ps(_mm256_sub_ps(zero, log_p), inv_ln2);
        acc = _mm256_add_pd(acc, _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(bits)),
                                               _mm256_cvtps_pd(_mm256_extractf128_ps(bits, 1))));
        _mm256_storeu_ps(g0 + i, _mm256_div_ps(_mm256_mul_ps(_mm256_mul_ps(
            _mm256_mul_ps(inv_ln2, dlp_de), sign), vs), vunit));
        _mm256_storeu_ps(g1 + i, _mm256_div_ps(_mm256_mul_ps(_mm256_sub_ps(zero, b_dlp_db), live),
                                               vsteps));
    }
    double lanes[4];
    _mm256_storeu_pd(lanes, acc);
    double total = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
    if (i < n)
        total += laplace_bits_planar_scalar(value + i, ref + i, s + i, lq + i, o0 + i, o1 + i,
                                            n - i, unit, scale_steps, g0 + i, g1 + i);
    return total;
}
#endif

/* voxarc_laplace_bits on planar outputs and gradients (o0, o1 -> g0, g1): with ``vector`` and
 * AVX2 and FMA, as the fine-tuning step computes it (laplace_bits_planar_avx2), else the scalar
 * expressions. */
double voxarc_laplace_bits_planar(const float *value, const float *ref, const float *s,
                                  const float *lq, const float *o0, const float *o1, int64_t n,
                                  float unit, float scale_steps, float *g0, float *g1,
                                  int32_t vector)
{
#ifdef MLP_VECTOR
    if (vector && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        return laplace_bits_planar_avx2(value, ref, s, lq, o0, o1, n, unit, scale_steps, g0, g1);
#endif
    return laplace_bits_planar_scalar(value, ref, s, lq, o0, o1, n, unit, scale_steps, g0, g1);
}

/* part[(o * nin + f) * 8 + k] += sum over the block's voxels i = k (mod 8) of dz[o][i] a[f][i]
 * and bpart[o * 8 + k] += the same sum of dz[o][i]: weight and bias gradients in eight partial
 * sums each, added up once per step. */
static void grad_outer_plain(const float *dz, int nout, const float *a, int nin, float *part,
                             float *bpart)
{
    for (int o = 0; o < nout; o++) {
        for (int i = 0; i < MLP_VB; i++)
            bpart[o * 8 + i % 8] += dz[(int64_t)o * MLP_VB + i];
        for (int f = 0; f < nin; f++) {
            float *p = part + ((int64_t)o * nin + f) * 8;
            for (int i = 0; i < MLP_VB; i++)
                p[i % 8] += dz[(int64_t)o * MLP_VB + i] * a[(int64_t)f * MLP_VB + i];
        }
    }
}

#ifdef MLP_VECTOR
__attribute__((target("avx2,fma")))
static void grad_outer_avx2(const float *dz, int nout, const float *a, int nin, float *part,
                            float *bpart)
{
    for (int o = 0; o < nout; o++) {
        __m256 d[MLP_VB / 8];
        for (int v = 0; v < MLP_VB / 8; v++)
            d[v] = _mm256_loadu_ps(dz + (int64_t)o * MLP_VB + 8 * v);
        __m256 bs = _mm256_add_ps(d[0], d[1]);
        for (int v = 2; v < MLP_VB / 8; v++)
            bs = _mm256_add_ps(bs, d[v]);
        _mm256_storeu_ps(bpart + o * 8, _mm256_add_ps(_mm256_loadu_ps(bpart + o * 8), bs));
        for (int f = 0; f < nin; f++) {
            const float *x = a + (int64_t)f * MLP_VB;
            __m256 s0 = _mm256_mul_ps(d[0], _mm256_loadu_ps(x));
            __m256 s1 = _mm256_mul_ps(d[1], _mm256_loadu_ps(x + 8));
            for (int v = 2; v < MLP_VB / 8; v += 2) {
                s0 = _mm256_fmadd_ps(d[v], _mm256_loadu_ps(x + 8 * v), s0);
                s1 = _mm256_fmadd_ps(d[v + 1], _mm256_loadu_ps(x + 8 * v + 8), s1);
            }
            float *p = part + ((int64_t)o * nin + f) * 8;
            _mm256_storeu_ps(p, _mm256_add_ps(_mm256_loadu_ps(p), _mm256_add_ps(s0, s1)));
        }
    }
}
#endif

#ifdef MLP_VECTOR
/* The rows of eight voxels (r[k]: eight features of voxel k) as eight features' rows of those
 * voxels (r[f]: feature f of voxels 0..7). */
__attribute__((target("avx2")))
static inline void transpose8(__m256 *r)
{
    __m256 t[8], u[8];
    for (int k = 0; k < 8; k += 2) {
        t[k] = _mm256_unpacklo_ps(r[k], r[k + 1]);
        t[k + 1] = _mm256_unpackhi_ps(r[k], r[k + 1]);
    }
    for (int h = 0; h < 8; h += 4)
        for (int k = 0; k < 2; k++) {
            u[h + 2 * k] = _mm256_shuffle_ps(t[h + k], t[h + k + 2], _MM_SHUFFLE(1, 0, 1, 0));
            u[h + 2 * k + 1] = _mm256_shuffle_ps(t[h + k], t[h + k + 2], _MM_SHUFFLE(3, 2, 3, 2));
        }
    for (int k = 0; k < 4; k++) {
        r[k] = _mm256_permute2f128_ps(u[k], u[k + 4], 0x20);
        r[k + 4] = _mm256_permute2f128_ps(u[k], u[k + 4], 0x31);
    }
}

/* mlp_pack of a whole block of voxel-major rows (voxel i's nin features at x[(a + i) * step],
 * rows of step >= nin floats): eight voxels by eight features per transpose. The same values
 * as mlp_pack; a fine-tuning step spent about 9% of its time in mlp_pack's scalar copies. */
__attribute__((target("avx2")))
static void mlp_pack_rows_avx2(float *block, const float *x, int64_t step, int64_t a, int nin)
{
    int f0 = 0;
    for (; f0 < nin && f0 + 8 <= step; f0 += 8) {
        int rows = nin - f0 < 8 ? nin - f0 : 8;
        for (int i0 = 0; i0 < MLP_VB; i0 += 8) {
            __m256 r[8];
            for (int k = 0; k < 8; k++)
                r[k] = _mm256_loadu_ps(x + (a + i0 + k) * step + f0);
            transpose8(r);
            for (int k = 0; k < rows; k++)
                _mm256_storeu_ps(block + (int64_t)(f0 + k) * MLP_VB + i0, r[k]);
        }
    }
    for (; f0 < nin; f0++)
        for (int64_t i = 0; i < MLP_VB; i++)
            block[(int64_t)f0 * MLP_VB + i] = x[(a + i) * step + f0];
}

/* d[k] = in[k] > 0 ? d[k] : 0 (the ReLU's gradient), eight at a time. */
__attribute__((target("avx2")))
static void relu_grad_avx2(float *d, const float *in, int64_t count)
{
    const __m256 zero = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= count; k += 8) {
        __m256 live = _mm256_cmp_ps(_mm256_loadu_ps(in + k), zero, _CMP_GT_OQ);
        _mm256_storeu_ps(d + k, _mm256_and_ps(live, _mm256_loadu_ps(d + k)));
    }
    for (; k < count; k++)
        d[k] = in[k] > 0.0f ? d[k] : 0.0f;
}
#endif

static float sum8(const float *p)
{
    return ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
}

/* Floats of voxarc_train_step's workspace: activations of every layer, two gradient planes,
 * zero biases, the gradients of a block's two outputs (planar), the transposed weights,
 * the partial sums of the weight and of the bias gradients. */
int64_t voxarc_train_workspace(int32_t layers, const int32_t *size)
{
    int64_t weights = 0, units = 0;
    for (int l = 0; l < layers; l++) {
        weights += (int64_t)size[l] * size[l + 1];
        units += size[l + 1];
    }
    return (layers + 2) * (int64_t)MLP_WIDTH * MLP_VB + MLP_WIDTH + 2 * MLP_VB + 9 * weights
           + 8 * units;
}

/* One fine-tuning step's loss and gradients for the float twin (models.train.FloatPredictor,
 * ReLU hidden layers, two outputs) on n samples: x (n rows, ldx floats apart, the first
 * size[0] used), value, ref, s, lq as voxarc_laplace_bits takes them. Writes the gradients
 * of the mean bits to gw[l] (out, in, row-major like w[l]) and gb[l]; returns the sum of the
 * bits, or -1 (a layer wider than MLP_WIDTH, not two outputs, no memory). Blocks of MLP_VB
 * samples go forward and back while their activations are in L1 (torch's step writes each
 * layer's activations for the whole batch, a megabyte, and reads them back twice). Float32
 * like torch, in another order of summation: close to its gradients, not equal.
 * work: voxarc_train_workspace(layers, size) floats, on a 64-byte boundary, that the caller
 * keeps from step to step, or NULL for one of this call's own. On a cache line boundary the
 * step's vectors never straddle two lines: a step on 4096 samples took 1.62 ms with a buffer
 * 16 bytes past one and 1.37 ms aligned (Zen 3). */
double voxarc_train_step(const float *x, int64_t ldx, int64_t n, const float *value,
                         const float *ref, const float *s, const float *lq, int32_t layers,
                         const int32_t *size, const float *const *w, const float *const *b,
                         float *const *gw, float *const *gb, float unit, float scale_steps,
                         int32_t vector, float *work)
{
    mlp_run r = {.buf = NULL};
    if (layers < 1 || size[layers] != 2 || mlp_open(&r, layers, size, w, b, NULL, vector,
                                                     NULL) < 0) {
        mlp_close(&r);
        return -1.0;
    }
    int64_t weights = 0, units = 0;
    for (int l = 0; l < layers; l++) {
        weights += (int64_t)size[l] * size[l + 1];
        units += size[l + 1];
    }
    const int64_t plane = (int64_t)MLP_WIDTH * MLP_VB;
    const int64_t floats = voxarc_train_workspace(layers, size);
    float *mem = work != NULL ? work : aligned_block((size_t)floats * sizeof(float));
    if (mem == NULL) {
        mlp_close(&r);
        return -1.0;
    }
    memset(mem, 0, (size_t)floats * sizeof(float));
    float *act = mem, *dz = act + layers * plane, *dprev = dz + plane, *zero = dprev + plane;
    float *gout = zero + MLP_WIDTH, *wt = gout + 2 * MLP_VB;
    float *part = wt + weights, *bpart = part + 8 * weights;
    void (*outer)(const float *, int, const float *, int, float *, float *) = grad_outer_plain;
    int vec = 0;    /* the CPU has AVX2 and FMA (the layers chosen are not the plain ones) */
#ifdef MLP_VECTOR
    if (r.layer != mlp_layer_plain) {
        outer = grad_outer_avx2;
        vec = 1;
    }
#endif
    for (int l = 0, at = 0; l < layers; at += size[l] * size[l + 1], l++) {
        for (int o = 0; o < size[l + 1]; o++)
            for (int f = 0; f < size[l]; f++)
                wt[at + (int64_t)f * size[l + 1] + o] = w[l][(int64_t)o * size[l] + f];
    }
    double total = 0.0;
    for (int64_t a = 0; a < n; a += MLP_VB) {
        int64_t m = n - a < MLP_VB ? n - a : MLP_VB;
#ifdef MLP_VECTOR
        if (vec && m == MLP_VB)
            mlp_pack_rows_avx2(act, x, ldx, a, size[0]);
        else
#endif
            mlp_pack(act, x, 1, ldx, a, m, size[0]);
        for (int l = 0; l < layers; l++)
            r.layer(act + l * plane, MLP_VB, size[l], w[l], b[l], size[l + 1],
                    l < layers - 1 ? MLP_RELU : 0, l < layers - 1 ? act + (l + 1) * plane : dz);
#ifdef MLP_VECTOR
        if (vec)
            total += laplace_bits_planar_avx2(value + a, ref + a, s + a, lq + a, dz, dz + MLP_VB,
                                              m, unit, scale_steps, gout, gout + MLP_VB);
        else
#endif
            total += laplace_bits_planar_scalar(value + a, ref + a, s + a, lq + a, dz,
                                                dz + MLP_VB, m, unit, scale_steps, gout,
                                                gout + MLP_VB);
        for (int64_t i = 0; i < MLP_VB; i++) {
            dz[i] = i < m ? gout[i] / (float)n : 0.0f;
            dz[MLP_VB + i] = i < m ? gout[MLP_VB + i] / (float)n : 0.0f;
        }
        int64_t at = weights, bat = units;
        for (int l = layers - 1; l >= 0; l--) {
            const int nin = size[l], nout = size[l + 1];
            const float *in = act + l * plane;
            at -= (int64_t)nin * nout;
            bat -= nout;
            outer(dz, nout, in, nin, part + 8 * at, bpart + 8 * bat);
            if (l == 0)
                break;
            /* back through the weights (transposed: nin outputs of nout inputs), then ReLU */
            r.layer(dz, MLP_VB, nout, wt + at, zero, nin, 0, dprev);
#ifdef MLP_VECTOR
            if (vec)
                relu_grad_avx2(dprev, in, (int64_t)nin * MLP_VB);
            else
#endif
                for (int64_t k = 0; k < (int64_t)nin * MLP_VB; k++)
                    dprev[k] = in[k] > 0.0f ? dprev[k] : 0.0f;
            float *t = dz;
            dz = dprev;
            dprev = t;
        }
    }
    for (int l = 0, at = 0, bat = 0; l < layers; at += size[l] * size[l + 1], bat += size[l + 1],
         l++) {
        for (int64_t k = 0; k < (int64_t)size[l] * size[l + 1]; k++)
            gw[l][k] = sum8(part + 8 * (at + k));
        for (int o = 0; o < size[l + 1]; o++)
            gb[l][o] = sum8(bpart + 8 * (bat + o));
    }
    if (work == NULL)
        free(mem);
    mlp_close(&r);
    return total;
}

/* One Adam step (Kingma & Ba) on count float32 arrays in place: p[a], their gradients g[a],
 * first and second moments m[a], v[a], size[a] floats each; t is the step number (from 1).
 * What models.adapt's torch version computes, in one pass instead of eight whole-list calls
 * (a quarter of a millisecond a step, for 4k parameters). */
#ifdef MLP_VECTOR
/* adam_array's update eight floats at a time; returns how many it did (whole vectors). */
__attribute__((target("avx2")))
static int64_t adam_avx2(float *p, const float *g, float *m, float *v, int64_t n, float step,
                         float inv_c2, float beta1, float beta2, float eps)
{
    const __m256 b1 = _mm256_set1_ps(beta1), b2 = _mm256_set1_ps(beta2);
    const __m256 a1 = _mm256_set1_ps(1.0f - beta1), a2 = _mm256_set1_ps(1.0f - beta2);
    const __m256 st = _mm256_set1_ps(step), ic = _mm256_set1_ps(inv_c2), e = _mm256_set1_ps(eps);
    int64_t k = 0;
    for (; k + 8 <= n; k += 8) {
        __m256 gk = _mm256_loadu_ps(g + k);
        __m256 mk = _mm256_add_ps(_mm256_mul_ps(b1, _mm256_loadu_ps(m + k)),
                                  _mm256_mul_ps(a1, gk));
        __m256 vk = _mm256_add_ps(_mm256_mul_ps(b2, _mm256_loadu_ps(v + k)),
                                  _mm256_mul_ps(_mm256_mul_ps(a2, gk), gk));
        _mm256_storeu_ps(m + k, mk);
        _mm256_storeu_ps(v + k, vk);
        __m256 den = _mm256_add_ps(_mm256_sqrt_ps(_mm256_mul_ps(vk, ic)), e);
        _mm256_storeu_ps(p + k, _mm256_sub_ps(_mm256_loadu_ps(p + k),
                                              _mm256_div_ps(_mm256_mul_ps(st, mk), den)));
    }
    return k;
}
#endif

static void adam_array(float *restrict p, const float *restrict g, float *restrict m,
                       float *restrict v, int64_t n, float step, float inv_c2, float beta1,
                       float beta2, float eps)
{
    const float a1 = 1.0f - beta1, a2 = 1.0f - beta2;
    int64_t k = 0;
#ifdef MLP_VECTOR
    if (__builtin_cpu_supports("avx2"))
        k = adam_avx2(p, g, m, v, n, step, inv_c2, beta1, beta2, eps);
#endif
    for (; k < n; k++) {
        float mk = beta1 * m[k] + a1 * g[k];
        float vk = beta2 * v[k] + a2 * g[k] * g[k];
        m[k] = mk;
        v[k] = vk;
        p[k] -= step * mk / (__builtin_sqrtf(vk * inv_c2) + eps);
    }
}

void voxarc_adam(float *const *p, const float *const *g, float *const *m, float *const *v,
                 const int64_t *size, int32_t count, float lr, float beta1, float beta2,
                 float eps, int64_t t)
{
    const float step = (float)(lr / (1.0 - pow(beta1, (double)t)));
    const float inv_c2 = (float)(1.0 / (1.0 - pow(beta2, (double)t)));
    for (int32_t a = 0; a < count; a++)
        adam_array(p[a], g[a], m[a], v[a], size[a], step, inv_c2, beta1, beta2, eps);
}
