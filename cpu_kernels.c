/* cpu_kernels.py's C loops, compiled once a machine with -O3 -march=native and OpenMP where the
   compiler has it (cpu_kernels.build). What each one is for, and its figures: cpu_kernels.py. */
#include <stdlib.h>
#include <stdint.h>
#define TILE 64

/* matvec: y = W x for one row x, W in blocks of 32 along each row: y[r] = sum over blocks b of
   scale[b, r] * (sum_i codes[b, i, r] x[32 b + i]) + offset[b, r] * (sum_i x[32 b + i]).
   Each thread takes 64 output rows at a time, so a step reads one 64-byte line of codes per input
   value and the compiler vectorizes the loop over the 64 rows (int8 -> float, multiply-add). */
void matvec(const int8_t* codes, const float* scale, const float* offset, const float* x, float* y,
            int64_t blocks, int64_t rows, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r0 = 0; r0 < rows; r0 += TILE) {
        int64_t n = rows - r0 < TILE ? rows - r0 : TILE;
        float acc[TILE] = {0};
        for (int64_t b = 0; b < blocks; b++) {
            float dot[TILE] = {0}, xsum = 0;
            for (int64_t i = 0; i < 32; i++) {
                const int8_t* c = codes + (b * 32 + i) * rows + r0;
                float xi = x[b * 32 + i];
                xsum += xi;
                if (n == TILE)
                    for (int64_t r = 0; r < TILE; r++) dot[r] += c[r] * xi;
                else
                    for (int64_t r = 0; r < n; r++) dot[r] += c[r] * xi;
            }
            for (int64_t r = 0; r < n; r++)
                acc[r] += dot[r] * scale[b * rows + r0 + r] + offset[b * rows + r0 + r] * xsum;
        }
        for (int64_t r = 0; r < n; r++) y[r0 + r] = acc[r];
    }
}

/* Decode attention for heads of HD = 32 or 64, keys stored in tiles of 16 positions, from the
   projections on. Lane b's n_new[b] new tokens are rows start .. start + n_new[b] - 1 of q (N,
   heads, HD) and k, v (N, kv_heads, HD), at positions len[b] .. of cache row row[b]: kt (rows,
   kv_heads, tiles, HD, 16), a tile's 16 positions last, and vc (rows, kv_heads, max_len, HD): a
   lane's keys and its values are each one run of memory. Each token's q and k are rotated by its
   position's angles (cos, sin (N, HD / 2): the halves of a head rotate together), its k and v
   written into the cache, then its query s attends keys 0 .. len[b] + s: scores for 16 keys a
   vector (a lane's queries share every key it loads), softmax, then the values, into out (N,
   heads, HD). */
#if defined(__AVX512F__)
#include <immintrin.h>
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#define CHUNK 9  /* the most queries that share a pass over the keys (attend_chunk: 9 of 32, 4 of 64) */
int has_attend(void) { return 1; }

