/* Runs npulm/cpu/kernels.c outside Python, so that tests can build it for other instruction sets (scalar, AVX2,
 * aarch64 NEON under qemu) than the installed extension uses.
 * Input file: cases of  int64 [type, n, k, m, path, threads, act16, nbytes], weight bytes, x (m * k float32).
 * Output file: for each case y (m * n float32). Prints nl_isa() to stdout. */
#define _POSIX_C_SOURCE 200112L /* posix_memalign */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "kernels.h"

int main(int argc, char **argv) {
    if (argc != 3) return 1;
    FILE *in = fopen(argv[1], "rb"), *out = fopen(argv[2], "wb");
    if (!in || !out) return 1;
    int64_t h[8];
    while (fread(h, 8, 8, in) == 8) {
        uint8_t *w = malloc((size_t)h[7]);
        float *x = malloc(4 * (size_t)(h[3] * h[2])), *y = malloc(4 * (size_t)(h[3] * h[1]));
        if (!w || !x || !y) return 2;
        if (fread(w, 1, (size_t)h[7], in) != (size_t)h[7] ||
            fread(x, 4, (size_t)(h[3] * h[2]), in) != (size_t)(h[3] * h[2]))
            return 3;
        nl_set_threads((int)h[5]);
        nl_mat mat = {w, (int)h[0], h[1], h[2], nl_row_bytes((int)h[0], h[2]), (int)h[6], NULL};
        void *packed = NULL; /* path 3: the weight repacked first, where this build has the packed kernel */
        const int64_t pbytes = h[4] == 3 ? nl_packed_bytes((int)h[0], h[1], h[2]) : -1;
        if (pbytes > 0) {
            if (posix_memalign(&packed, 64, (size_t)pbytes) || nl_pack(&mat, packed, 0)) return 5;
            mat.packed = packed;
        }
        if (nl_matmul(&mat, x, h[3], y, (int)h[4])) return 4;
        free(packed);
        fwrite(y, 4, (size_t)(h[3] * h[1]), out);
        free(w);
        free(x);
        free(y);
    }
    fclose(out);
    printf("%s\n", nl_isa());
    return 0;
}
