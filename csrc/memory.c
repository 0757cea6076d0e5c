/*
 * memory.c - big zeroed buffers whose pages are committed only when touched.
 *
 * A KV cache is sized for every position a context may reach, but a short
 * run touches only its first positions. Anonymous mappings (VirtualAlloc on
 * Windows) start as untouched zero pages, so memory grows with the positions
 * actually used: a file whose header claims a million positions costs what
 * an 8-token run needs, not gigabytes.
 *
 * In sanitizer builds everything goes through calloc instead, so the
 * sanitizer sees every buffer's bounds.
 */
#if defined(__linux__) && !defined(_DEFAULT_SOURCE)
#define _DEFAULT_SOURCE /* MAP_ANONYMOUS, madvise(MADV_HUGEPAGE) */
#endif
#include "internal.h"

#include <stdint.h>
#include <stdlib.h>

#if defined(__SANITIZE_ADDRESS__)
#define USE_CALLOC 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define USE_CALLOC 1
#endif
#endif

#if !defined(USE_CALLOC)
#if defined(_WIN32)
#include <windows.h>
#define USE_VIRTUALALLOC 1
#elif defined(__unix__) || defined(__APPLE__)
#include <sys/mman.h>
#if defined(MAP_ANONYMOUS)
#define USE_MMAP 1
#endif
#endif
#endif

#define HUGE_PAGE ((size_t)2 << 20)

#if defined(USE_MMAP)
/* the length a buffer of `bytes` was mapped with */
static size_t mapped_length(size_t bytes, int huge) {
    size_t unit = huge ? HUGE_PAGE : (size_t)4096;
    return (bytes + unit - 1) / unit * unit;
}
#endif

void *llama2_lazy_alloc(size_t bytes, int huge) {
    if (bytes == 0) bytes = 1;
#if defined(USE_MMAP)
    size_t len = mapped_length(bytes, huge), extra = huge ? HUGE_PAGE : 0;
    if (len + extra < len) return NULL;
    unsigned char *base = (unsigned char *)mmap(NULL, len + extra, PROT_READ | PROT_WRITE,
                                                MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == (unsigned char *)MAP_FAILED) return NULL;
    if (!huge) return base;
    /* keep a 2 MB-aligned window, so the kernel can back it with huge pages */
    unsigned char *p = (unsigned char *)(((uintptr_t)base + HUGE_PAGE - 1) & ~(uintptr_t)(HUGE_PAGE - 1));
    if (p > base) munmap(base, (size_t)(p - base));
    size_t tail = (size_t)(base + len + extra - (p + len));
    if (tail) munmap(p + len, tail);
#if defined(MADV_HUGEPAGE)
    madvise(p, len, MADV_HUGEPAGE);
#endif
    return p;
#elif defined(USE_VIRTUALALLOC)
    (void)huge;
    return VirtualAlloc(NULL, bytes, MEM_RESERVE | MEM_COMMIT, PAGE_READWRITE);
#else
    (void)huge;
    return calloc(1, bytes);
#endif
}

void llama2_lazy_free(void *p, size_t bytes, int huge) {
    if (!p) return;
#if defined(USE_MMAP)
    munmap(p, mapped_length(bytes ? bytes : 1, huge));
#elif defined(USE_VIRTUALALLOC)
    (void)bytes, (void)huge;
    VirtualFree(p, 0, MEM_RELEASE);
#else
    (void)bytes, (void)huge;
    free(p);
#endif
}

/* Commits the pages of [p, p + bytes) of a lazy buffer now, leaving their
 * contents as they are (Linux 5.14 and later: MADV_POPULATE_WRITE, which
 * faults the pages in as a write would without writing, so another thread
 * may be using them meanwhile). Elsewhere, or on an older kernel, nothing:
 * the pages come as they are first written. */
void llama2_lazy_populate(void *p, size_t bytes) {
#if defined(USE_MMAP) && defined(__linux__)
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif
    if (!p || !bytes) return;
    uintptr_t start = (uintptr_t)p & ~(uintptr_t)4095, end = ((uintptr_t)p + bytes + 4095) & ~(uintptr_t)4095;
    (void)madvise((void *)start, (size_t)(end - start), MADV_POPULATE_WRITE);
#else
    (void)p, (void)bytes;
#endif
}

/* ---- lists of owned buffers ---- */

#define LAZY_MIN ((size_t)4 << 20)

void *llama2_buffers_alloc(llama2_buffers *b, size_t bytes, int huge_ok) {
    if (b->n == b->cap) {
        int cap = b->cap ? 2 * b->cap : 16;
        llama2_buffer *grown = (llama2_buffer *)realloc(b->items, (size_t)cap * sizeof(*grown));
        if (!grown) return NULL;
        b->items = grown;
        b->cap = cap;
    }
    llama2_buffer item = {NULL, bytes, bytes >= LAZY_MIN, bytes >= LAZY_MIN && huge_ok};
    item.p = item.lazy ? llama2_lazy_alloc(bytes, item.huge) : calloc(1, bytes ? bytes : 1);
    if (item.p) b->items[b->n++] = item;
    return item.p;
}

void llama2_buffers_free(llama2_buffers *b) {
    for (int i = 0; i < b->n; i++) {
        llama2_buffer *item = &b->items[i];
        if (item->lazy)
            llama2_lazy_free(item->p, item->bytes, item->huge);
        else
            free(item->p);
    }
    free(b->items);
    b->items = NULL;
    b->n = b->cap = 0;
}

/* Repacked weights stream through the cache on every token: a model's
 * buffers of 4 MB and more sit on 2 MB pages where the kernel allows it (a
 * 4 KB page walk every 4 KB costs memory bandwidth). */
void *llama2_own(llama2_transformer *t, size_t bytes) { return llama2_buffers_alloc(&t->owned, bytes, 1); }

int llama2_own_matrices(llama2_transformer *t, llama2_error *err) {
    const int L = t->config.n_layers;
    t->matrices = (llama2_matrix *)llama2_own(t, sizeof(llama2_matrix) * 7 * (size_t)L);
    if (!t->matrices) return llama2_fail(err, LLAMA2_ERR_NOMEM, "out of memory");
    t->wq = t->matrices;
    t->wk = t->wq + L;
    t->wv = t->wk + L;
    t->wo = t->wv + L;
    t->w1 = t->wo + L;
    t->w2 = t->w1 + L;
    t->w3 = t->w2 + L;
    return LLAMA2_OK;
}
