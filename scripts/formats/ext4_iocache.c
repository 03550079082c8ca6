/* Fewer system calls for mke2fs's image file, for LD_PRELOAD: a read cache and write combining.
 *
 * mke2fs -d (e2fsprogs 1.47.2) asks the kernel for little at a time. For a real 83-package world:
 * 26,727 reads of 4 KiB, of only 244 distinct blocks (its own cache holds 8 blocks, and each new
 * directory entry scans the directory's blocks again), and 14,425 writes of 4 KiB, most of them
 * each file's data block after block. Here:
 * - every block mke2fs reads from the image is kept, and every write updates the kept blocks it
 *   touches, so a read of kept blocks is a memcpy, not a system call (26,483 of those reads);
 * - a write that continues the one before it is gathered with it (up to 1 MiB), and written when
 *   anything else comes: a write elsewhere; a read of those bytes the kept blocks cannot answer;
 *   any other use of the image (read, mmap, lseek for data or holes, fallocate, truncate, fsync,
 *   close, dup2 over it, ioctl, ...); the end of the process (14,425 writes -> 5,584).
 * So whatever reads the image (mke2fs itself; anyone after an fsync, a close or the process's end)
 * reads exactly the bytes it would read without this code, and the image is the same, block for
 * block and hole for hole. Only writes inside the file's size are gathered (never one that would
 * make it grow), so its size is right at every moment too. If gathered writes fail when they are
 * made (a full disk), that call and every later use of the image fail with the same error, so
 * mke2fs stops there and says it, as it does when the kernel refuses a write.
 *
 * The image is the file VULCAN_MKE2FS_IMAGE names (by device and inode, found when loaded).
 * Anything that may change it behind the kept blocks drops them all (write, writev, pwritev*,
 * fallocate, ftruncate, sendfile, copy_file_range, splice into it; truncate(2) of any path); a
 * shared writable mapping of it, or a descriptor opened O_APPEND, turns this off for good. At
 * most 64 MiB is kept. scripts/formats/ext4_preload.py builds this with the host's C compiler and
 * gives it to mke2fs only; the build's own e2fsck check runs without it and judges the image.
 */
#define _GNU_SOURCE
#undef _FORTIFY_SOURCE /* its inline open() and read() would clash with ours */
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
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
#define GATHER (1 << 20)

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
static int64_t image_size = -1; /* the file's size as last seen (-1: look again) */
static unsigned char *gathered; /* writes not made yet: [gathered_at, gathered_at + gathered_len) */
static int gathered_fd = -1;
static uint64_t gathered_at, gathered_len;
static int failed_errno; /* a gathered write failed (a full disk): the image is not what mke2fs wrote */

static void forked(void) { /* in a child: what was gathered is the parent's to write, not its own */
    gathered_len = 0;
    gathered_fd = -1;
}

__attribute__((constructor)) static void init(void) {
    real_pread = (ssize_t(*)(int, void *, size_t, off_t))dlsym(RTLD_NEXT, "pread64");
    real_pwrite = (ssize_t(*)(int, const void *, size_t, off_t))dlsym(RTLD_NEXT, "pwrite64");
    const char *path = getenv("VULCAN_MKE2FS_IMAGE");
    struct stat st;
    if (real_pread && real_pwrite && path && stat(path, &st) == 0 && S_ISREG(st.st_mode)) {
        image_dev = st.st_dev;
        image_ino = st.st_ino;
        enabled = 1;
        pthread_atfork(NULL, NULL, forked);
    }
}

static void drop_all(void);

static int flush(void) { /* with mu held: make the gathered writes; -1 (errno set) if one failed */
    if (failed_errno) {
        errno = failed_errno;
        return -1;
    }
    uint64_t done = 0;
    while (done < gathered_len) {
        ssize_t r = real_pwrite(gathered_fd, gathered + done, gathered_len - done, (off_t)(gathered_at + done));
        if (r <= 0) { /* mke2fs was told those bytes were written: every later use of the image fails */
            failed_errno = r == 0 ? EIO : errno;
            gathered_len = 0;
            gathered_fd = -1;
            drop_all();
            errno = failed_errno;
            return -1;
        }
        done += (uint64_t)r;
    }
    gathered_len = 0;
    gathered_fd = -1;
    return 0;
}

__attribute__((destructor)) static void fini(void) {
    pthread_mutex_lock(&mu);
    flush();
    pthread_mutex_unlock(&mu);
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
    image_size = -1;
}