static inline __m512 exp_nonpositive(__m512 x) {  /* e^x for x <= 0: 2^n e^r, |r| <= ln2/2, degree 6 */
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* ns (<= chunk) queries of one lane and head, `stride` floats apart, at positions len .. len + ns - 1 */
static inline __attribute__((always_inline)) void attend_queries(const float* Q, const float* K, const float* V,
        float* O, int64_t stride_q, int64_t len, float* p, const int ns, const int HD) {
    int64_t n = len + ns, width = (n + 15) & ~15;  /* p: ns rows of scores */
    const float scale = HD == 32 ? 0.17677669529663687f : 0.125f;  /* 1 / sqrt(HD) */
    for (int64_t j0 = 0; j0 < n; j0 += 16) {
        __m512 acc[CHUNK];
        for (int s = 0; s < ns; s++) acc[s] = _mm512_setzero_ps();
        for (int d = 0; d < HD; d++) {  /* a tile: past the keys written, its scores are dropped below */
            __m512 keys = _mm512_loadu_ps(K + j0 * HD + d * 16);
            for (int s = 0; s < ns; s++) acc[s] = _mm512_fmadd_ps(_mm512_set1_ps(Q[s * stride_q + d]), keys, acc[s]);
        }
        for (int s = 0; s < ns; s++)
            _mm512_storeu_ps(p + s * width + j0, _mm512_mul_ps(acc[s], _mm512_set1_ps(scale)));
    }
    __m512 o[CHUNK][4];
    float total[CHUNK];
    for (int s = 0; s < ns; s++) {
        float* ps = p + s * width;
        int64_t m = len + s + 1;  /* the keys query s sees */
        for (int64_t j = m; j < width; j++) ps[j] = -INFINITY;
        __m512 top = _mm512_set1_ps(-INFINITY), sum = _mm512_setzero_ps();
        for (int64_t j = 0; j < m; j += 16) top = _mm512_max_ps(top, _mm512_loadu_ps(ps + j));
        __m512 most = _mm512_set1_ps(_mm512_reduce_max_ps(top));
        for (int64_t j = 0; j < m; j += 16) {
            __mmask16 seen = j + 16 <= m ? 0xffff : (__mmask16)((1u << (m - j)) - 1);
            __m512 e = _mm512_maskz_mov_ps(seen, exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(ps + j), most)));
            _mm512_storeu_ps(ps + j, e);
            sum = _mm512_add_ps(sum, e);
        }
        for (int64_t j = (m + 15) & ~15; j < width; j++) ps[j] = 0;  /* keys the next queries see */
        total[s] = _mm512_reduce_add_ps(sum);
        for (int c = 0; c < HD / 16; c++) o[s][c] = _mm512_setzero_ps();
    }
    for (int64_t j = 0; j < n; j++) {  /* past a query's keys its weights are 0 */
        __m512 v[4];
        for (int c = 0; c < HD / 16; c++) v[c] = _mm512_loadu_ps(V + j * HD + c * 16);
        for (int s = 0; s < ns; s++) {
            __m512 w = _mm512_set1_ps(p[s * width + j]);
            for (int c = 0; c < HD / 16; c++) o[s][c] = _mm512_fmadd_ps(w, v[c], o[s][c]);
        }
    }
    for (int s = 0; s < ns; s++) {
        __m512 inverse = _mm512_set1_ps(1.0f / total[s]);
        for (int c = 0; c < HD / 16; c++) _mm512_storeu_ps(O + s * stride_q + c * 16, _mm512_mul_ps(o[s][c], inverse));
    }
}

static inline void rotate(float* out, const float* x, const float* cos, const float* sin, int64_t hd) {
    for (int64_t c = 0; c < hd / 2; c += 16) {  /* the halves of a head rotate together */
        __m512 x1 = _mm512_loadu_ps(x + c), x2 = _mm512_loadu_ps(x + hd / 2 + c);
        __m512 co = _mm512_loadu_ps(cos + c), si = _mm512_loadu_ps(sin + c);
        _mm512_storeu_ps(out + c, _mm512_sub_ps(_mm512_mul_ps(x1, co), _mm512_mul_ps(x2, si)));
        _mm512_storeu_ps(out + hd / 2 + c, _mm512_add_ps(_mm512_mul_ps(x1, si), _mm512_mul_ps(x2, co)));
    }
}

