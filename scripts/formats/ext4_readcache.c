/* A read cache for mke2fs's image file, for LD_PRELOAD: what it read is not asked of the kernel again.
 *
 * mke2fs -d (e2fsprogs 1.47.2) re-reads the same few metadata blocks all the time: its own block
 * cache holds 8, and each new directory entry scans the directory's blocks again. For a real
 * 83-package world: 26,727 pread64 calls of 4 KiB, of 244 distinct blocks, beside 14,425 writes.
 * Here, every block mke2fs reads from the image is kept (write-through: every write still goes to
 * the file at once, and updates the blocks kept), so a read of a kept block is a memcpy, not a
 * system call. The file holds, at every moment, exactly what it holds without this code; reads
 * return what the file holds; only the number of system calls changes, so the image is the same,
 * block for block and hole for hole.
 *
 * The image is the file VULCAN_MKE2FS_IMAGE names (by device and inode, found when loaded).
 * Anything else that may change it behind the kept blocks drops them all: write, writev,
 * pwritev*, fallocate, ftruncate, sendfile, copy_file_range, splice on a descriptor of the image,
 * truncate(2) of any path; a shared writable mapping of it, or a descriptor opened O_APPEND,
 * turns the cache off for good. A read whose bytes were written meanwhile is not kept. At most
 * 64 MiB is kept. scripts/formats/ext4_preload.py builds this with the host's C compiler and gives
 * it to mke2fs only; the build's own e2fsck check runs without it and judges what was written.
 */
#define _GNU_SOURCE
#undef _FORTIFY_SOURCE /* its inline open() would clash with ours */
#include <dlfcn.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/sendfile.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

_Static_assert(sizeof(off_t) == 8, "pread and pread64 must be one function");

#define BLK 4096
#define SLOTS 32768 /* a power of two; at most half of them used: 16384 blocks, 64 MiB */
#define MAXFD 4096

static ssize_t (*real_pread)(int, void *, size_t, off_t);
static ssize_t (*real_pwrite)(int, const void *, size_t, off_t);
static dev_t image_dev;
static ino_t image_ino;
static int enabled;
static signed char kinds[MAXFD]; /* what a descriptor is: 0 not known yet, 1 the image, 2 another file */
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static uint64_t keys[SLOTS]; /* block number + 1; 0: a free slot */
static unsigned char *blocks[SLOTS];
static unsigned used;
static uint64_t writes; /* how many changes of the image so far: a read that saw one is not kept */

__attribute__((constructor)) static void init(void) {
    real_pread = (ssize_t(*)(int, void *, size_t, off_t))dlsym(RTLD_NEXT, "pread64");
    real_pwrite = (ssize_t(*)(int, const void *, size_t, off_t))dlsym(RTLD_NEXT, "pwrite64");
    const char *path = getenv("VULCAN_MKE2FS_IMAGE");
    struct stat st;
    if (real_pread && real_pwrite && path && stat(path, &st) == 0 && S_ISREG(st.st_mode)) {
        image_dev = st.st_dev;
        image_ino = st.st_ino;
        enabled = 1;
    }
}

static void drop_all(void) { /* with mu held */
    for (unsigned i = 0; i < SLOTS; i++) {
        if (keys[i]) {
            free(blocks[i]);
            keys[i] = 0;
            blocks[i] = NULL;
        }
    }
    used = 0;
    writes++;
}

static void turn_off(void) {
    pthread_mutex_lock(&mu);
    enabled = 0;
    drop_all();
    pthread_mutex_unlock(&mu);
}

static int is_image(int fd) {
    if (!enabled || fd < 0)
        return 0;
    int kind = fd < MAXFD ? kinds[fd] : 0;
    if (kind == 0) {
        struct stat st;
        kind = fstat(fd, &st) == 0 && st.st_dev == image_dev && st.st_ino == image_ino ? 1 : 2;
        if (kind == 1 && (fcntl(fd, F_GETFL) & O_APPEND)) { /* its writes land at the end, whatever the offset */
            turn_off();
            return 0;
        }
        if (fd < MAXFD)
            kinds[fd] = (signed char)kind;
    }
    return kind == 1;
}

static void forget(int fd) { /* a descriptor number closed, or given to another file */
    if (fd >= 0 && fd < MAXFD)
        kinds[fd] = 0;
}

