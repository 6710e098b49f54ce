/* prepare.c - build the tokenizer file and llm.c-style token shards.
 *
 *   prepare tokenizer --encoder encoder.json --merges vocab.bpe --out FILE.tok
 *       Convert GPT-2's encoder.json + vocab.bpe into the tokenizer file
 *       format documented at the top of tokenizer.h.
 *   prepare shards --tokenizer FILE.tok --input TEXT [--input TEXT ...] --out PREFIX
 *                  [--val-fraction 0.1] [--doc-separator LINE]
 *       Tokenise UTF-8 text into PREFIX_train.bin and PREFIX_val.bin (SPEC §16).
 *   prepare encode --tokenizer FILE.tok --input TEXT [--input TEXT ...]
 *       Print each input's ids, space-separated, one line per input.
 *   prepare decode --tokenizer FILE.tok --input IDS
 *       Write the bytes of whitespace-separated ids to stdout.
 *
 * Exit status: 0 ok, 1 bad input or I/O error, 2 bad command line.
 * Build: cc -std=c11 -O2 -Wall -Wextra -o data/prepare data/prepare.c
 */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define BPE_IMPLEMENTATION
#include "tokenizer.h"

/* llm.c shard headers (dev/data/data_common.py): uint16 tokens while V fits. */
#define SHARD_HEADER_INTS 256
#define SHARD_MAGIC_U16   20240520u
#define SHARD_VERSION_U16 1u
#define SHARD_MAGIC_U32   20240801u
#define SHARD_VERSION_U32 7u

static const char *USAGE =
    "usage:\n"
    "  prepare tokenizer --encoder encoder.json --merges vocab.bpe --out FILE.tok\n"
    "  prepare shards --tokenizer FILE.tok --input TEXT [--input TEXT ...] --out PREFIX\n"
    "                 [--val-fraction F] [--doc-separator LINE]\n"
    "  prepare encode --tokenizer FILE.tok --input TEXT [--input TEXT ...]\n"
    "  prepare decode --tokenizer FILE.tok --input IDS\n"
    "\n"
    "tokenizer  convert GPT-2's encoder.json and vocab.bpe into a tokenizer file\n"
    "shards     write PREFIX_train.bin and PREFIX_val.bin (llm.c format: 256 x int32\n"
    "           header, magic 20240520 version 1, uint16 tokens). Each input file is\n"
    "           one document, or several split at lines equal to --doc-separator\n"
    "           (the separator lines are dropped). Every document is preceded by the\n"
    "           end-of-text token. The LAST F of the documents (default 0.1, in input\n"
    "           order) go to val, the rest to train.\n"
    "encode     print each input's token ids, space-separated, one line per input\n"
    "decode     write the bytes of whitespace-separated token ids to stdout\n";

/* ---- errors and small utilities ----------------------------------------- */

/* Command-line mistakes: one line, then exit 2 (never returns). */
static void usage_error(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("error: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputs(" (see 'prepare --help')\n", stderr);
    va_end(ap);
    exit(2);
}

/* Everything else: one line, and the caller returns -1 / exits 1. */
static int error(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("error: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    return -1;
}

static void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (!p) { error("out of memory (%zu bytes)", n); exit(1); }
    return p;
}

static void *xrealloc(void *p, size_t n)
{
    p = realloc(p, n ? n : 1);
    if (!p) { error("out of memory (%zu bytes)", n); exit(1); }
    return p;
}

/* Growable byte buffer. */
typedef struct { unsigned char *p; size_t n, cap; } Buf;

static void buf_push(Buf *b, const void *data, size_t n)
{
    if (b->n + n > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->n + n) cap *= 2;
        b->p = (unsigned char *)xrealloc(b->p, cap);
        b->cap = cap;
    }
    memcpy(b->p + b->n, data, n);
    b->n += n;
}

static char *str_concat(const char *a, const char *b)
{
    size_t la = strlen(a), lb = strlen(b);
    char *s = (char *)xmalloc(la + lb + 1);
    memcpy(s, a, la);
    memcpy(s + la, b, lb + 1);
    return s;
}