static int turn_off(void) { /* for good; what was gathered is written first */
    pthread_mutex_lock(&mu);
    int r = flush();
    enabled = 0;
    drop_all();
    pthread_mutex_unlock(&mu);
    return r;
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

static int flush_for(int fd) { /* before any other use of the image: 0, or -1 with errno */
    if (!is_image(fd))
        return 0;
    pthread_mutex_lock(&mu);
    int r = flush();
    pthread_mutex_unlock(&mu);
    return r;
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

static void update_kept(const void *buf, uint64_t start, uint64_t end) { /* with mu held: bytes written */
    for (uint64_t b = start / BLK; b <= (end - 1) / BLK; b++) {
        if (!kept(b))
            continue;
        uint64_t lo = b * BLK > start ? b * BLK : start, hi = (b + 1) * BLK < end ? (b + 1) * BLK : end;
        memcpy(*slot(b, 0) + (lo - b * BLK), (const char *)buf + (lo - start), hi - lo);
    }
}

static int failed(void) {
    if (!failed_errno)
        return 0;
    errno = failed_errno;
    return 1;
}

ssize_t pread64(int fd, void *buf, size_t n, off_t off) {
    if (n == 0 || off < 0 || !is_image(fd))
        return real_pread(fd, buf, n, off);
    if (failed())
        return -1;
    uint64_t start = (uint64_t)off, end = start + n, first = start / BLK, last = (end - 1) / BLK, b;
    pthread_mutex_lock(&mu);
    for (b = first; b <= last && kept(b); b++)
        ;
    if (b > last) { /* every block of it is kept (and holds what was gathered for it) */
        for (b = first; b <= last; b++) {
            uint64_t lo = b * BLK > start ? b * BLK : start, hi = (b + 1) * BLK < end ? (b + 1) * BLK : end;
            memcpy((char *)buf + (lo - start), *slot(b, 0) + (lo - b * BLK), hi - lo);
        }
        pthread_mutex_unlock(&mu);
        return (ssize_t)n;
    }
    if (gathered_len && start < gathered_at + gathered_len && end > gathered_at && flush() < 0) {
        pthread_mutex_unlock(&mu);
        return -1;
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
    if (n == 0 || off < 0 || !is_image(fd))
        return real_pwrite(fd, buf, n, off);
    if (failed())
        return -1;
    uint64_t start = (uint64_t)off, end = start + n;
    pthread_mutex_lock(&mu);
    if (image_size < 0) {
        struct stat st;
        image_size = fstat(fd, &st) == 0 ? (int64_t)st.st_size : -1;
    }
    if (gathered == NULL)
        gathered = malloc(GATHER);
    if (gathered && n < GATHER && image_size >= 0 && end <= (uint64_t)image_size) {
        if (!(gathered_len && start == gathered_at + gathered_len && gathered_len + n <= GATHER)) {
            if (flush() < 0) {
                pthread_mutex_unlock(&mu);
                return -1;
            }
            gathered_fd = fd; /* written through the descriptor it came by (close writes it first) */
            gathered_at = start;
        }
        memcpy(gathered + gathered_len, buf, n);
        gathered_len += n;
        writes++;
        update_kept(buf, start, end);
        pthread_mutex_unlock(&mu);
        return (ssize_t)n;
    }
    if (flush() < 0) {
        pthread_mutex_unlock(&mu);
        return -1;
    }
    ssize_t r = real_pwrite(fd, buf, n, off);
    writes++;
    image_size = -1;
    if (r < 0)
        drop_all(); /* whatever it may have left in the file */
    else if (r > 0)
        update_kept(buf, start, start + (uint64_t)r);
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

/* Reads and other uses of the image: what was gathered is written first. */
#define USES(ret, name, params, args, fd, fail)                                                    \
    ret name params {                                                                              \
        REAL(name);                                                                                \
        if (flush_for(fd) < 0)                                                                     \
            return fail;                                                                           \
        return real args;                                                                          \
    }

USES(ssize_t, read, (int fd, void *b, size_t n), (fd, b, n), fd, -1)
USES(ssize_t, readv, (int fd, const struct iovec *v, int c), (fd, v, c), fd, -1)
USES(ssize_t, preadv, (int fd, const struct iovec *v, int c, off_t o), (fd, v, c, o), fd, -1)
USES(ssize_t, preadv64, (int fd, const struct iovec *v, int c, off_t o), (fd, v, c, o), fd, -1)
USES(ssize_t, preadv2, (int fd, const struct iovec *v, int c, off_t o, int f), (fd, v, c, o, f), fd, -1)
USES(int, fsync, (int fd), (fd), fd, -1)
USES(int, fdatasync, (int fd), (fd), fd, -1)
USES(int, syncfs, (int fd), (fd), fd, -1)
USES(int, sync_file_range, (int fd, off_t o, off_t n, unsigned f), (fd, o, n, f), fd, -1)
USES(int, posix_fadvise, (int fd, off_t o, off_t n, int a), (fd, o, n, a), fd, errno)
USES(int, posix_fadvise64, (int fd, off_t o, off_t n, int a), (fd, o, n, a), fd, errno)
USES(off_t, lseek, (int fd, off_t o, int w), (fd, o, w), fd, -1)
USES(off_t, lseek64, (int fd, off_t o, int w), (fd, o, w), fd, -1)

void sync(void) {
    REAL(sync);
    pthread_mutex_lock(&mu);
    flush();
    pthread_mutex_unlock(&mu);
    real();
}

int ioctl(int fd, unsigned long request, ...) {
    REAL(ioctl);
    va_list ap;
    va_start(ap, request);
    void *arg = va_arg(ap, void *);
    va_end(ap);
    if (flush_for(fd) < 0)
        return -1;
    return real(fd, request, arg);
}

/* Changes of the image the kept blocks do not follow: what was gathered first, then they are dropped. */
#define CHANGES(ret, name, params, args, fd, fd2)                                                  \
    ret name params {                                                                              \
        REAL(name);                                                                                \
        if (flush_for(fd) < 0 || flush_for(fd2) < 0)                                               \
            return -1;                                                                             \
        ret r = real args;                                                                         \
        changed(fd);                                                                               \
        return r;                                                                                  \
    }

CHANGES(ssize_t, write, (int fd, const void *b, size_t n), (fd, b, n), fd, -1)
CHANGES(ssize_t, writev, (int fd, const struct iovec *v, int c), (fd, v, c), fd, -1)
CHANGES(ssize_t, pwritev, (int fd, const struct iovec *v, int c, off_t o), (fd, v, c, o), fd, -1)
CHANGES(ssize_t, pwritev64, (int fd, const struct iovec *v, int c, off_t o), (fd, v, c, o), fd, -1)
CHANGES(ssize_t, pwritev2, (int fd, const struct iovec *v, int c, off_t o, int f), (fd, v, c, o, f), fd, -1)
CHANGES(int, fallocate, (int fd, int m, off_t o, off_t l), (fd, m, o, l), fd, -1)
CHANGES(int, fallocate64, (int fd, int m, off_t o, off_t l), (fd, m, o, l), fd, -1)
CHANGES(int, ftruncate, (int fd, off_t l), (fd, l), fd, -1)
CHANGES(int, ftruncate64, (int fd, off_t l), (fd, l), fd, -1)
CHANGES(ssize_t, sendfile, (int out, int in, off_t *o, size_t n), (out, in, o, n), out, in)
CHANGES(ssize_t, sendfile64, (int out, int in, off_t *o, size_t n), (out, in, o, n), out, in)
CHANGES(ssize_t, copy_file_range, (int in, off_t *oi, int out, off_t *oo, size_t n, unsigned f),
        (in, oi, out, oo, n, f), out, in)
CHANGES(ssize_t, splice, (int in, off_t *oi, int out, off_t *oo, size_t n, unsigned f), (in, oi, out, oo, n, f),
        out, in)

/* posix_fallocate returns its error instead of setting errno */
#define CHANGES_RET(name, params, args, fd)                                                        \
    int name params {                                                                              \
        REAL(name);                                                                                \
        if (flush_for(fd) < 0)                                                                     \
            return errno;                                                                          \
        int r = real args;                                                                         \
        changed(fd);                                                                               \
        return r;                                                                                  \
    }

CHANGES_RET(posix_fallocate, (int fd, off_t o, off_t l), (fd, o, l), fd)
CHANGES_RET(posix_fallocate64, (int fd, off_t o, off_t l), (fd, o, l), fd)

static int truncated(const char *p, off_t l, int (*real)(const char *, off_t)) {
    int r = 0;
    if (enabled) {
        pthread_mutex_lock(&mu);
        r = flush();
        pthread_mutex_unlock(&mu);
    }
    if (r < 0)
        return -1;
    r = real(p, l);
    if (enabled) {
        pthread_mutex_lock(&mu);
        drop_all();
        pthread_mutex_unlock(&mu);
    }
    return r;
}

int truncate(const char *p, off_t l) {
    REAL(truncate);
    return truncated(p, l, real);
}

int truncate64(const char *p, off_t l) {
    REAL(truncate64);
    return truncated(p, l, real);
}

int dup(int fd) {
    REAL(dup);
    int r = real(fd);
    forget(r);
    return r;
}

int dup2(int fd, int to) {
    REAL(dup2);
    if (to != fd && flush_for(to) < 0)
        return -1;
    int r = real(fd, to);
    forget(r);
    return r;
}

int dup3(int fd, int to, int f) {
    REAL(dup3);
    if (to != fd && flush_for(to) < 0)
        return -1;
    int r = real(fd, to, f);
    forget(r);
    return r;
}

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
    int failed = flush_for(fd) < 0;
    int saved = errno;
    forget(fd);
    int r = real(fd);
    if (failed) {
        errno = saved;
        return -1;
    }
    return r;
}

#define MMAP(name)                                                                                 \
    void *name(void *a, size_t l, int prot, int flags, int fd, off_t o) {                          \
        REAL(name);                                                                                \
        if (flush_for(fd) < 0)                                                                     \
            return MAP_FAILED;                                                                     \
        if ((flags & MAP_SHARED) && (prot & PROT_WRITE) && is_image(fd) && turn_off() < 0)         \
            return MAP_FAILED; /* writes through it would not be seen */                           \
        return real(a, l, prot, flags, fd, o);                                                     \
    }

MMAP(mmap)
MMAP(mmap64)