static unsigned char **slot(uint64_t block, int add) { /* with mu held */
    uint64_t key = block + 1;
    unsigned i = (unsigned)((key * 0x9E3779B97F4A7C15ull) >> 40) & (SLOTS - 1);
    for (;;) {
        if (keys[i] == key)
            return &blocks[i];
        if (keys[i] == 0) {
            if (!add || used >= SLOTS / 2)
                return NULL;
            keys[i] = key;
            blocks[i] = NULL;
            used++;
            return &blocks[i];
        }
        i = (i + 1) & (SLOTS - 1);
    }
}

static int kept(uint64_t block) {
    unsigned char **p = slot(block, 0);
    return p != NULL && *p != NULL;
}

ssize_t pread64(int fd, void *buf, size_t n, off_t off) {
    if (n == 0 || off < 0 || !is_image(fd))
        return real_pread(fd, buf, n, off);
    uint64_t start = (uint64_t)off, end = start + n, first = start / BLK, last = (end - 1) / BLK, b;
    pthread_mutex_lock(&mu);
    for (b = first; b <= last && kept(b); b++)
        ;
    if (b > last) { /* every block of it is kept */
        for (b = first; b <= last; b++) {
            uint64_t lo = b * BLK > start ? b * BLK : start, hi = (b + 1) * BLK < end ? (b + 1) * BLK : end;
            memcpy((char *)buf + (lo - start), *slot(b, 0) + (lo - b * BLK), hi - lo);
        }
        pthread_mutex_unlock(&mu);
        return (ssize_t)n;
    }
    uint64_t seen = writes;
    pthread_mutex_unlock(&mu);
    ssize_t r = real_pread(fd, buf, n, off);
    if (r <= 0)
        return r;
    pthread_mutex_lock(&mu);
    if (writes == seen) { /* nothing was written since: the bytes read are the file's */
        for (b = (start + BLK - 1) / BLK; (b + 1) * BLK <= start + (uint64_t)r; b++) { /* whole blocks only */
            unsigned char **p = slot(b, 1);
            if (p == NULL)
                break; /* full: what is kept stays right (writes update it) */
            if (*p == NULL && (*p = malloc(BLK)) == NULL) {
                drop_all();
                break;
            }
            memcpy(*p, (char *)buf + (b * BLK - start), BLK);
        }
    }
    pthread_mutex_unlock(&mu);
    return r;
}

ssize_t pread(int fd, void *buf, size_t n, off_t off) __attribute__((alias("pread64")));

ssize_t pwrite64(int fd, const void *buf, size_t n, off_t off) {
    if (!is_image(fd))
        return real_pwrite(fd, buf, n, off);
    ssize_t r = real_pwrite(fd, buf, n, off);
    pthread_mutex_lock(&mu);
    writes++;
    if (r < 0 || off < 0) {
        drop_all(); /* whatever it may have left in the file */
    } else if (r > 0) { /* the kept blocks it wrote into hold what the file now holds */
        uint64_t start = (uint64_t)off, end = start + (uint64_t)r;
        for (uint64_t b = start / BLK; b <= (end - 1) / BLK; b++) {
            if (!kept(b))
                continue;
            uint64_t lo = b * BLK > start ? b * BLK : start, hi = (b + 1) * BLK < end ? (b + 1) * BLK : end;
            memcpy(*slot(b, 0) + (lo - b * BLK), (const char *)buf + (lo - start), hi - lo);
        }
    }
    pthread_mutex_unlock(&mu);
    return r;
}

ssize_t pwrite(int fd, const void *buf, size_t n, off_t off) __attribute__((alias("pwrite64")));

static void changed(int fd) { /* the image changed in a way the kept blocks do not follow */
    if (is_image(fd)) {
        pthread_mutex_lock(&mu);
        drop_all();
        pthread_mutex_unlock(&mu);
    }
}