/* Whole file into memory, NUL-terminated (the NUL is not counted in *len). */
static char *read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f) { error("cannot open '%s': %s", path, strerror(errno)); return NULL; }
    Buf b = {NULL, 0, 0};
    char chunk[1 << 16];
    size_t got;
    while ((got = fread(chunk, 1, sizeof chunk, f)) > 0) buf_push(&b, chunk, got);
    int bad = ferror(f);
    fclose(f);
    if (bad) { free(b.p); error("cannot read '%s'", path); return NULL; }
    buf_push(&b, "", 1);
    *len = b.n - 1;
    return (char *)b.p;
}

/* ---- converting GPT-2's encoder.json + vocab.bpe ------------------------- */

/* Minimal JSON reader for encoder.json: one object of string -> integer. */
typedef struct { const char *s; size_t n, i; const char *path; } Json;

static int json_fail(const Json *j, const char *what)
{
    return error("%s: %s at byte %zu", j->path, what, j->i);
}

static void json_skip_ws(Json *j)
{
    while (j->i < j->n && j->s[j->i] && strchr(" \t\r\n", j->s[j->i])) j->i++;
}

static int json_expect(Json *j, char c)
{
    json_skip_ws(j);
    if (j->i >= j->n || j->s[j->i] != c) {
        char what[32];
        snprintf(what, sizeof what, "expected '%c'", c);
        return json_fail(j, what);
    }
    j->i++;
    return 0;
}

static void utf8_append(Buf *b, uint32_t cp)
{
    unsigned char u[4];
    size_t n;
    if (cp < 0x80)       { u[0] = (unsigned char)cp; n = 1; }
    else if (cp < 0x800) { u[0] = (unsigned char)(0xC0 | cp >> 6); n = 2; }
    else if (cp < 0x10000) { u[0] = (unsigned char)(0xE0 | cp >> 12); n = 3; }
    else                 { u[0] = (unsigned char)(0xF0 | cp >> 18); n = 4; }
    for (size_t k = 1; k < n; k++) u[k] = (unsigned char)(0x80 | ((cp >> (6 * (n - 1 - k))) & 0x3F));
    buf_push(b, u, n);
}

static int json_hex4(Json *j, uint32_t *v)
{
    *v = 0;
    for (int k = 0; k < 4; k++, j->i++) {
        char c = j->i < j->n ? j->s[j->i] : 0;
        int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10
              : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
        if (d < 0) return json_fail(j, "bad \\u escape");
        *v = *v << 4 | (uint32_t)d;
    }
    return 0;
}

/* A JSON string, decoded to UTF-8 into out (cleared first). */
static int json_string(Json *j, Buf *out)
{
    out->n = 0;
    if (json_expect(j, '"')) return -1;
    while (j->i < j->n && j->s[j->i] != '"') {
        unsigned char c = (unsigned char)j->s[j->i++];
        if (c < 0x20) return json_fail(j, "control character in string");
        if (c != '\\') { buf_push(out, &c, 1); continue; }
        if (j->i >= j->n) break;
        char e = j->s[j->i++];
        static const char names[] = "\"\\/bfnrt", values[] = "\"\\/\b\f\n\r\t";
        const char *plain = e ? strchr(names, e) : NULL;
        if (plain) { buf_push(out, &values[plain - names], 1); continue; }
        if (e != 'u') return json_fail(j, "bad escape");
        uint32_t cp, lo;
        if (json_hex4(j, &cp)) return -1;
        if (cp >= 0xD800 && cp <= 0xDBFF) { /* a surrogate pair */
            if (j->i + 2 > j->n || j->s[j->i] != '\\' || j->s[j->i + 1] != 'u') return json_fail(j, "lone surrogate");
            j->i += 2;
            if (json_hex4(j, &lo)) return -1;
            if (lo < 0xDC00 || lo > 0xDFFF) return json_fail(j, "bad surrogate pair");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
        } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
            return json_fail(j, "lone surrogate");
        }
        utf8_append(out, cp);
    }
    if (j->i >= j->n) return json_fail(j, "unterminated string");
    j->i++;
    return 0;
}

