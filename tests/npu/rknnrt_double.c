/* A test double of librknnrt's matmul API (SDK 2.x ABI), written independently of npulm's emulator: plain loops,
 * element by element, so the ctypes binding can be exercised and cross-checked on machines without an NPU.
 *
 * Implements matmul types 1, 2, 4 and 10, normal / native / transposed-normal layouts, K-segmented native B,
 * dynamic shapes, core masks, memories (incl. fd imports), quant-param validation and the SDK version query.
 * Chip rules come from $RKNN_DOUBLE_CHIP (rk3588 default, rk3576, rk3568, rk3562).
 * int4 nibbles: the even element sits in the low nibble in normal layouts and native A, in the high nibble in
 * native B (npulm's default NibbleOrder). INT16 results saturate.
 *
 * Build: cc -shared -fPIC -O1 -o librknnrt.so rknnrt_double.c
 *   -DDOUBLE_SDK_1_6             report SDK 1.6.0 (for the version refusal test)
 *   -DDOUBLE_NO_VERSION_STRING   leave the version string out of the binary (version only via rknn_query)
 *   -DDOUBLE_SDK_2_0             report SDK 2.0.0b0, with its rknn_B_normal_layout_to_native_layout(B_in, B_out, K, N,
 *                                subN, subK, type) (2.1 replaced the last three by a rknn_matmul_info *)
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef DOUBLE_SDK_1_6
#define SDK_VERSION "1.6.0"
#elif defined(DOUBLE_SDK_2_0)
#define SDK_VERSION "2.0.0b0"
#else
#define SDK_VERSION "2.3.2"
#endif

#ifndef DOUBLE_NO_VERSION_STRING
__attribute__((used)) const char rknn_double_version_string[] = "librknnrt version: " SDK_VERSION " (test double)";
#endif

typedef uint64_t rknn_context;

typedef struct {
    void *virt_addr;
    uint64_t phys_addr;
    int32_t fd;
    int32_t offset;
    uint32_t size;
    uint32_t flags;
    void *priv_data;
} rknn_tensor_mem;

typedef struct {
    char name[256];
    float *scale;
    int32_t scale_len;
    int32_t *zp;
    int32_t zp_len;
} rknn_quant_params;

typedef struct {
    char name[256];
    uint32_t n_dims;
    uint32_t dims[16];
    uint32_t size;
    int type;
} rknn_matmul_tensor_attr;

typedef struct {
    rknn_matmul_tensor_attr A, B, C;
} rknn_matmul_io_attr;

typedef struct {
    int32_t M, K, N;
} rknn_matmul_shape;

typedef struct {
    int32_t M, K, N;
    int type;
    int16_t B_layout, B_quant_type, AC_layout, AC_quant_type;
    int32_t iommu_domain_id;
    int16_t group_size;
    int8_t reserved[34];
} rknn_matmul_info;

typedef struct {
    char api_version[256];
    char drv_version[256];
} rknn_sdk_version;

_Static_assert(sizeof(rknn_matmul_info) == 64, "info");
_Static_assert(sizeof(rknn_matmul_tensor_attr) == 332, "tensor attr");
_Static_assert(sizeof(rknn_matmul_io_attr) == 996, "io attr");
_Static_assert(sizeof(rknn_tensor_mem) == 40, "mem");
_Static_assert(sizeof(rknn_quant_params) == 288, "quant params");

enum { E_FAIL = -1, E_MALLOC = -4, E_PARAM = -5, E_CTX = -7, E_INPUT = -8, E_OUTPUT = -9 };
enum { T_FP32 = 0, T_FP16 = 1, T_INT8 = 2, T_INT16 = 4, T_INT32 = 6, T_INT4 = 10 };
enum { D_FP16, D_INT8, D_INT4 }; /* input element kinds, index into the chip tables */

/* ------------------------------------------------------------------------------------------------- chips */

typedef struct {
    const char *name;
    unsigned types;            /* bit t set: matmul type t accepted */
    int k_align_bytes[3];      /* by D_* */
    int n_align_bytes[3];
    int a_tile[3];
    int b_tile_n[3], b_tile_k[3];
    int c_tile, c_tile_int16;
    int split_k;               /* 0: B never segmented */
    unsigned core_masks_ok;    /* bit i set: mask i accepted (masks < 32), plus 0xffff if any */
    int cores;
} chip_t;