/* a constant count of queries and head size: the sums stay in registers (9 queries of 32, 4 of 64) */
static void attend_chunk(const float* Q, const float* K, const float* V, float* O, int64_t stride, int64_t len,
                         float* p, int64_t ns, int64_t hd) {
    if (hd == 32) switch (ns) {
        case 1: attend_queries(Q, K, V, O, stride, len, p, 1, 32); break;
        case 2: attend_queries(Q, K, V, O, stride, len, p, 2, 32); break;
        case 3: attend_queries(Q, K, V, O, stride, len, p, 3, 32); break;
        case 4: attend_queries(Q, K, V, O, stride, len, p, 4, 32); break;
        case 5: attend_queries(Q, K, V, O, stride, len, p, 5, 32); break;
        case 6: attend_queries(Q, K, V, O, stride, len, p, 6, 32); break;
        case 7: attend_queries(Q, K, V, O, stride, len, p, 7, 32); break;
        case 8: attend_queries(Q, K, V, O, stride, len, p, 8, 32); break;
        default: attend_queries(Q, K, V, O, stride, len, p, 9, 32); break;
    } else switch (ns) {
        case 1: attend_queries(Q, K, V, O, stride, len, p, 1, 64); break;
        case 2: attend_queries(Q, K, V, O, stride, len, p, 2, 64); break;
        case 3: attend_queries(Q, K, V, O, stride, len, p, 3, 64); break;
        default: attend_queries(Q, K, V, O, stride, len, p, 4, 64); break;
    }
}

/* One lane's n new tokens: q (n, heads * hd), k, v (n, kv_heads * hd), cos, sin (n, hd / 2) at
   positions len ..; rotates q and k, writes k and v into the lane's cache rows (kt, vc: its first
   kv head's), attends -> out (n, heads * hd). p, rotated: scratch of CHUNK * (max_len + 16) and
   (n * heads + 1) * hd floats. */
static void attend_lane(const float* q, const float* k, const float* v, const float* cos, const float* sin,
                        float* kt, float* vc, int64_t len, int64_t n, float* out, int64_t heads, int64_t kv_heads,
                        int64_t max_len, int64_t hd, float* p, float* rotated) {
    int64_t tiles = (max_len + 15) / 16, chunk = hd == 32 ? 9 : 4;
    for (int64_t s = 0; s < n; s++) {  /* rotate, and write the cache */
        int64_t pos = len + s;
        const float *c = cos + s * hd / 2, *si = sin + s * hd / 2;
        for (int64_t h = 0; h < heads; h++)
            rotate(rotated + (s * heads + h) * hd, q + (s * heads + h) * hd, c, si, hd);
        for (int64_t h = 0; h < kv_heads; h++) {
            float* key = rotated + n * heads * hd;
            rotate(key, k + (s * kv_heads + h) * hd, c, si, hd);
            for (int64_t d = 0; d < hd; d++) kt[((h * tiles + pos / 16) * hd + d) * 16 + pos % 16] = key[d];
            for (int64_t d = 0; d < hd; d++) vc[(h * max_len + pos) * hd + d] = v[(s * kv_heads + h) * hd + d];
        }
    }
    for (int64_t h = 0; h < heads; h++) {
        int64_t g = h / (heads / kv_heads);
        const float* K = kt + g * tiles * 16 * hd;
        const float* V = vc + g * max_len * hd;
        for (int64_t s0 = 0; s0 < n; s0 += chunk) {
            int64_t ns = n - s0 < chunk ? n - s0 : chunk;
            attend_chunk(rotated + (s0 * heads + h) * hd, K, V, out + (s0 * heads + h) * hd, heads * hd, len + s0,
                         p, ns, hd);
        }
    }
}

void attend(const float* q, const float* k, const float* v, const float* cos, const float* sin, float* kt,
            float* vc, const int64_t* row, const int64_t* len, const int64_t* n_new, float* out,
            int64_t lanes, int64_t heads, int64_t kv_heads, int64_t max_len, int64_t hd, int threads) {
    int64_t* start = malloc(sizeof(int64_t) * (lanes + 1));  /* lane b's first token */
    int64_t most = 0;                                           /* the most tokens a lane has */
    int64_t tiles = (max_len + 15) / 16;
    start[0] = 0;
    for (int64_t b = 0; b < lanes; b++) {
        start[b + 1] = start[b] + n_new[b];
        most = n_new[b] > most ? n_new[b] : most;
    }
    #pragma omp parallel num_threads(threads)
    {
        float* p = malloc(sizeof(float) * CHUNK * (max_len + 16));
        float* rotated = malloc(sizeof(float) * (most * heads * hd + hd));  /* a lane's queries, then a key */
        #pragma omp for schedule(dynamic, 8)
        for (int64_t b = 0; b < lanes; b++) {
            int64_t t = start[b];
            attend_lane(q + t * heads * hd, k + t * kv_heads * hd, v + t * kv_heads * hd, cos + t * hd / 2,
                        sin + t * hd / 2, kt + row[b] * kv_heads * tiles * 16 * hd, vc + row[b] * kv_heads * max_len * hd,
                        len[b], n_new[b], out + t * heads * hd, heads, kv_heads, max_len, hd, p, rotated);
        }
        free(p);
        free(rotated);
    }
    free(start);
}