static int json_uint(Json *j, uint32_t *v)
{
    json_skip_ws(j);
    uint64_t x = 0;
    size_t start = j->i;
    while (j->i < j->n && j->s[j->i] >= '0' && j->s[j->i] <= '9') {
        x = x * 10 + (uint64_t)(j->s[j->i++] - '0');
        if (x > UINT32_MAX) return json_fail(j, "number too large");
    }
    if (j->i == start) return json_fail(j, "expected a non-negative integer");
    *v = (uint32_t)x;
    return 0;
}

/* GPT-2 files spell each byte as one code point (bpe_byte_to_unicode); turn
 * such a UTF-8 string back into raw bytes. Those code points are all < 0x800,
 * so only 1- and 2-byte UTF-8 occurs. */
static int unicode_to_bytes(const unsigned char *s, size_t n, const int inverse[0x800], Buf *out)
{
    out->n = 0;
    for (size_t i = 0; i < n;) {
        uint32_t cp;
        if (s[i] < 0x80) {
            cp = s[i++];
        } else if ((s[i] & 0xE0) == 0xC0 && i + 1 < n && (s[i + 1] & 0xC0) == 0x80) {
            cp = (uint32_t)(s[i] & 0x1F) << 6 | (s[i + 1] & 0x3F);
            i += 2;
        } else {
            return -1;
        }
        if (cp >= 0x800 || inverse[cp] < 0) return -1;
        unsigned char b = (unsigned char)inverse[cp];
        buf_push(out, &b, 1);
    }
    return 0;
}

static void byte_decoder(int inverse[0x800])
{
    uint32_t map[256];
    bpe_byte_to_unicode(map);
    for (int i = 0; i < 0x800; i++) inverse[i] = -1;
    for (int b = 0; b < 256; b++) inverse[map[b]] = b;
}

/* The vocabulary of encoder.json, in id order. */
typedef struct { uint32_t n; uint32_t *lens; Buf blob; uint32_t eot; } Vocab;

static int read_encoder_json(const char *path, Vocab *v)
{
    size_t len;
    char *text = read_file(path, &len);
    if (!text) return -1;
    int inverse[0x800];
    byte_decoder(inverse);
    Json j = { text, len, 0, path };
    Buf key = {NULL, 0, 0}, raw = {NULL, 0, 0}, blob = {NULL, 0, 0};
    size_t n = 0, cap = 0;
    uint32_t *ids = NULL, *offs = NULL, *lens = NULL, *order = NULL;
    int rc = -1, found_eot = 0;

    /* 1: collect (id, bytes) in file order */
    if (json_expect(&j, '{')) goto done;
    json_skip_ws(&j);
    if (j.i < j.n && j.s[j.i] == '}') { json_fail(&j, "empty vocabulary"); goto done; }
    for (;;) {
        uint32_t id = 0;
        if (json_string(&j, &key) || json_expect(&j, ':') || json_uint(&j, &id)) goto done;
        if (unicode_to_bytes(key.p, key.n, inverse, &raw) || raw.n == 0) {
            json_fail(&j, "key is not a GPT-2 byte-level token");
            goto done;
        }
        if (n == cap) {
            cap = cap ? 2 * cap : 1024;
            ids = (uint32_t *)xrealloc(ids, cap * sizeof *ids);
            offs = (uint32_t *)xrealloc(offs, cap * sizeof *offs);
            lens = (uint32_t *)xrealloc(lens, cap * sizeof *lens);
        }
        if (raw.n == 13 && memcmp(raw.p, "<|endoftext|>", 13) == 0) { v->eot = id; found_eot = 1; }
        ids[n] = id; offs[n] = (uint32_t)blob.n; lens[n] = (uint32_t)raw.n;
        buf_push(&blob, raw.p, raw.n);
        n++;
        json_skip_ws(&j);
        if (j.i < j.n && j.s[j.i] == ',') { j.i++; continue; }
        if (json_expect(&j, '}')) goto done;
        break;
    }
    json_skip_ws(&j);
    if (j.i != j.n) { json_fail(&j, "trailing data"); goto done; }
    if (!found_eot) { error("%s: no \"<|endoftext|>\" token", path); goto done; }

    /* 2: ids must be exactly 0..n-1; lay the tokens out in id order */
    order = (uint32_t *)xmalloc(n * sizeof *order);
    for (size_t i = 0; i < n; i++) order[i] = UINT32_MAX;
    for (size_t i = 0; i < n; i++) {
        if (ids[i] >= n) { error("%s: id %u but only %zu tokens (ids must be 0..%zu)", path, ids[i], n, n - 1); goto done; }
        if (order[ids[i]] != UINT32_MAX) { error("%s: id %u appears twice", path, ids[i]); goto done; }
        order[ids[i]] = (uint32_t)i;
    }
    v->n = (uint32_t)n;
    v->lens = (uint32_t *)xmalloc(n * sizeof *v->lens);
    for (size_t id = 0; id < n; id++) {
        v->lens[id] = lens[order[id]];
        buf_push(&v->blob, blob.p + offs[order[id]], lens[order[id]]);
    }
    rc = 0;
done:
    free(text); free(key.p); free(raw.p); free(blob.p);
    free(ids); free(offs); free(lens); free(order);
    return rc;
}