static const chip_t CHIPS[] = {
    {"rk3588", (1u << 1) | (1u << 2) | (1u << 4) | (1u << 10), {32, 32, 32}, {16, 32, 64}, {8, 16, 32},
     {16, 32, 64}, {32, 32, 32}, 4, 8, 8192, (1u << 0) | (1u << 1) | (1u << 2) | (1u << 4) | (1u << 3) | (1u << 7), 3},
    {"rk3576", (1u << 1) | (1u << 2) | (1u << 4), {32, 32, 32}, {16, 32, 64}, {8, 16, 32},
     {16, 32, 64}, {32, 32, 32}, 4, 4, 4096, (1u << 0) | (1u << 1) | (1u << 2) | (1u << 3), 2},
    {"rk3568", (1u << 1) | (1u << 2), {16, 32, 0}, {8, 16, 0}, {4, 8, 0}, {8, 16, 0}, {16, 32, 0}, 4, 4, 0, 0, 1},
    {"rk3562", (1u << 1) | (1u << 2), {32, 32, 0}, {8, 16, 0}, {8, 16, 0}, {8, 16, 0}, {32, 32, 0}, 4, 4, 0, 0, 1},
};

static const chip_t *current_chip(void) {
    const char *name = getenv("RKNN_DOUBLE_CHIP");
    if (name && (!strcmp(name, "rk3566"))) name = "rk3568";
    if (name && (!strcmp(name, "rk3588s"))) name = "rk3588";
    for (size_t i = 0; name && i < sizeof CHIPS / sizeof CHIPS[0]; i++)
        if (!strcmp(CHIPS[i].name, name)) return &CHIPS[i];
    return &CHIPS[0];
}

static int a_kind(int type) { return type == 10 ? D_INT4 : type == 2 ? D_INT8 : D_FP16; }
static int c_ttype(int type) { return type == 1 ? T_FP32 : type == 2 ? T_INT32 : type == 4 ? T_FP16 : T_INT16; }
static int kind_bits(int kind) { return kind == D_FP16 ? 16 : kind == D_INT8 ? 8 : 4; }
static int ttype_bits(int t) { return t == T_FP32 || t == T_INT32 ? 32 : t == T_FP16 || t == T_INT16 ? 16 : 8; }
static int kind_ttype(int kind) { return kind == D_FP16 ? T_FP16 : kind == D_INT8 ? T_INT8 : T_INT4; }
static int ceil_to(int x, int m) { return (x + m - 1) / m * m; }

/* ------------------------------------------------------------------------------------------------- memories */

#define MAX_ALLOCS 4096
#define MAX_ALLOC_BYTES (2ull << 30)
#define DOMAIN_BYTES (4ull << 30)

typedef struct {
    int fd, alive, domain;
    uint8_t *data;
    uint64_t size;
} alloc_t;

static alloc_t allocs[MAX_ALLOCS];
static int next_fd = 500;
static uint64_t domain_used[16];

/* ------------------------------------------------------------------------------------------------- contexts */

#define MAX_CTX 1024
#define MAX_SHAPES 16

typedef struct {
    int used;
    const chip_t *chip;
    rknn_matmul_info info;
    int n_shapes, cur;
    rknn_matmul_shape shapes[MAX_SHAPES];
    rknn_matmul_io_attr ios[MAX_SHAPES];
    int core_mask;
    rknn_tensor_mem *mem[3];
} ctx_t;

static ctx_t ctxs[MAX_CTX];

static ctx_t *get_ctx(rknn_context h) {
    if (h < 1 || h > MAX_CTX || !ctxs[h - 1].used) return NULL;
    return &ctxs[h - 1];
}

static void set_attr(rknn_matmul_tensor_attr *a, const char *name, int n, const uint32_t *dims, uint64_t elems,
                     int ttype) {
    memset(a, 0, sizeof *a);
    strcpy(a->name, name);
    a->n_dims = n;
    for (int i = 0; i < n; i++) a->dims[i] = dims[i];
    a->size = (uint32_t)(elems * (ttype == T_INT4 ? 4 : ttype_bits(ttype)) / 8);
    a->type = ttype;
}

static uint64_t b_native_elems(const chip_t *c, int kind, int K, int N) {
    int sn = c->b_tile_n[kind], sk = c->b_tile_k[kind];
    uint64_t total = 0;
    int split = c->split_k && K > c->split_k ? c->split_k : K;
    for (int s = 0; s < K; s += split) {
        int len = K - s < split ? K - s : split;
        total += (uint64_t)ceil_to(N, sn) * ceil_to(len, sk);
    }
    return total;
}

