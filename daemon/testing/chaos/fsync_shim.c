/* Preloaded into redis-server by tools/chaos (hostcrash.py): after every successful fsync/fdatasync of a
   file whose name ends in ".aof", append "<dev> <inode> <size at the call>" to $CHAOS_FSYNC_LOG.
   What was written before the call is on disk once it returns; what came after may not be. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static int record(int fd, int (*real)(int)) {
    struct stat st;
    char link[64], path[4096];
    int have = fstat(fd, &st) == 0;
    int rc = real(fd);
    if (rc != 0 || !have) return rc;
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    if (n < 4) return rc;
    path[n] = 0;
    if (strcmp(path + n - 4, ".aof") != 0) return rc;
    const char *log = getenv("CHAOS_FSYNC_LOG");
    if (!log) return rc;
    int out = open(log, O_WRONLY | O_APPEND | O_CREAT, 0644);
    if (out < 0) return rc;
    char line[128];
    int len = snprintf(line, sizeof line, "%lu %lu %lld\n", (unsigned long)st.st_dev,
                       (unsigned long)st.st_ino, (long long)st.st_size);
    if (write(out, line, len) < 0) { /* best effort */ }
    close(out);
    return rc;
}

int fsync(int fd) {
    static int (*real)(int);
    if (!real) real = dlsym(RTLD_NEXT, "fsync");
    return record(fd, real);
}

int fdatasync(int fd) {
    static int (*real)(int);
    if (!real) real = dlsym(RTLD_NEXT, "fdatasync");
    return record(fd, real);
}