/* The rest of a decode pass, as model.py's rms_norm, add_rms_norm and swiglu compute it: rows of
   C values, one thread a row; silu with the polynomial e^x above. */
static inline float scale_of(const float* x, int64_t C, float eps) {
    __m512 sum = _mm512_setzero_ps();
    for (int64_t c = 0; c < C; c += 16) {
        __mmask16 in = c + 16 <= C ? 0xffff : (__mmask16)((1u << (C - c)) - 1);
        __m512 v = _mm512_maskz_loadu_ps(in, x + c);
        sum = _mm512_fmadd_ps(v, v, sum);
    }
    return 1.0f / sqrtf(_mm512_reduce_add_ps(sum) / C + eps);
}

static inline void scale_row(const float* x, const float* w, float scale, float* out, int64_t C) {
    for (int64_t c = 0; c < C; c += 16) {
        __mmask16 in = c + 16 <= C ? 0xffff : (__mmask16)((1u << (C - c)) - 1);
        __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(in, x + c), _mm512_set1_ps(scale));
        _mm512_mask_storeu_ps(out + c, in, _mm512_mul_ps(v, _mm512_maskz_loadu_ps(in, w + c)));
    }
}

void rms_norm(const float* x, const float* w, float eps, float* out, int64_t N, int64_t C, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads) if(N * C > 32768)
    for (int64_t n = 0; n < N; n++) scale_row(x + n * C, w, scale_of(x + n * C, C, eps), out + n * C, C);
}

void add_rms_norm(const float* x, const float* r, const float* w, float eps, float* sum, float* out, int64_t N,
                  int64_t C, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads) if(N * C > 32768)
    for (int64_t n = 0; n < N; n++) {
        float* row = sum + n * C;
        for (int64_t c = 0; c < C; c++) row[c] = x[n * C + c] + r[n * C + c];
        scale_row(row, w, scale_of(row, C, eps), out + n * C, C);
    }
}

static inline void swiglu_at(const float* a, const float* b, float* out, int64_t i, int64_t n) {
    __mmask16 in = i + 16 <= n ? 0xffff : (__mmask16)((1u << (n - i)) - 1);
    __m512 x = _mm512_maskz_loadu_ps(in, a + i);
    __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(x)));  /* e^-|x| */
    __mmask16 negative = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
    __m512 top = _mm512_mask_mul_ps(x, negative, x, e);  /* silu(x) = x / (1 + e^-x) = x e^x / (1 + e^x) */
    __m512 silu = _mm512_div_ps(top, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
    _mm512_mask_storeu_ps(out + i, in, _mm512_mul_ps(silu, _mm512_maskz_loadu_ps(in, b + i)));
}

void swiglu(const float* a, const float* b, float* out, int64_t n, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads) if(n > 32768)
    for (int64_t i = 0; i < n; i += 16) swiglu_at(a, b, out, i, n);
}