/* vocab.bpe: a "#version" line, then one merge "left right" per line in rank
 * order. Symbols are looked up in vocab_only (a tokenizer without merges). */
static int read_merges(const char *path, const BpeTokenizer *vocab_only, uint32_t **merges, uint32_t *n_merges)
{
    size_t len;
    char *text = read_file(path, &len);
    if (!text) return -1;
    int inverse[0x800];
    byte_decoder(inverse);
    Buf raw = {NULL, 0, 0};
    size_t n = 0, cap = 0, line_no = 0;
    uint32_t *m = NULL;
    int rc = -1;
    for (char *line = text; line < text + len;) {
        char *eol = (char *)memchr(line, '\n', (size_t)(text + len - line));
        if (!eol) eol = text + len;
        *eol = '\0';
        line_no++;
        char *next = eol + 1;
        if (eol > line && eol[-1] == '\r') eol[-1] = '\0';
        if ((line_no == 1 && strncmp(line, "#version", 8) == 0) || line[strspn(line, " \t")] == '\0') {
            line = next;
            continue;
        }
        char *sides[3];
        int k = 0;
        for (char *tok = strtok(line, " \t"); tok && k < 3; tok = strtok(NULL, " \t")) sides[k++] = tok;
        if (k != 2) { error("%s:%zu: expected two symbols", path, line_no); goto done; }
        if (n == cap) { cap = cap ? 2 * cap : 1024; m = (uint32_t *)xrealloc(m, 2 * cap * sizeof *m); }
        for (int s = 0; s < 2; s++) {
            if (unicode_to_bytes((unsigned char *)sides[s], strlen(sides[s]), inverse, &raw) ||
                !bpe_find_token(vocab_only, raw.p, raw.n, &m[2 * n + s])) {
                error("%s:%zu: symbol '%s' is not in the vocabulary", path, line_no, sides[s]);
                goto done;
            }
        }
        n++;
        line = next;
    }
    if (n > UINT32_MAX / 2) { error("%s: too many merges", path); goto done; }
    *merges = m;
    *n_merges = (uint32_t)n;
    m = NULL;
    rc = 0;
done:
    free(text); free(raw.p); free(m);
    return rc;
}