#define REAL(name)                                                                                 \
    static __typeof__(&name) real;                                                                 \
    if (!real)                                                                                     \
        real = (__typeof__(&name))dlsym(RTLD_NEXT, #name)

#define CHANGES(ret, name, params, args, fd)                                                       \
    ret name params {                                                                              \
        REAL(name);                                                                                \
        ret r = real args;                                                                         \
        changed(fd);                                                                               \
        return r;                                                                                  \
    }

CHANGES(ssize_t, write, (int fd, const void *b, size_t n), (fd, b, n), fd)
CHANGES(ssize_t, writev, (int fd, const struct iovec *v, int c), (fd, v, c), fd)
CHANGES(ssize_t, pwritev, (int fd, const struct iovec *v, int c, off_t o), (fd, v, c, o), fd)
CHANGES(ssize_t, pwritev64, (int fd, const struct iovec *v, int c, off_t o), (fd, v, c, o), fd)
CHANGES(ssize_t, pwritev2, (int fd, const struct iovec *v, int c, off_t o, int f), (fd, v, c, o, f), fd)
CHANGES(int, fallocate, (int fd, int m, off_t o, off_t l), (fd, m, o, l), fd)
CHANGES(int, fallocate64, (int fd, int m, off_t o, off_t l), (fd, m, o, l), fd)
CHANGES(int, posix_fallocate, (int fd, off_t o, off_t l), (fd, o, l), fd)
CHANGES(int, posix_fallocate64, (int fd, off_t o, off_t l), (fd, o, l), fd)
CHANGES(int, ftruncate, (int fd, off_t l), (fd, l), fd)
CHANGES(int, ftruncate64, (int fd, off_t l), (fd, l), fd)
CHANGES(ssize_t, sendfile, (int out, int in, off_t *o, size_t n), (out, in, o, n), out)
CHANGES(ssize_t, sendfile64, (int out, int in, off_t *o, size_t n), (out, in, o, n), out)
CHANGES(ssize_t, copy_file_range, (int in, off_t *oi, int out, off_t *oo, size_t n, unsigned f),
        (in, oi, out, oo, n, f), out)
CHANGES(ssize_t, splice, (int in, off_t *oi, int out, off_t *oo, size_t n, unsigned f), (in, oi, out, oo, n, f), out)

static int truncated(int r) {
    if (enabled) {
        pthread_mutex_lock(&mu);
        drop_all();
        pthread_mutex_unlock(&mu);
    }
    return r;
}

int truncate(const char *p, off_t l) {
    REAL(truncate);
    return truncated(real(p, l));
}

int truncate64(const char *p, off_t l) {
    REAL(truncate64);
    return truncated(real(p, l));
}

#define NEWFD(name, params, args)                                                                  \
    int name params {                                                                              \
        REAL(name);                                                                                \
        int r = real args;                                                                         \
        forget(r);                                                                                 \
        return r;                                                                                  \
    }

NEWFD(dup, (int fd), (fd))
NEWFD(dup2, (int fd, int to), (fd, to))
NEWFD(dup3, (int fd, int to, int f), (fd, to, f))

static mode_t mode_of(int flags, va_list ap) {
    return (flags & (O_CREAT | O_TMPFILE)) ? (mode_t)va_arg(ap, int) : 0;
}

#define OPEN(name)                                                                                 \
    int name(const char *p, int flags, ...) {                                                      \
        REAL(name);                                                                                \
        va_list ap;                                                                                \
        va_start(ap, flags);                                                                       \
        mode_t mode = mode_of(flags, ap);                                                          \
        va_end(ap);                                                                                \
        int r = real(p, flags, mode);                                                              \
        forget(r);                                                                                 \
        return r;                                                                                  \
    }

OPEN(open)
OPEN(open64)

#define OPENAT(name)                                                                               \
    int name(int dir, const char *p, int flags, ...) {                                             \
        REAL(name);                                                                                \
        va_list ap;                                                                                \
        va_start(ap, flags);                                                                       \
        mode_t mode = mode_of(flags, ap);                                                          \
        va_end(ap);                                                                                \
        int r = real(dir, p, flags, mode);                                                         \
        forget(r);                                                                                 \
        return r;                                                                                  \
    }

OPENAT(openat)
OPENAT(openat64)

int close(int fd) {
    REAL(close);
    forget(fd);
    return real(fd);
}

#define MMAP(name)                                                                                 \
    void *name(void *a, size_t l, int prot, int flags, int fd, off_t o) {                          \
        REAL(name);                                                                                \
        if ((flags & MAP_SHARED) && (prot & PROT_WRITE) && is_image(fd))                           \
            turn_off(); /* writes through it would not be seen */                                  \
        return real(a, l, prot, flags, fd, o);                                                     \
    }

MMAP(mmap)
MMAP(mmap64)