/* Each row's index of its largest value: the first of equal ones, or the first NaN (torch.argmax's). */
void argmax_rows(const float* x, int64_t* out, int64_t N, int64_t C, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads) if(N * C > 65536)
    for (int64_t n = 0; n < N; n++) {
        const float* row = x + n * C;
        __m512 top = _mm512_set1_ps(-INFINITY);
        __mmask16 nan = 0;
        for (int64_t c = 0; c < C; c += 16) {
            __mmask16 in = c + 16 <= C ? 0xffff : (__mmask16)((1u << (C - c)) - 1);
            __m512 v = _mm512_mask_loadu_ps(top, in, row + c);
            nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
            top = _mm512_max_ps(top, v);
        }
        int64_t at = 0;
        if (nan)
            while (row[at] == row[at]) at++;
        else {
            __m512 most = _mm512_set1_ps(_mm512_reduce_max_ps(top));
            for (int64_t c = 0; c < C; c += 16) {
                __mmask16 in = c + 16 <= C ? 0xffff : (__mmask16)((1u << (C - c)) - 1);
                __mmask16 hit = _mm512_mask_cmp_ps_mask(in, _mm512_maskz_loadu_ps(in, row + c), most, _CMP_EQ_OQ);
                if (hit) { at = c + __builtin_ctz(hit); break; }
            }
        }
        out[n] = at;
    }
}

/* y (M, N) = x (M, K) W^T, W (N, K) as nn.Linear keeps it, K a multiple of 16, in chunks of 64 rows of
   x: the weight's rows are read once a chunk, 4 at a time, each against MB rows of x, the 4 x MB
   sums in registers along K and added across their 16 lanes at the end. (A prefetch past a
   weight's end does not fault.) */
static inline __attribute__((always_inline)) void rows_times_weights(const float* x, const float* w, float* y,
        int64_t N, int64_t K, const int MB, const int NB) {
    __m512 acc[6][4];
    for (int i = 0; i < MB; i++) for (int j = 0; j < NB; j++) acc[i][j] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
        __m512 wv[4];
        for (int j = 0; j < NB; j++) {
            wv[j] = _mm512_loadu_ps(w + j * K + k);
            _mm_prefetch((const char*)(w + (j + 4) * K + k), _MM_HINT_T1);  /* the next 4 rows, into L2: ~10% faster
                                                                                    than none, or than into L1, where they crowd out these */
        }
        for (int i = 0; i < MB; i++) {
            __m512 xv = _mm512_loadu_ps(x + i * K + k);
            __asm__("" : "+v"(xv));  /* in a register: else gcc reloads it for each product, 28 loads a step
                                       not 10, and the loop runs ~1.5x slower */
            for (int j = 0; j < NB; j++) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
        }
    }
    if (NB == 4)
        for (int i = 0; i < MB; i++) {  /* a row's 4 sums of 16 lanes -> 4 floats in one tree */
            __m512 s01 = _mm512_add_ps(_mm512_unpacklo_ps(acc[i][0], acc[i][1]), _mm512_unpackhi_ps(acc[i][0], acc[i][1]));
            __m512 s23 = _mm512_add_ps(_mm512_unpacklo_ps(acc[i][2], acc[i][3]), _mm512_unpackhi_ps(acc[i][2], acc[i][3]));
            __m512d lo = _mm512_unpacklo_pd(_mm512_castps_pd(s01), _mm512_castps_pd(s23));
            __m512d hi = _mm512_unpackhi_pd(_mm512_castps_pd(s01), _mm512_castps_pd(s23));
            __m512 t = _mm512_add_ps(_mm512_castpd_ps(lo), _mm512_castpd_ps(hi));  /* 4 lanes of 128 bits */
            __m256 half = _mm256_add_ps(_mm512_castps512_ps256(t), _mm512_extractf32x8_ps(t, 1));
            _mm_storeu_ps(y + i * N, _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1)));
        }
    else
        for (int i = 0; i < MB; i++) for (int j = 0; j < NB; j++) y[i * N + j] = _mm512_reduce_add_ps(acc[i][j]);
}