static int cmd_tokenizer(const char *encoder_path, const char *merges_path, const char *out)
{
    Vocab v;
    BpeTokenizer vocab_only, tok;
    uint32_t *merges = NULL, n_merges = 0;
    char *tmp;
    int merges_ok, saved, rc = 1;
    memset(&v, 0, sizeof v);
    if (read_encoder_json(encoder_path, &v)) return 1;
    if (bpe_init(&vocab_only, v.n, v.lens, v.blob.p, 0, NULL, v.eot)) goto done;
    merges_ok = read_merges(merges_path, &vocab_only, &merges, &n_merges) == 0;
    bpe_free(&vocab_only);
    if (!merges_ok || bpe_init(&tok, v.n, v.lens, v.blob.p, n_merges, merges, v.eot)) goto done;

    tmp = str_concat(out, ".tmp"); /* tmp + rename: never a half-written file */
    saved = bpe_save(&tok, tmp) == 0;
    if (saved && rename(tmp, out) != 0) { error("cannot write '%s': %s", out, strerror(errno)); saved = 0; }
    if (!saved) remove(tmp);
    free(tmp);
    bpe_free(&tok);
    if (!saved || bpe_load(&tok, out)) goto done; /* read it back: the file must load */
    printf("wrote %s: %u tokens, %u merges, end-of-text id %u\n",
           out, bpe_vocab_size(&tok), tok.n_merges, bpe_eot_id(&tok));
    bpe_free(&tok);
    rc = 0;
done:
    free(v.lens); free(v.blob.p); free(merges);
    return rc;
}

/* ---- documents and shards ------------------------------------------------ */

/* Walks the documents of one file: the whole file, or the pieces between
 * lines equal to sep (LF or CRLF line ends). Empty documents are skipped. */
typedef struct { const char *buf; size_t len, pos; const char *sep; } DocIter;

static int next_doc(DocIter *it, const char **doc, size_t *doc_len)
{
    while (it->pos < it->len) {
        size_t start = it->pos, end = it->len, p = start;
        it->pos = it->len;
        while (it->sep && p < it->len) {
            const char *nl = (const char *)memchr(it->buf + p, '\n', it->len - p);
            size_t eol = nl ? (size_t)(nl - it->buf) : it->len;
            size_t line_end = eol > p && it->buf[eol - 1] == '\r' ? eol - 1 : eol;
            size_t next = nl ? eol + 1 : it->len;
            if (line_end - p == strlen(it->sep) && memcmp(it->buf + p, it->sep, line_end - p) == 0) {
                end = p;
                it->pos = next;
                break;
            }
            p = next;
        }
        if (end > start) { *doc = it->buf + start; *doc_len = end - start; return 1; }
    }
    return 0;
}

/* One output shard, written to PATH.tmp and renamed on success. */
typedef struct { FILE *f; char *path, *tmp; uint64_t ntok; int wide; } Shard;

static int shard_open(Shard *s, const char *prefix, const char *suffix, int wide)
{
    memset(s, 0, sizeof *s);
    s->path = str_concat(prefix, suffix);
    s->tmp = str_concat(s->path, ".tmp");
    s->wide = wide;
    s->f = fopen(s->tmp, "wb");
    if (!s->f) return error("cannot create '%s': %s", s->tmp, strerror(errno));
    unsigned char zeros[SHARD_HEADER_INTS * 4] = {0}; /* the real header is written at the end */
    if (fwrite(zeros, 1, sizeof zeros, s->f) != sizeof zeros) return error("cannot write '%s'", s->tmp);
    return 0;
}

static int shard_append(Shard *s, const uint32_t *ids, size_t n)
{
    size_t width = s->wide ? 4 : 2;
    unsigned char *out = (unsigned char *)xmalloc(n * width);
    for (size_t i = 0; i < n; i++)
        for (size_t b = 0; b < width; b++) out[i * width + b] = (unsigned char)(ids[i] >> (8 * b));
    int ok = fwrite(out, width, n, s->f) == n;
    free(out);
    s->ntok += n;
    if (!ok) return error("cannot write '%s': %s", s->tmp, strerror(errno));
    if (s->ntok > INT32_MAX) return error("'%s': more than 2^31-1 tokens in one shard", s->path);
    return 0;
}

