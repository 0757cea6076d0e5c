/*
 * tokenizer.c - tokenizer.bin reading, BPE encoding and piece decoding.
 *
 * Encoding follows docs/TOKENIZER.md: optional BOS, a dummy-prefix " " when
 * the text is not empty, one token per UTF-8 code point (or one per byte
 * through byte fallback), then merges. Merging picks, among all adjacent
 * pairs whose concatenation is in the vocabulary, the one with the highest
 * score, leftmost on ties. Instead of rescanning every pair after each merge
 * (quadratic), candidate pairs sit in a max-heap ordered by (score, left
 * position); stale entries are skipped when popped. The result is the same
 * as the rescanning loop: node positions keep their left-to-right order.
 */
#include "internal.h"

#include <ctype.h>
#include <limits.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#if !defined(_WIN32)
#include <unistd.h>
#endif

#define MAX_PIECE_BYTES (1 << 16)

struct llama2_tokenizer {
    int vocab_size;
    unsigned max_token_length;
    char **pieces; /* NUL-terminated copies (the NUL is not part of the piece) */
    int *lens;
    float *scores;
    char *blob;           /* storage for pieces */
    int *table;           /* open-addressing hash table of token ids, -1 = empty */
    size_t table_mask;
    unsigned char byte_pieces[256];
    int space_id;         /* id of the piece " ", or -1 */
};

/* ---- lookup ---- */

static uint64_t hash_bytes(const char *s, size_t n) {
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)s[i];
        h *= 1099511628211ull;
    }
    return h;
}

static int lookup(const llama2_tokenizer *tk, const char *s, size_t n) {
    size_t i = (size_t)hash_bytes(s, n) & tk->table_mask;
    for (;;) {
        int id = tk->table[i];
        if (id < 0) return -1;
        if ((size_t)tk->lens[id] == n && memcmp(tk->pieces[id], s, n) == 0) return id;
        i = (i + 1) & tk->table_mask;
    }
}

static int build_table(llama2_tokenizer *tk) {
    size_t size = 16;
    while (size < (size_t)tk->vocab_size * 2) size *= 2;
    tk->table = (int *)malloc(size * sizeof(int));
    if (!tk->table) return 0;
    memset(tk->table, 0xff, size * sizeof(int));
    tk->table_mask = size - 1;
    for (int id = 0; id < tk->vocab_size; id++) {
        size_t i = (size_t)hash_bytes(tk->pieces[id], (size_t)tk->lens[id]) & tk->table_mask;
        int dup = 0;
        while (tk->table[i] >= 0) {
            int other = tk->table[i];
            if (tk->lens[other] == tk->lens[id] && memcmp(tk->pieces[other], tk->pieces[id], (size_t)tk->lens[id]) == 0) {
                dup = 1; /* a repeated piece: the lowest id wins */
                break;
            }
            i = (i + 1) & tk->table_mask;
        }
        if (!dup) tk->table[i] = id;
    }
    return 1;
}

/* ---- loading ---- */

/* The tokenizer file as a stream, if it is a regular file (files.c). */
static FILE *open_regular(const char *path, llama2_error *err, int *rc) {
    int fd;
    int64_t size;
    if ((*rc = llama2_open_regular(path, &fd, &size, err))) return NULL;
#if defined(_WIN32)
    FILE *f = fopen(path, "rb");
#else
    FILE *f = fdopen(fd, "rb");
    if (!f) close(fd);
#endif
    if (!f) *rc = llama2_fail(err, LLAMA2_ERR_IO, "%s: cannot open tokenizer file: %s", path, strerror(errno));
    return f;
}

static int read_file(const char *path, unsigned char **data, size_t *size, llama2_error *err) {
    int rc = LLAMA2_OK;
    FILE *f = open_regular(path, err, &rc);
    if (!f) return rc;
    size_t cap = 1 << 16, n = 0;
    unsigned char *buf = (unsigned char *)malloc(cap);
    while (buf) {
        size_t got = fread(buf + n, 1, cap - n, f);
        n += got;
        if (n < cap) break;
        unsigned char *grown = (unsigned char *)realloc(buf, cap * 2);
        if (!grown) { free(buf); buf = NULL; break; }
        buf = grown;
        cap *= 2;
    }
    int failed = ferror(f);
    fclose(f);
    if (!buf) return llama2_fail(err, LLAMA2_ERR_NOMEM, "out of memory reading %s", path);
    if (failed) { free(buf); return llama2_fail(err, LLAMA2_ERR_IO, "%s: read error", path); }
    *data = buf;
    *size = n;
    return LLAMA2_OK;
}