void linear_rows(const float* x, const float* w, float* y, int64_t M, int64_t N, int64_t K, int threads) {
    #pragma omp parallel num_threads(threads)
    for (int64_t c0 = 0; c0 < M; c0 += 64) {  /* every thread walks the chunks; each splits the weight */
        int64_t rows = M - c0 < 64 ? M - c0 : 64, blocks = (rows + 5) / 6;
        #pragma omp for schedule(static)
        for (int64_t n0 = 0; n0 < N; n0 += 4) {
            /* blocks of rows as even as may be: 32 rows as 6 6 5 5 5 5, not 6 6 6 6 6 2 */
            for (int64_t b = 0, m0 = c0; b < blocks; b++) {
                int mb = (int)((c0 + rows - m0 + blocks - b - 1) / (blocks - b));
                const float* xs = x + m0 * K;
                const float* ws = w + n0 * K;
                float* ys = y + m0 * N + n0;
                m0 += mb;
                if (N - n0 < 4)  /* the last weight rows, one at a time */
                    for (int64_t j = 0; j < N - n0; j++)
                        for (int i = 0; i < mb; i++) rows_times_weights(xs + i * K, ws + j * K, ys + i * N + j, N, K, 1, 1);
                else switch (mb) {  /* a constant count: the sums stay in registers */
                    case 1: rows_times_weights(xs, ws, ys, N, K, 1, 4); break;
                    case 2: rows_times_weights(xs, ws, ys, N, K, 2, 4); break;
                    case 3: rows_times_weights(xs, ws, ys, N, K, 3, 4); break;
                    case 4: rows_times_weights(xs, ws, ys, N, K, 4, 4); break;
                    case 5: rows_times_weights(xs, ws, ys, N, K, 5, 4); break;
                    default: rows_times_weights(xs, ws, ys, N, K, 6, 4); break;
                }
            }
        }
    }
}

/* y (T, N) = x (T, K) wt (K, N), or y + that with add (a residual), for the small weights of the
   paper's models, transposed (in, out) and in the CPU's caches: 6 rows x 64 columns of sums stay
   in registers along K, nothing to add across lanes at the end. N a multiple of 16. */
static inline __attribute__((always_inline)) void rows_times_columns(const float* x, const float* wt, float* y,
        int64_t N, int64_t K, int add, const int MB, const int NV) {
    __m512 acc[6][4];
    for (int i = 0; i < MB; i++) for (int j = 0; j < NV; j++) acc[i][j] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k++) {
        __m512 wv[4];
        for (int j = 0; j < NV; j++) wv[j] = _mm512_loadu_ps(wt + k * N + j * 16);
        for (int i = 0; i < MB; i++) {
            __m512 xv = _mm512_set1_ps(x[i * K + k]);
            __asm__("" : "+v"(xv));  /* one broadcast for NV products (see rows_times_weights) */
            for (int j = 0; j < NV; j++) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
        }
    }
    for (int i = 0; i < MB; i++)
        for (int j = 0; j < NV; j++) {
            float* out = y + i * N + j * 16;
            _mm512_storeu_ps(out, add ? _mm512_add_ps(_mm512_loadu_ps(out), acc[i][j]) : acc[i][j]);
        }
}

#define ROWS_TIMES_COLUMNS(NV) switch (mb) { \
    case 1: rows_times_columns(xs, ws, ys, N, K, add, 1, NV); break; \
    case 2: rows_times_columns(xs, ws, ys, N, K, add, 2, NV); break; \
    case 3: rows_times_columns(xs, ws, ys, N, K, add, 3, NV); break; \
    case 4: rows_times_columns(xs, ws, ys, N, K, add, 4, NV); break; \
    case 5: rows_times_columns(xs, ws, ys, N, K, add, 5, NV); break; \
    default: rows_times_columns(xs, ws, ys, N, K, add, 6, NV); break; }

/* The keys and values a group of lanes reads in one layer: runs of memory that small_product fetches
   into L2 a few lines at a time, between its products. At 1024 lanes a step reads ~105 MB of cache
   from memory; this way it arrives while the products before the attention run. */
typedef struct { const char** at; int64_t* left; int64_t runs, next, per_product; } Fetch;