/* Write the header and close; the caller renames tmp -> path once all shards are done. */
static int shard_close(Shard *s)
{
    unsigned char header[SHARD_HEADER_INTS * 4] = {0};
    uint32_t fields[3] = { s->wide ? SHARD_MAGIC_U32 : SHARD_MAGIC_U16,
                           s->wide ? SHARD_VERSION_U32 : SHARD_VERSION_U16, (uint32_t)s->ntok };
    for (int i = 0; i < 3; i++)
        for (int b = 0; b < 4; b++) header[4 * i + b] = (unsigned char)(fields[i] >> (8 * b));
    if (fseek(s->f, 0, SEEK_SET) != 0 || fwrite(header, 1, sizeof header, s->f) != sizeof header) {
        fclose(s->f);
        remove(s->tmp);
        return error("cannot write '%s'", s->tmp);
    }
    int ok = fflush(s->f) == 0 && !ferror(s->f);
    if (fclose(s->f) != 0) ok = 0;
    s->f = NULL;
    if (!ok) { remove(s->tmp); return error("cannot write '%s': %s", s->tmp, strerror(errno)); }
    return 0;
}

static int shard_publish(Shard *s)
{
    if (rename(s->tmp, s->path) != 0) {
        error("cannot rename '%s' to '%s': %s", s->tmp, s->path, strerror(errno));
        remove(s->tmp);
        return -1;
    }
    return 0;
}

/* Discards an unfinished shard's temp file. */
static void shard_free(Shard *s)
{
    if (s->f) fclose(s->f);
    if (s->tmp) remove(s->tmp);
    free(s->path); free(s->tmp);
}

/* Encode one document and check it decodes back to the same bytes. */
static int encode_doc(const BpeTokenizer *t, const char *doc, size_t len, uint32_t **ids, size_t *n)
{
    if (bpe_encode(t, doc, len, ids, n)) return -1;
    unsigned char *back;
    size_t back_len;
    if (bpe_decode(t, *ids, *n, &back, &back_len)) { free(*ids); return -1; }
    int same = back_len == len && memcmp(back, doc, len) == 0;
    free(back);
    if (!same) { free(*ids); return error("internal: encoding does not round-trip"); }
    return 0;
}

static int count_docs(const char **inputs, int n_inputs, const char *sep, size_t *n_docs)
{
    *n_docs = 0;
    for (int k = 0; k < n_inputs; k++) {
        size_t len, before = *n_docs, dlen;
        char *text = read_file(inputs[k], &len);
        if (!text) return -1;
        DocIter it = { text, len, 0, sep };
        const char *doc;
        while (next_doc(&it, &doc, &dlen)) (*n_docs)++;
        if (*n_docs == before) fprintf(stderr, "warning: '%s' has no text, skipped\n", inputs[k]);
        free(text);
    }
    return 0;
}