/* Validate one shape and fill its io_attr; the same rules as npulm's emulator. */
static int check_shape(const chip_t *c, const rknn_matmul_info *info, int M, int K, int N, rknn_matmul_io_attr *io) {
    int t = info->type;
    if (t < 0 || t > 31 || !(c->types & (1u << t))) return E_PARAM;
    if (M < 1 || K < 1 || N < 1 || K > 10240) return E_PARAM;
    int ak = a_kind(t), bk = ak; /* types 1, 2, 4, 10 have equal A and B element types */
    int k_align = c->k_align_bytes[ak] * 8 / kind_bits(ak);
    int n_align = c->n_align_bytes[bk] * 8 / kind_bits(bk);
    if (K % k_align || N % n_align) return E_PARAM;
    if (info->B_layout < 0 || info->B_layout > 2 || info->AC_layout < 0 || info->AC_layout > 1) return E_PARAM;
    if (bk == D_INT4 && info->B_layout != 1) return E_PARAM;
    if (info->AC_quant_type != 0 || info->B_quant_type < 0 || info->B_quant_type > 5) return E_PARAM;
    if (info->B_quant_type && bk == D_FP16) return E_PARAM;
    if ((info->B_quant_type == 4 || info->B_quant_type == 5) && (info->group_size <= 0 || K % info->group_size))
        return E_PARAM;
    if (info->iommu_domain_id < 0 || info->iommu_domain_id >= 16) return E_PARAM;

    int ct = c_ttype(t);
    uint32_t d[4];
    if (info->AC_layout == 1) {
        int sk = c->a_tile[ak], kp = ceil_to(K, sk);
        d[0] = kp / sk; d[1] = M; d[2] = sk;
        set_attr(&io->A, "A", 3, d, (uint64_t)kp * M, kind_ttype(ak));
        int sc = ct == T_INT16 ? c->c_tile_int16 : c->c_tile, np_ = ceil_to(N, sc);
        d[0] = np_ / sc; d[1] = M; d[2] = sc;
        set_attr(&io->C, "C", 3, d, (uint64_t)np_ * M, ct);
    } else {
        d[0] = M; d[1] = K;
        set_attr(&io->A, "A", 2, d, (uint64_t)M * K, kind_ttype(ak));
        d[0] = M; d[1] = N;
        set_attr(&io->C, "C", 2, d, (uint64_t)M * N, ct);
    }
    if (info->B_layout == 1) {
        int sn = c->b_tile_n[bk], sk = c->b_tile_k[bk];
        d[0] = ceil_to(N, sn) / sn; d[1] = ceil_to(K, sk) / sk; d[2] = sn; d[3] = sk;
        set_attr(&io->B, "B", 4, d, b_native_elems(c, bk, K, N), kind_ttype(bk));
    } else if (info->B_layout == 2) {
        d[0] = N; d[1] = K;
        set_attr(&io->B, "B", 2, d, (uint64_t)N * K, kind_ttype(bk));
    } else {
        d[0] = K; d[1] = N;
        set_attr(&io->B, "B", 2, d, (uint64_t)K * N, kind_ttype(bk));
    }
    return 0;
}

static int new_ctx(rknn_context *out, const chip_t *c, const rknn_matmul_info *info, int n,
                   const rknn_matmul_shape *shapes, const rknn_matmul_io_attr *ios) {
    for (int i = 0; i < MAX_CTX; i++) {
        if (ctxs[i].used) continue;
        memset(&ctxs[i], 0, sizeof ctxs[i]);
        ctxs[i].used = 1;
        ctxs[i].chip = c;
        ctxs[i].info = *info;
        ctxs[i].n_shapes = n;
        memcpy(ctxs[i].shapes, shapes, n * sizeof *shapes);
        memcpy(ctxs[i].ios, ios, n * sizeof *ios);
        *out = i + 1;
        return 0;
    }
    return E_MALLOC;
}

int rknn_matmul_create(rknn_context *ctx, rknn_matmul_info *info, rknn_matmul_io_attr *io_attr) {
    if (!ctx || !info || !io_attr) return E_PARAM;
    const chip_t *c = current_chip();
    int r = check_shape(c, info, info->M, info->K, info->N, io_attr);
    if (r) return r;
    rknn_matmul_shape s = {info->M, info->K, info->N};
    return new_ctx(ctx, c, info, 1, &s, io_attr);
}

