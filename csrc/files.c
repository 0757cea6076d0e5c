/*
 * files.c - opening the files the library reads (model files, tokenizers):
 * regular files only, and never blocking. The check is made on the open
 * descriptor, and the open itself does not block, so a FIFO or a device is
 * an error instead of a hang.
 */
#include "internal.h"

#include <errno.h>
#include <string.h>
#include <sys/stat.h>
#if !defined(_WIN32)
#include <fcntl.h>
#include <unistd.h>
#endif

int llama2_open_regular(const char *path, int *fd, int64_t *size, llama2_error *err) {
    *fd = -1;
#if defined(_WIN32)
    struct _stati64 st;
    if (_stati64(path, &st) != 0) {
        if (errno == ENOENT) return llama2_fail(err, LLAMA2_ERR_NOT_FOUND, "%s: no such file", path);
        return llama2_fail(err, LLAMA2_ERR_IO, "%s: %s", path, strerror(errno));
    }
    if (!(st.st_mode & _S_IFREG)) return llama2_fail(err, LLAMA2_ERR_IO, "%s: not a regular file", path);
#else
    int d = open(path, O_RDONLY | O_NONBLOCK); /* a FIFO opened blocking would wait for a writer */
    if (d < 0) {
        if (errno == ENOENT) return llama2_fail(err, LLAMA2_ERR_NOT_FOUND, "%s: no such file", path);
        return llama2_fail(err, LLAMA2_ERR_IO, "%s: %s", path, strerror(errno));
    }
    struct stat st;
    if (fstat(d, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(d);
        return llama2_fail(err, LLAMA2_ERR_IO, "%s: not a regular file", path);
    }
    *fd = d;
#endif
    *size = (int64_t)st.st_size;
    return LLAMA2_OK;
}