static int cmd_shards(const char *tok_path, const char **inputs, int n_inputs, const char *prefix,
                      double val_fraction, const char *sep)
{
    BpeTokenizer t;
    if (bpe_load(&t, tok_path)) return 1;
    Shard train, val;
    memset(&train, 0, sizeof train);
    memset(&val, 0, sizeof val);
    size_t n_docs, n_val, doc_index = 0;
    uint32_t eot = bpe_eot_id(&t);
    int wide = bpe_vocab_size(&t) > 65536;
    uint64_t n_train_tok, n_val_tok;
    int rc = 1;

    /* pass 1: count documents, to know where val starts */
    if (count_docs(inputs, n_inputs, sep, &n_docs)) goto done;
    if (n_docs == 0) { error("no documents in the input"); goto done; }
    n_val = (size_t)(val_fraction * (double)n_docs + 0.5);
    if (val_fraction > 0 && n_val == 0) n_val = 1;
    if (n_val >= n_docs && val_fraction > 0) {
        error("%zu document(s) cannot be split into train and val; give more files, "
              "--doc-separator, or --val-fraction 0", n_docs);
        goto done;
    }

    /* pass 2: tokenise each document, <|endoftext|> first, into its shard */
    if (shard_open(&train, prefix, "_train.bin", wide) || shard_open(&val, prefix, "_val.bin", wide)) goto done;
    for (int k = 0; k < n_inputs; k++) {
        size_t len, dlen;
        char *text = read_file(inputs[k], &len);
        if (!text) goto done;
        DocIter it = { text, len, 0, sep };
        const char *doc;
        int ok = 1;
        while (ok && next_doc(&it, &doc, &dlen)) {
            Shard *s = doc_index++ < n_docs - n_val ? &train : &val;
            uint32_t *ids;
            size_t n;
            ok = encode_doc(&t, doc, dlen, &ids, &n) == 0;
            if (ok) {
                ok = shard_append(s, &eot, 1) == 0 && shard_append(s, ids, n) == 0;
                free(ids);
            }
        }
        free(text);
        if (!ok) goto done;
        if (doc_index > n_docs) { error("'%s' changed while it was read", inputs[k]); goto done; }
    }
    n_train_tok = train.ntok;
    n_val_tok = val.ntok;
    if (shard_close(&train) || shard_close(&val) || shard_publish(&train) || shard_publish(&val)) goto done;
    printf("documents: %zu (train %zu, val %zu = the last %.1f%%)\n", n_docs, n_docs - n_val, n_val,
           100.0 * (double)n_val / (double)n_docs);
    printf("wrote %s: %llu tokens\n", train.path, (unsigned long long)n_train_tok);
    printf("wrote %s: %llu tokens\n", val.path, (unsigned long long)n_val_tok);
    rc = 0;
done:
    shard_free(&train);
    shard_free(&val);
    bpe_free(&t);
    return rc;
}

/* ---- encode / decode ----------------------------------------------------- */

static int cmd_encode(const char *tok_path, const char **inputs, int n_inputs)
{
    BpeTokenizer t;
    if (bpe_load(&t, tok_path)) return 1;
    int rc = 0;
    for (int k = 0; k < n_inputs && rc == 0; k++) {
        size_t len, n;
        uint32_t *ids;
        char *text = read_file(inputs[k], &len);
        if (!text || bpe_encode(&t, text, len, &ids, &n)) { free(text); rc = 1; break; }
        for (size_t i = 0; i < n; i++) printf(i ? " %u" : "%u", ids[i]);
        putchar('\n');
        free(ids);
        free(text);
    }
    if (fflush(stdout) != 0 || ferror(stdout)) { error("cannot write to stdout"); rc = 1; }
    bpe_free(&t);
    return rc;
}

static int cmd_decode(const char *tok_path, const char *input)
{
    BpeTokenizer t;
    if (bpe_load(&t, tok_path)) return 1;
    size_t len, n = 0, cap = 0;
    char *text = read_file(input, &len);
    uint32_t *ids = NULL;
    unsigned char *bytes;
    size_t n_bytes;
    int ok, rc = 1;
    if (!text) goto done;
    for (char *p = text;;) {
        p += strspn(p, " \t\r\n");
        if (*p == '\0') break;
        char *end;
        errno = 0;
        unsigned long v = strtoul(p, &end, 10);
        if (end == p || *p == '-' || errno || v > UINT32_MAX || !strchr(" \t\r\n", *end)) {
            error("%s: not a token id near byte %zu", input, (size_t)(p - text));
            goto done;
        }
        if (n == cap) { cap = cap ? 2 * cap : 1024; ids = (uint32_t *)xrealloc(ids, cap * sizeof *ids); }
        ids[n++] = (uint32_t)v;
        p = end;
    }
    if (bpe_decode(&t, ids, n, &bytes, &n_bytes)) goto done;
    ok = fwrite(bytes, 1, n_bytes, stdout) == n_bytes && fflush(stdout) == 0;
    free(bytes);
    if (!ok) { error("cannot write to stdout"); goto done; }
    rc = 0;
done:
    free(text); free(ids);
    bpe_free(&t);
    return rc;
}

/* ---- command line ------------------------------------------------------- */

typedef struct {
    const char *encoder, *merges, *out, *tokenizer, *separator, *val_fraction;
    const char **inputs;
    int n_inputs;
} Args;