int rknn_matmul_create_dynamic_shape(rknn_context *ctx, rknn_matmul_info *info, int shape_num,
                                     rknn_matmul_shape shapes[], rknn_matmul_io_attr io_attrs[]) {
    if (!ctx || !info || shape_num < 1 || shape_num > MAX_SHAPES) return E_PARAM;
    const chip_t *c = current_chip();
    for (int i = 0; i < shape_num; i++) {
        if (shapes[i].K != shapes[0].K || shapes[i].N != shapes[0].N) return E_PARAM;
        int r = check_shape(c, info, shapes[i].M, shapes[i].K, shapes[i].N, &io_attrs[i]);
        if (r) return r;
    }
    return new_ctx(ctx, c, info, shape_num, shapes, io_attrs);
}

int rknn_matmul_set_dynamic_shape(rknn_context h, rknn_matmul_shape *shape) {
    ctx_t *c = get_ctx(h);
    if (!c) return E_CTX;
    for (int i = 0; i < c->n_shapes; i++)
        if (c->shapes[i].M == shape->M && c->shapes[i].K == shape->K && c->shapes[i].N == shape->N) {
            c->cur = i;
            return 0;
        }
    return E_PARAM;
}

int rknn_matmul_set_core_mask(rknn_context h, int mask) {
    ctx_t *c = get_ctx(h);
    if (!c) return E_CTX;
    if (c->chip->cores == 1) return E_FAIL;
    if (mask == 0xffff || (mask >= 0 && mask < 32 && (c->chip->core_masks_ok & (1u << mask)))) {
        c->core_mask = mask;
        return 0;
    }
    return E_PARAM;
}

static int which_tensor(const ctx_t *c, const char *name) {
    const rknn_matmul_io_attr *io = &c->ios[c->cur];
    if (!strncmp(name, io->A.name, 256)) return 0;
    if (!strncmp(name, io->B.name, 256)) return 1;
    if (!strncmp(name, io->C.name, 256)) return 2;
    return -1;
}

int rknn_matmul_set_quant_params(rknn_context h, rknn_quant_params *p) {
    ctx_t *c = get_ctx(h);
    if (!c) return E_CTX;
    int w = which_tensor(c, p->name);
    if (w < 0) return E_PARAM;
    int K = c->shapes[c->cur].K, N = c->shapes[c->cur].N, want = 1, q = c->info.B_quant_type;
    if (w == 1 && (q == 2 || q == 3)) want = N;
    if (w == 1 && (q == 4 || q == 5)) want = N * (K / c->info.group_size);
    if (p->scale_len != want || (p->zp_len != 0 && p->zp_len != want)) return E_PARAM;
    return 0; /* types 1, 2, 4, 10 emit raw sums: scales do not change C */
}

int rknn_matmul_get_quant_params(rknn_context h, rknn_quant_params *p, float *scale) {
    (void)p; (void)scale;
    return get_ctx(h) ? E_FAIL : E_CTX;
}

int rknn_matmul_set_io_mem(rknn_context h, rknn_tensor_mem *mem, rknn_matmul_tensor_attr *attr) {
    ctx_t *c = get_ctx(h);
    if (!c) return E_CTX;
    if (!mem || !attr) return E_PARAM;
    int w = which_tensor(c, attr->name);
    if (w < 0) return E_PARAM;
    const rknn_matmul_tensor_attr *want = w == 0 ? &c->ios[c->cur].A : w == 1 ? &c->ios[c->cur].B : &c->ios[c->cur].C;
    if (mem->size < want->size) return E_PARAM;
    c->mem[w] = mem;
    return 0;
}

int rknn_matmul_destroy(rknn_context h) {
    ctx_t *c = get_ctx(h);
    if (!c) return E_CTX;
    c->used = 0;
    return 0;
}

/* ------------------------------------------------------------------------------------------------- elements */

static double load(const uint8_t *p, int ttype, uint64_t idx, int high_first) {
    switch (ttype) {
    case T_FP16: return (double)((const _Float16 *)p)[idx];
    case T_INT8: return ((const int8_t *)p)[idx];
    case T_INT4: {
        uint8_t byte = p[idx / 2];
        int even = (idx % 2) == 0;
        int nib = (even != !!high_first) ? (byte & 15) : (byte >> 4); /* low nibble for even iff low-first */
        return nib >= 8 ? nib - 16 : nib;
    }
    }
    return 0;
}

static void store_int4(uint8_t *p, uint64_t idx, int v, int high_first) {
    int even = (idx % 2) == 0, low = even != !!high_first;
    uint8_t nib = (uint8_t)(v & 15);
    p[idx / 2] = low ? (uint8_t)((p[idx / 2] & 0xF0) | nib) : (uint8_t)((p[idx / 2] & 0x0F) | (nib << 4));
}

