/* CRC-32C for e2fsprogs, with the CPU's own instruction (SSE4.2's crc32), for LD_PRELOAD.
 *
 * libext2fs (1.47) computes every metadata checksum of an image (metadata_csum: inodes,
 * directory blocks, extent blocks, bitmaps, group descriptors, superblock) with a table-driven
 * ext2fs_crc32c_le, and calls it through its PLT, so a definition loaded first takes its place.
 * This one is the same function (CRC-32C, Castagnoli, reflected; the caller's register in, the
 * register out, no inversion), so the image's bytes are the same; mke2fs -d of a real 83-package
 * world spends ~40% of its time in that function. scripts/formats/ext4_preload.py builds it with the
 * host's C compiler, checks it against a reference before using it, and gives it to mke2fs only:
 * the build's own e2fsck check runs without it, so it judges every checksum this code wrote.
 *
 * The instruction takes 3 cycles before its result can be used, and 1 to start another: a long
 * buffer (a 4 KiB block, what mke2fs checksums most, again at every directory lookup) is taken as
 * three runs of SPAN bytes at once, each from register 0 but the first, and joined after: the
 * register update is linear, so crc(r, A|B) = crc(r, A) moved past |B| zero bytes ^ crc(0, B), and
 * "moved past SPAN zero bytes" is a linear map of the 32-bit register, kept as 4 tables of 256
 * (built when this is loaded, with the instruction itself).
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define SPAN 1360 /* 3 * 1360 = 4080: a 4 KiB block in one round */

static uint32_t past_span[4][256];

__attribute__((target("sse4.2"))) static uint32_t one_run(uint32_t crc, unsigned char const *p, size_t len) {
    uint64_t c = crc;
    while (len >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        c = __builtin_ia32_crc32di(c, v);
        p += 8;
        len -= 8;
    }
    uint32_t c32 = (uint32_t)c;
    while (len--)
        c32 = __builtin_ia32_crc32qi(c32, *p++);
    return c32;
}

__attribute__((constructor, target("sse4.2"))) static void init(void) {
    static const unsigned char zeros[SPAN];
    for (int k = 0; k < 4; k++)
        for (uint32_t b = 0; b < 256; b++)
            past_span[k][b] = one_run(b << (8 * k), zeros, SPAN);
}

static uint32_t moved(uint32_t crc) { /* the register moved past SPAN zero bytes */
    return past_span[0][crc & 0xff] ^ past_span[1][(crc >> 8) & 0xff] ^ past_span[2][(crc >> 16) & 0xff] ^
           past_span[3][crc >> 24];
}

__attribute__((target("sse4.2"))) uint32_t ext2fs_crc32c_le(uint32_t crc, unsigned char const *p, size_t len) {
    while (len >= 3 * SPAN) {
        uint64_t a = crc, b = 0, c = 0;
        for (size_t i = 0; i < SPAN; i += 8) {
            uint64_t va, vb, vc;
            memcpy(&va, p + i, 8);
            memcpy(&vb, p + SPAN + i, 8);
            memcpy(&vc, p + 2 * SPAN + i, 8);
            a = __builtin_ia32_crc32di(a, va);
            b = __builtin_ia32_crc32di(b, vb);
            c = __builtin_ia32_crc32di(c, vc);
        }
        crc = moved(moved((uint32_t)a) ^ (uint32_t)b) ^ (uint32_t)c;
        p += 3 * SPAN;
        len -= 3 * SPAN;
    }
    return one_run(crc, p, len);
}