static void plan_fetch(Fetch* f, const float* kt, const float* vc, const int64_t* row, const int64_t* len,
                       const int64_t* n_new, int64_t b0, int64_t b1, int64_t kv_heads, int64_t max_len,
                       int64_t hd, int64_t products) {
    int64_t tiles = (max_len + 15) / 16, bytes = 0;
    f->runs = f->next = 0;
    for (int64_t b = b0; b < b1; b++)
        for (int64_t h = 0; h < kv_heads; h++) {
            int64_t at = row[b] * kv_heads + h, m = len[b] + n_new[b];
            f->at[f->runs] = (const char*)(kt + at * tiles * 16 * hd);
            bytes += f->left[f->runs++] = (m + 15) / 16 * 16 * hd * 4;
            f->at[f->runs] = (const char*)(vc + at * max_len * hd);
            bytes += f->left[f->runs++] = m * hd * 4;
        }
    f->per_product = bytes / 64 / (products > 0 ? products : 1) + 1;  /* a group of lanes given no tokens: none */
}

static inline void fetch_some(Fetch* f) {
    for (int64_t n = f->per_product; n > 0 && f->next < f->runs; ) {
        if (f->left[f->next] <= 0) { f->next++; continue; }
        _mm_prefetch(f->at[f->next], _MM_HINT_T1);
        f->at[f->next] += 64, f->left[f->next] -= 64, n--;
    }
}

/* y (+)= x wt over T rows, a fetch's share of lines after each 6 rows x 64 columns (f: or none) */
static void small_product(const float* x, const float* wt, float* y, int64_t T, int64_t N, int64_t K, int add,
                          Fetch* f) {
    for (int64_t n0 = 0; n0 < N; n0 += 64)  /* 64 columns of the weight stay in L1 over the rows */
        for (int64_t m0 = 0; m0 < T; m0 += 6) {
            int mb = T - m0 < 6 ? T - m0 : 6, nv = N - n0 < 64 ? (N - n0) / 16 : 4;
            const float* xs = x + m0 * K;
            const float* ws = wt + n0;
            float* ys = y + m0 * N + n0;
            if (nv == 4) ROWS_TIMES_COLUMNS(4) else if (nv == 3) ROWS_TIMES_COLUMNS(3)
            else if (nv == 2) ROWS_TIMES_COLUMNS(2) else ROWS_TIMES_COLUMNS(1)
            if (f) fetch_some(f);
        }
}

/* A decode step's blocks for a model whose weights all fit in the CPU's caches (the paper's): x
   (N, C), the new tokens lane by lane, in place. Each thread takes a group of lanes of ~GROUP
   tokens through every block, as model.py's Block computes it (norm, q k v, attention, o,
   residual, norm, SwiGLU MLP, residual): a group's rows stay in its caches throughout, no
   thread waits for another, and no call returns to Python between layers. weights: 9 a layer
   (attention norm, q k v o transposed, MLP norm, gate up down transposed); kt, vc: each layer's
   caches, as attend keeps them. heads * hd == C; C, hidden, kv_heads * hd multiples of 16. */