/* Element index of B[k][n] in native layout, K-segments included. */
static uint64_t b_native_index(const chip_t *c, int kind, int K, int N, int k, int n) {
    int sn = c->b_tile_n[kind], sk = c->b_tile_k[kind], np_ = ceil_to(N, sn);
    int split = c->split_k && K > c->split_k ? c->split_k : K;
    int seg = k / split, kk = k - seg * split, len = K - seg * split < split ? K - seg * split : split;
    uint64_t base = (uint64_t)np_ * seg * split; /* earlier segments are full and tile-aligned */
    int kp = ceil_to(len, sk);
    return base + (uint64_t)(n / sn) * kp * sn + (uint64_t)(kk / sk) * sn * sk + (uint64_t)(n % sn) * sk + kk % sk;
}

static double get_A(const ctx_t *c, const uint8_t *p, int M, int K, int m, int k) {
    int kind = a_kind(c->info.type);
    if (c->info.AC_layout == 1) {
        int sk = c->chip->a_tile[kind];
        return load(p, kind_ttype(kind), (uint64_t)(k / sk) * M * sk + (uint64_t)m * sk + k % sk, 0);
    }
    return load(p, kind_ttype(kind), (uint64_t)m * K + k, 0);
}

static double get_B(const ctx_t *c, const uint8_t *p, int K, int N, int k, int n) {
    int kind = a_kind(c->info.type);
    if (c->info.B_layout == 1) return load(p, kind_ttype(kind), b_native_index(c->chip, kind, K, N, k, n), 1);
    if (c->info.B_layout == 2) return load(p, kind_ttype(kind), (uint64_t)n * K + k, 0);
    return load(p, kind_ttype(kind), (uint64_t)k * N + n, 0);
}

int rknn_matmul_run(rknn_context h) {
    ctx_t *c = get_ctx(h);
    if (!c) return E_CTX;
    const rknn_matmul_io_attr *io = &c->ios[c->cur];
    if (!c->mem[0] || c->mem[0]->size < io->A.size || !c->mem[1] || c->mem[1]->size < io->B.size) return E_INPUT;
    if (!c->mem[2] || c->mem[2]->size < io->C.size) return E_OUTPUT;
    int M = c->shapes[c->cur].M, K = c->shapes[c->cur].K, N = c->shapes[c->cur].N, t = c->info.type;
    const uint8_t *a = c->mem[0]->virt_addr, *b = c->mem[1]->virt_addr;
    uint8_t *out = c->mem[2]->virt_addr;
    memset(out, 0, io->C.size);
    int sc = t == 10 ? c->chip->c_tile_int16 : c->chip->c_tile;
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++) {
            uint64_t idx = c->info.AC_layout == 1 ? (uint64_t)(n / sc) * M * sc + (uint64_t)m * sc + n % sc
                                                  : (uint64_t)m * N + n;
            if (t == 1 || t == 4) {
                float acc = 0;
                for (int k = 0; k < K; k++) acc += (float)get_A(c, a, M, K, m, k) * (float)get_B(c, b, K, N, k, n);
                if (t == 1) ((float *)out)[idx] = acc;
                else ((_Float16 *)out)[idx] = (_Float16)acc;
            } else {
                int64_t acc = 0;
                for (int k = 0; k < K; k++)
                    acc += (int64_t)get_A(c, a, M, K, m, k) * (int64_t)get_B(c, b, K, N, k, n);
                if (t == 2) ((int32_t *)out)[idx] = (int32_t)acc;
                else ((int16_t *)out)[idx] = (int16_t)(acc > 32767 ? 32767 : acc < -32768 ? -32768 : acc);
            }
        }
    return 0;
}

#ifdef DOUBLE_SDK_2_0
static int b_to_native(void *B_in, void *B_out, int K, int N, const rknn_matmul_info *info);

int rknn_B_normal_layout_to_native_layout(void *B_in, void *B_out, int K, int N, int subN, int subK, int type) {
    const chip_t *c = current_chip();
    int kind = a_kind(type);
    if (type != 1 && type != 2 && type != 4 && type != 10) return -5; /* RKNN_ERR_PARAM_INVALID */
    if (subN != c->b_tile_n[kind] || subK != c->b_tile_k[kind]) return -5;
    rknn_matmul_info info;
    memset(&info, 0, sizeof info);
    info.type = type;
    return b_to_native(B_in, B_out, K, N, &info);
}