void llama2_tokenizer_free(llama2_tokenizer *tk) {
    if (!tk) return;
    free(tk->pieces);
    free(tk->lens);
    free(tk->scores);
    free(tk->blob);
    free(tk->table);
    free(tk);
}

static int parse(llama2_tokenizer *tk, const unsigned char *d, size_t size, int vocab_size,
                 const char *path, llama2_error *err) {
    if (size < 4) return llama2_fail(err, LLAMA2_ERR_FORMAT, "%s: too small to be a tokenizer (%zu bytes)", path, size);
    uint32_t max_len;
    memcpy(&max_len, d, 4);
    if (max_len == 0 || max_len > MAX_PIECE_BYTES)
        return llama2_fail(err, LLAMA2_ERR_FORMAT, "%s: implausible max_token_length %u", path, max_len);
    tk->max_token_length = max_len;
    /* first pass: count and check entries */
    size_t off = 4;
    int count = 0;
    while (off < size && (vocab_size < 0 || count < vocab_size)) {
        if (size - off < 8)
            return llama2_fail(err, LLAMA2_ERR_FORMAT, "%s: truncated at token %d (entry header cut short)", path, count);
        int32_t len;
        memcpy(&len, d + off + 4, 4);
        if (len < 0)
            return llama2_fail(err, LLAMA2_ERR_FORMAT, "%s: token %d has negative length %d", path, count, len);
        if ((uint32_t)len > max_len)
            return llama2_fail(err, LLAMA2_ERR_FORMAT, "%s: token %d is %d bytes, longer than max_token_length %u",
                               path, count, len, max_len);
        if (size - off - 8 < (size_t)len)
            return llama2_fail(err, LLAMA2_ERR_FORMAT, "%s: truncated inside token %d", path, count);
        off += 8 + (size_t)len;
        count++;
        if (count > (1 << 22)) return llama2_fail(err, LLAMA2_ERR_FORMAT, "%s: too many tokens", path);
    }
    if (vocab_size >= 0 && count < vocab_size)
        return llama2_fail(err, LLAMA2_ERR_FORMAT, "%s: holds %d tokens but the model's vocab_size is %d",
                           path, count, vocab_size);
    if (count < 3)
        return llama2_fail(err, LLAMA2_ERR_FORMAT, "%s: holds %d tokens; a vocabulary needs at least <unk>, <s>, </s>",
                           path, count);
    tk->vocab_size = count;
    tk->pieces = (char **)malloc((size_t)count * sizeof(char *));
    tk->lens = (int *)malloc((size_t)count * sizeof(int));
    tk->scores = (float *)malloc((size_t)count * sizeof(float));
    tk->blob = (char *)malloc(off + (size_t)count);
    if (!tk->pieces || !tk->lens || !tk->scores || !tk->blob)
        return llama2_fail(err, LLAMA2_ERR_NOMEM, "out of memory loading tokenizer");
    char *out = tk->blob;
    off = 4;
    for (int i = 0; i < count; i++) {
        int32_t len;
        memcpy(&tk->scores[i], d + off, 4);
        memcpy(&len, d + off + 4, 4);
        memcpy(out, d + off + 8, (size_t)len);
        out[len] = '\0';
        tk->pieces[i] = out;
        tk->lens[i] = len;
        out += len + 1;
        off += 8 + (size_t)len;
    }
    for (int i = 0; i < 256; i++) tk->byte_pieces[i] = (unsigned char)i;
    if (!build_table(tk)) return llama2_fail(err, LLAMA2_ERR_NOMEM, "out of memory loading tokenizer");
    tk->space_id = lookup(tk, " ", 1);
    return LLAMA2_OK;
}

int llama2_tokenizer_open(llama2_tokenizer **out, const char *path, int vocab_size,
                          llama2_error *err) {
    llama2_ok(err);
    if (!out || !path) return llama2_fail(err, LLAMA2_ERR_ARGUMENT, "null argument");
    *out = NULL;
    unsigned char *data = NULL;
    size_t size = 0;
    int rc = read_file(path, &data, &size, err);
    if (rc) return rc;
    llama2_tokenizer *tk = (llama2_tokenizer *)calloc(1, sizeof(*tk));
    if (!tk) { free(data); return llama2_fail(err, LLAMA2_ERR_NOMEM, "out of memory"); }
    if (llama2_is_gguf(data, (int64_t)size)) { /* a GGUF model: its own vocabulary, as a tokenizer.bin image */
        unsigned char *bin = NULL;
        size_t bin_size = 0;
        rc = llama2_gguf_tokenizer_bin(data, size, &bin, &bin_size, err);
        free(data);
        if (rc) { free(tk); return rc; }
        data = bin;
        size = bin_size;
    }
    rc = parse(tk, data, size, vocab_size, path, err);
    free(data);
    if (rc) { llama2_tokenizer_free(tk); return rc; }
    *out = tk;
    return LLAMA2_OK;
}