#define GROUP 48
void decode_blocks(float* x, const float* cos, const float* sin, const float* const* weights, float* const* kt,
                   float* const* vc, const int64_t* row, const int64_t* len, const int64_t* n_new, int64_t lanes,
                   int64_t layers, int64_t C, int64_t heads, int64_t kv_heads, int64_t hd, int64_t hidden,
                   int64_t max_len, float eps, int threads) {
    int64_t* start = malloc(sizeof(int64_t) * (lanes + 1));  /* lane b's first token */
    int64_t* first = malloc(sizeof(int64_t) * (lanes + 1));  /* group g's first lane */
    int64_t groups = 0, most = 0, rows = 0, kvc = kv_heads * hd, tiles = (max_len + 15) / 16;
    start[0] = 0;
    for (int64_t b = 0; b < lanes; b++) {
        start[b + 1] = start[b] + n_new[b];
        most = n_new[b] > most ? n_new[b] : most;
        if (groups == 0 || start[b] - start[first[groups - 1]] >= GROUP) first[groups++] = b;
    }
    first[groups] = lanes;
    for (int64_t g = 0; g < groups; g++)  /* the most tokens a group has */
        rows = start[first[g + 1]] - start[first[g]] > rows ? start[first[g + 1]] - start[first[g]] : rows;
    #pragma omp parallel num_threads(threads)
    {
        float* h = malloc(sizeof(float) * (rows * (3 * C + 2 * kvc + 2 * hidden) + CHUNK * (max_len + 16)
                                           + (most * heads + 1) * hd));
        float *q = h + rows * C, *k = q + rows * C, *v = k + rows * kvc, *att = v + rows * kvc;
        float *gate = att + rows * C, *up = gate + rows * hidden, *p = up + rows * hidden;
        float* rotated = p + CHUNK * (max_len + 16);
        Fetch f = {malloc(sizeof(char*) * 2 * kv_heads * lanes), malloc(sizeof(int64_t) * 2 * kv_heads * lanes), 0, 0, 0};
#ifdef _OPENMP
        int64_t team = omp_get_num_threads();
#else
        int64_t team = 1;
#endif
        #pragma omp for schedule(static, 1)  /* a thread's next group is g + team: fetched ahead */
        for (int64_t g = 0; g < groups; g++) {
            int64_t t0 = start[first[g]], T = start[first[g + 1]] - t0, blocks = (T + 5) / 6;
            int64_t qkv = blocks * ((C + 63) / 64 + 2 * ((kvc + 63) / 64)), mlp = blocks * (2 * ((hidden + 63) / 64) + (C + 63) / 64);
            float* xs = x + t0 * C;
            if (g < team)  /* a thread's first group: its first layer's cache comes during the q k v products */
                plan_fetch(&f, kt[0], vc[0], row, len, n_new, first[g], first[g + 1], kv_heads, max_len, hd, qkv);
            for (int64_t l = 0; l < layers; l++) {
                const float* const* w = weights + 9 * l;
                Fetch* now = l == 0 && g < team ? &f : NULL;
                for (int64_t t = 0; t < T; t++) scale_row(xs + t * C, w[0], scale_of(xs + t * C, C, eps), h + t * C, C);
                small_product(h, w[1], q, T, C, C, 0, now);
                small_product(h, w[2], k, T, kvc, C, 0, now);
                small_product(h, w[3], v, T, kvc, C, 0, now);
                for (int64_t b = first[g]; b < first[g + 1]; b++) {
                    int64_t s = start[b] - t0;
                    attend_lane(q + s * C, k + s * kvc, v + s * kvc, cos + (t0 + s) * hd / 2, sin + (t0 + s) * hd / 2,
                                kt[l] + row[b] * kv_heads * tiles * 16 * hd, vc[l] + row[b] * kv_heads * max_len * hd,
                                len[b], n_new[b], att + s * C, heads, kv_heads, max_len, hd, p, rotated);
                }
                small_product(att, w[4], xs, T, C, C, 1, NULL);
                /* the cache read next, fetched during the MLP: this group's next layer, or the first
                   layer of this thread's next group */
                now = &f;
                if (l + 1 < layers)
                    plan_fetch(&f, kt[l + 1], vc[l + 1], row, len, n_new, first[g], first[g + 1], kv_heads, max_len, hd, mlp);
                else if (g + team < groups)
                    plan_fetch(&f, kt[0], vc[0], row, len, n_new, first[g + team], first[g + team + 1], kv_heads, max_len,
                               hd, mlp);
                else
                    now = NULL;
                for (int64_t t = 0; t < T; t++) scale_row(xs + t * C, w[5], scale_of(xs + t * C, C, eps), h + t * C, C);
                small_product(h, w[6], gate, T, hidden, C, 0, now);
                small_product(h, w[7], up, T, hidden, C, 0, now);
                for (int64_t i = 0; i < T * hidden; i += 16) swiglu_at(gate, up, gate, i, T * hidden);
                small_product(gate, w[8], xs, T, C, hidden, 1, now);
            }
        }
        free(f.at);
        free(f.left);
        free(h);
    }
    free(start);
    free(first);
}
#else
int has_attend(void) { return 0; }
#endif