static int b_to_native(void *B_in, void *B_out, int K, int N, const rknn_matmul_info *info) {
#else
int rknn_B_normal_layout_to_native_layout(void *B_in, void *B_out, int K, int N, rknn_matmul_info *info) {
#endif
    const chip_t *c = current_chip();
    rknn_matmul_info i2 = *info;
    rknn_matmul_io_attr io;
    i2.B_layout = 1;
    i2.M = 1; i2.K = K; i2.N = N;
    int r = check_shape(c, &i2, 1, K, N, &io);
    if (r) return r;
    int kind = a_kind(info->type), tt = kind_ttype(kind);
    memset(B_out, 0, io.B.size);
    for (int k = 0; k < K; k++)
        for (int n = 0; n < N; n++) {
            uint64_t src = (uint64_t)k * N + n, dst = b_native_index(c, kind, K, N, k, n);
            if (tt == T_FP16) ((_Float16 *)B_out)[dst] = ((const _Float16 *)B_in)[src];
            else if (tt == T_INT8) ((int8_t *)B_out)[dst] = ((const int8_t *)B_in)[src];
            else store_int4(B_out, dst, (int)load(B_in, T_INT4, src, 0), 1);
        }
    return 0;
}

/* ------------------------------------------------------------------------------------------------- mem API */

static rknn_tensor_mem *make_mem(alloc_t *al, uint64_t offset, uint64_t size, uint32_t flags) {
    rknn_tensor_mem *m = calloc(1, sizeof *m);
    if (!m) return NULL;
    m->virt_addr = al->data + offset;
    m->phys_addr = 0x40000000ull + (uint64_t)al->fd * 0x100000ull + offset;
    m->fd = al->fd;
    m->offset = (int32_t)offset;
    m->size = (uint32_t)size;
    m->flags = flags;
    m->priv_data = al;
    return m;
}

rknn_tensor_mem *rknn_create_mem2(rknn_context h, uint64_t size, uint64_t flags) {
    ctx_t *c = get_ctx(h);
    int domain = 0;
    if (!(flags & 0x20000)) {
        if (!c) return NULL;
        domain = c->info.iommu_domain_id;
    }
    if (size == 0 || size > MAX_ALLOC_BYTES || domain_used[domain] + size > DOMAIN_BYTES) return NULL;
    for (int i = 0; i < MAX_ALLOCS; i++) {
        if (allocs[i].alive) continue;
        uint8_t *data = calloc(1, size);
        if (!data) return NULL;
        allocs[i] = (alloc_t){next_fd++, 1, domain, data, size};
        domain_used[domain] += size;
        return make_mem(&allocs[i], 0, size, 1);
    }
    return NULL;
}

rknn_tensor_mem *rknn_create_mem(rknn_context h, uint32_t size) { return rknn_create_mem2(h, size, 0); }

rknn_tensor_mem *rknn_create_mem_from_fd(rknn_context h, int32_t fd, void *virt, uint32_t size, int32_t offset) {
    (void)virt;
    if (!get_ctx(h)) return NULL;
    for (int i = 0; i < MAX_ALLOCS; i++)
        if (allocs[i].alive && allocs[i].fd == fd) {
            if (offset < 0 || size == 0 || (uint64_t)offset + size > allocs[i].size) return NULL;
            return make_mem(&allocs[i], (uint64_t)offset, size, 2);
        }
    return NULL;
}

int rknn_destroy_mem(rknn_context h, rknn_tensor_mem *mem) {
    (void)h;
    if (!mem) return E_PARAM;
    alloc_t *al = mem->priv_data;
    if (mem->flags == 1 && al && al->alive) {
        al->alive = 0;
        domain_used[al->domain] -= al->size;
        free(al->data);
        al->data = NULL;
    }
    free(mem);
    return 0;
}

int rknn_mem_sync(rknn_context h, rknn_tensor_mem *mem, int mode) {
    (void)h;
    return mem && mode >= 1 && mode <= 3 ? 0 : E_PARAM;
}

int rknn_query(rknn_context h, int cmd, void *info, uint32_t size) {
    if (!get_ctx(h)) return E_CTX;
    if (cmd != 5 || size < sizeof(rknn_sdk_version)) return E_PARAM;
    rknn_sdk_version *v = info;
    memset(v, 0, sizeof *v);
    snprintf(v->api_version, sizeof v->api_version, "%s (test double)", SDK_VERSION);
    snprintf(v->drv_version, sizeof v->drv_version, "0.9.8");
    return 0;
}