int llama2_tokenizer_vocab_size(const llama2_tokenizer *tk) { return tk ? tk->vocab_size : 0; }

int llama2_tokenizer_piece(const llama2_tokenizer *tk, int token, const char **piece, int *len,
                           float *score, llama2_error *err) {
    if (!tk || token < 0 || token >= tk->vocab_size)
        return llama2_fail(err, LLAMA2_ERR_ARGUMENT, "token %d out of range [0, %d)", token, tk ? tk->vocab_size : 0);
    if (piece) *piece = tk->pieces[token];
    if (len) *len = tk->lens[token];
    if (score) *score = tk->scores[token];
    return LLAMA2_OK;
}

/* ---- decoding ---- */

static int hex_digit(int c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

int llama2_decode(const llama2_tokenizer *tk, int prev_token, int token, const char **piece,
                  int *len, llama2_error *err) {
    if (!tk || token < 0 || token >= tk->vocab_size)
        return llama2_fail(err, LLAMA2_ERR_ARGUMENT, "token %d out of range [0, %d)", token, tk ? tk->vocab_size : 0);
    const char *p = tk->pieces[token];
    int n = tk->lens[token];
    /* after BOS a leading space is dropped (SentencePiece's dummy prefix) */
    if (prev_token == LLAMA2_TOKEN_BOS && n > 0 && p[0] == ' ') { p++; n--; }
    /* <0xHH> is a raw byte */
    if (n >= 4 && p[0] == '<' && p[1] == '0' && p[2] == 'x') {
        int h1 = hex_digit((unsigned char)p[3]);
        if (h1 >= 0) {
            int value = h1;
            int h2 = n >= 5 ? hex_digit((unsigned char)p[4]) : -1;
            if (h2 >= 0) value = value * 16 + h2;
            p = (const char *)&tk->byte_pieces[value];
            n = 1;
        }
    }
    *piece = p;
    *len = n;
    return LLAMA2_OK;
}

/* ---- printable text ---- */

void llama2_utf8_filter_reset(llama2_utf8_filter *f) { memset(f, 0, sizeof(*f)); }

int llama2_utf8_filter_push(llama2_utf8_filter *f, const char *piece, int len, char *out) {
    if (len <= 0) return 0;
    if (len > 1) {
        /* a whole piece: print it as it is; an unfinished character before it is lost */
        f->n_pending = 0;
        memcpy(out, piece, (size_t)len);
        return len;
    }
    unsigned char b = (unsigned char)piece[0];
    if (f->n_pending > 0) {
        if ((b & 0xC0) == 0x80) {
            f->pending[f->n_pending++] = b;
            if (f->n_pending < f->n_needed) return 0;
            int n = f->n_pending;
            memcpy(out, f->pending, (size_t)n);
            f->n_pending = 0;
            return n;
        }
        f->n_pending = 0; /* broken sequence: drop it */
    }
    if (b < 0x80) {
        if (isprint(b) || isspace(b)) { out[0] = (char)b; return 1; }
        return 0;
    }
    int need = b >= 0xC2 && b <= 0xDF ? 2 : b >= 0xE0 && b <= 0xEF ? 3 : b >= 0xF0 && b <= 0xF4 ? 4 : 0;
    if (need) {
        f->pending[0] = b;
        f->n_pending = 1;
        f->n_needed = need;
    }
    return 0;
}

/* ---- encoding ---- */

typedef struct {
    float score;
    int left;  /* node index of the left token */
    int right; /* node index of the right token */
    int ltok, rtok, merged;
} pair;

/* max-heap: higher score first, then the leftmost pair */
static int pair_before(const pair *a, const pair *b) {
    if (a->score != b->score) return a->score > b->score;
    return a->left < b->left;
}

static void heap_push(pair *h, int *n, pair p) {
    int i = (*n)++;
    h[i] = p;
    while (i > 0) {
        int up = (i - 1) / 2;
        if (!pair_before(&h[i], &h[up])) break;
        pair tmp = h[i]; h[i] = h[up]; h[up] = tmp;
        i = up;
    }
}

static pair heap_pop(pair *h, int *n) {
    pair top = h[0];
    h[0] = h[--(*n)];
    int i = 0;
    for (;;) {
        int l = 2 * i + 1, r = l + 1, best = i;
        if (l < *n && pair_before(&h[l], &h[best])) best = l;
        if (r < *n && pair_before(&h[r], &h[best])) best = r;
        if (best == i) break;
        pair tmp = h[i]; h[i] = h[best]; h[best] = tmp;
        i = best;
    }
    return top;
}

/* Pushes the pair (node a, node b) if their concatenation is a token. */
static void consider(const llama2_tokenizer *tk, const int *tok, int a, int b, char *buf,
                     pair *heap, int *n_heap) {
    int ta = tok[a], tb = tok[b];
    size_t la = (size_t)tk->lens[ta], lb = (size_t)tk->lens[tb];
    memcpy(buf, tk->pieces[ta], la);
    memcpy(buf + la, tk->pieces[tb], lb);
    int id = lookup(tk, buf, la + lb);
    if (id < 0 || !(tk->scores[id] > -1e10f)) return;
    pair p = {tk->scores[id], a, b, ta, tb, id};
    heap_push(heap, n_heap, p);
}

int llama2_encode(llama2_tokenizer *tk, const char *text, size_t len, int bos, int eos,
                  int *tokens, int *n_tokens, llama2_error *err) {
    llama2_ok(err);
    if (!tk || (!text && len) || !tokens || !n_tokens)
        return llama2_fail(err, LLAMA2_ERR_ARGUMENT, "null argument");
    if (len > (size_t)INT_MAX - 3)
        return llama2_fail(err, LLAMA2_ERR_ARGUMENT, "text of %zu bytes is too long to encode", len);
    int n = 0;
    if (bos) tokens[n++] = LLAMA2_TOKEN_BOS;
    if (len > 0 && tk->space_id >= 0) tokens[n++] = tk->space_id;

    /* code points (lead byte + up to 3 continuation bytes) or raw bytes */
    char cp[4];
    size_t cp_len = 0;
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)text[i];
        if ((c & 0xC0) != 0x80) cp_len = 0;
        cp[cp_len++] = (char)c;
        int next_is_cont = i + 1 < len && (((unsigned char)text[i + 1]) & 0xC0) == 0x80;
        if (next_is_cont && cp_len < 4) continue;
        int id = lookup(tk, cp, cp_len);
        if (id >= 0) {
            tokens[n++] = id;
        } else {
            /* byte fallback: <0x00>..<0xFF> are ids 3..258, as in llama2.c; a
             * vocabulary too small to hold a byte's id gets <unk> (id 0) */
            for (size_t j = 0; j < cp_len; j++) {
                int byte_id = (unsigned char)cp[j] + 3;
                tokens[n++] = byte_id < tk->vocab_size ? byte_id : 0;
            }
        }
        cp_len = 0;
    }

    /* merges over a linked list of nodes; BOS takes part in pairs too, as in llama2.c */
    if (n > 1) {
        int *prev = (int *)malloc((size_t)n * sizeof(int));
        int *next = (int *)malloc((size_t)n * sizeof(int));
        /* n - 1 initial pairs, at most 2 more per merge: 3n entries suffice */
        pair *heap = (pair *)malloc((size_t)(3 * n) * sizeof(pair));
        char *buf = (char *)malloc(2 * (size_t)tk->max_token_length + 8);
        if (!prev || !next || !heap || !buf) {
            free(prev); free(next); free(heap); free(buf);
            return llama2_fail(err, LLAMA2_ERR_NOMEM, "out of memory encoding %zu bytes", len);
        }
        int n_heap = 0;
        for (int i = 0; i < n; i++) { prev[i] = i - 1; next[i] = i + 1 < n ? i + 1 : -1; }
        for (int i = 0; i + 1 < n; i++) consider(tk, tokens, i, i + 1, buf, heap, &n_heap);
        while (n_heap > 0) {
            pair p = heap_pop(heap, &n_heap);
            /* stale unless both nodes still hold the tokens the pair was made from */
            if (tokens[p.left] != p.ltok || next[p.left] != p.right || tokens[p.right] != p.rtok) continue;
            tokens[p.left] = p.merged;
            tokens[p.right] = -1;
            int after = next[p.right];
            next[p.left] = after;
            if (after >= 0) prev[after] = p.left;
            if (prev[p.left] >= 0) consider(tk, tokens, prev[p.left], p.left, buf, heap, &n_heap);
            if (after >= 0) consider(tk, tokens, p.left, after, buf, heap, &n_heap);
        }
        int m = 0;
        for (int i = 0; i >= 0; i = next[i]) tokens[m++] = tokens[i];
        n = m;
        free(prev); free(next); free(heap); free(buf);
    }
    if (eos) tokens[n++] = LLAMA2_TOKEN_EOS;
    *n_tokens = n;
    return LLAMA2_OK;
}
