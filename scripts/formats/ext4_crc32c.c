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
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

__attribute__((target("sse4.2"))) uint32_t ext2fs_crc32c_le(uint32_t crc, unsigned char const *p, size_t len) {
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