/* Parse "--name value" pairs; `allowed` lists the options this command takes. */
static void parse_args(int argc, char **argv, const char *cmd, const char *allowed, Args *a)
{
    memset(a, 0, sizeof *a);
    a->inputs = (const char **)xmalloc((size_t)argc * sizeof *a->inputs);
    for (int i = 2; i < argc; i++) {
        const char *opt = argv[i];
        if (!strcmp(opt, "--help") || !strcmp(opt, "-h")) { fputs(USAGE, stdout); exit(0); }
        char key[64];
        snprintf(key, sizeof key, " %s ", opt);
        if (strncmp(opt, "--", 2) != 0 || strlen(opt) > 40 || !strstr(allowed, key))
            usage_error("unknown option '%s' for '%s'", opt, cmd);
        if (i + 1 >= argc) usage_error("option '%s' needs a value", opt);
        const char *v = argv[++i];
        if (!strcmp(opt, "--encoder")) a->encoder = v;
        else if (!strcmp(opt, "--merges")) a->merges = v;
        else if (!strcmp(opt, "--out")) a->out = v;
        else if (!strcmp(opt, "--tokenizer")) a->tokenizer = v;
        else if (!strcmp(opt, "--doc-separator")) a->separator = v;
        else if (!strcmp(opt, "--val-fraction")) a->val_fraction = v;
        else if (!strcmp(opt, "--input")) a->inputs[a->n_inputs++] = v;
    }
}

static void require(const char *value, const char *opt, const char *cmd)
{
    if (!value) usage_error("'%s' needs %s", cmd, opt);
}

int main(int argc, char **argv)
{
    if (argc < 2) usage_error("missing command");
    const char *cmd = argv[1];
    if (!strcmp(cmd, "--help") || !strcmp(cmd, "-h") || !strcmp(cmd, "help")) { fputs(USAGE, stdout); return 0; }
    Args a;
    int rc;
    if (!strcmp(cmd, "tokenizer")) {
        parse_args(argc, argv, cmd, " --encoder --merges --out ", &a);
        require(a.encoder, "--encoder", cmd); require(a.merges, "--merges", cmd); require(a.out, "--out", cmd);
        rc = cmd_tokenizer(a.encoder, a.merges, a.out);
    } else if (!strcmp(cmd, "shards")) {
        parse_args(argc, argv, cmd, " --tokenizer --input --out --val-fraction --doc-separator ", &a);
        require(a.tokenizer, "--tokenizer", cmd); require(a.out, "--out", cmd);
        if (a.n_inputs == 0) usage_error("'shards' needs at least one --input");
        double frac = 0.1;
        if (a.val_fraction) {
            char *end;
            frac = strtod(a.val_fraction, &end);
            if (end == a.val_fraction || *end != '\0' || !(frac >= 0.0 && frac < 1.0))
                usage_error("--val-fraction must be a number in [0, 1), got '%s'", a.val_fraction);
        }
        if (a.separator && (a.separator[0] == '\0' || strchr(a.separator, '\n')))
            usage_error("--doc-separator must be a non-empty single line");
        rc = cmd_shards(a.tokenizer, a.inputs, a.n_inputs, a.out, frac, a.separator);
    } else if (!strcmp(cmd, "encode")) {
        parse_args(argc, argv, cmd, " --tokenizer --input ", &a);
        require(a.tokenizer, "--tokenizer", cmd);
        if (a.n_inputs == 0) usage_error("'encode' needs at least one --input");
        rc = cmd_encode(a.tokenizer, a.inputs, a.n_inputs);
    } else if (!strcmp(cmd, "decode")) {
        parse_args(argc, argv, cmd, " --tokenizer --input ", &a);
        require(a.tokenizer, "--tokenizer", cmd);
        if (a.n_inputs != 1) usage_error("'decode' needs exactly one --input");
        rc = cmd_decode(a.tokenizer, a.inputs[0]);
    } else {
        usage_error("unknown command '%s'", cmd);
        return 2;
    }
    free(a.inputs);
    return rc;
}
