/* tokenizer.h - GPT-2 byte-level BPE tokenizer in one stb-style header.
 *
 * Use:   #define BPE_IMPLEMENTATION      (in exactly one .c file)
 *        #include "tokenizer.h"
 * Every other file only includes it. No global state: everything lives in a
 * BpeTokenizer, which is read-only after bpe_load/bpe_init, so one tokenizer
 * may be shared by threads.
 *
 * Encoding (same ids as GPT-2 / the npm package gpt-3-encoder):
 *   1. Pre-tokenise the UTF-8 text with GPT-2's pattern
 *        's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
 *      hand-written below (bpe__pretoken_end). \p{L}, \p{N} and \s are those of
 *      JavaScript's /u regular expressions (the reference encoder is JS); the
 *      range tables at the bottom are generated from node by
 *      data/gen_unicode_tables.js, so the classification is exact for that
 *      Unicode version, not an approximation. Note JS \s is not Python's: it
 *      includes U+FEFF and excludes U+001C..U+001F and U+0085.
 *   2. Each pre-token's bytes start as single-byte tokens; repeatedly merge the
 *      adjacent pair with the lowest merge rank (all its occurrences, left to
 *      right) until no adjacent pair is a merge.
 *   Merge ranks are keyed by the (left id, right id) pair, as in OpenAI's
 *   encoder.py. gpt-3-encoder keys them by the string "left,right", so 11
 *   pairs of tokens containing commas alias a real merge there; no text we
 *   tried (the corpus, and every string of up to 6 characters over
 *   " \"',.()[]{}a") encodes differently because of it.
 *   Invalid UTF-8 bytes are kept as they are (each is one "other" character,
 *   so the encoding stays lossless); a JS caller would have seen U+FFFD
 *   instead, so ids differ from the reference on invalid UTF-8.
 *   Text is never scanned for special tokens: "<|endoftext|>" in the input is
 *   encoded as ordinary text, exactly like the reference encoder.
 *   Cost: linear in the text, except that one pre-token of length n costs
 *   O(n * merge rounds) (a 100 KB run of letters without a space: ~2 s).
 *
 * Token ids are byte strings here, not GPT-2's "byte-to-unicode" strings:
 * that mapping (bpe_byte_to_unicode) is only needed to read GPT-2's own
 * encoder.json / vocab.bpe, which data/prepare.c converts into this file:
 *
 * Tokenizer file format (all integers uint32 little-endian):
 *   offset 0   header[8]: magic 0x54455042 (the bytes "BPET"), version 1,
 *              vocab_size V, n_merges M, eot_id, blob_size, 0, 0
 *   32         token_len[V]      byte length of token id 0..V-1 (each >= 1)
 *   32+4V      merges[M][2]      (left id, right id); the index is the rank,
 *                                the result is the token whose bytes are
 *                                bytes(left) + bytes(right)
 *   32+4V+8M   blob[blob_size]   token bytes, id 0 first, back to back
 *   end-4      checksum          FNV-1a 32 of every byte before it
 *   The file size must be exactly 32 + 4V + 8M + blob_size + 4. On load we
 *   also require: every single byte is a token, tokens are unique, every merge
 *   result is a token, merge pairs are unique, eot_id < V.
 */
#ifndef BPE_TOKENIZER_H
#define BPE_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

#define BPE_FILE_MAGIC   0x54455042u /* "BPET" read as a little-endian uint32 */
#define BPE_FILE_VERSION 1u
#define BPE_GPT2_EOT     50256u      /* GPT-2's <|endoftext|> id */

typedef struct {
    uint32_t vocab_size;
    uint32_t n_merges;
    uint32_t eot_id;
    uint32_t *tok_off;        /* [vocab_size + 1] offsets of each token in tok_bytes */
    unsigned char *tok_bytes; /* all token bytes back to back */
    uint32_t *merges;         /* [n_merges][2] left, right; index = rank */
    uint32_t *merge_result;   /* [n_merges] id of left+right */
    uint32_t byte_id[256];    /* id of each single-byte token */
    uint32_t *tok_slots;      /* hash table bytes -> id; slot holds id+1, 0 = empty */
    uint32_t tok_mask;        /* table size - 1 (a power of two minus one) */
    uint32_t *pair_slots;     /* hash table (left,right) -> rank; slot holds rank+1 */
    uint32_t pair_mask;
} BpeTokenizer;

/* Read a tokenizer file. Returns 0, or prints one line to stderr and returns -1
 * (missing, truncated or corrupt file). On failure *t needs no bpe_free. */
int bpe_load(BpeTokenizer *t, const char *path);
/* Write *t in the file format above. Returns 0, or prints an error and returns -1. */
int bpe_save(const BpeTokenizer *t, const char *path);
/* Build a tokenizer from memory (copied): token i is blob[sum(lens[<i]) ...] of
 * length lens[i]; merges is [n_merges][2] (left, right) in rank order.
 * Returns 0, or prints why the data is invalid and returns -1. */
int bpe_init(BpeTokenizer *t, uint32_t vocab_size, const uint32_t *lens,
             const unsigned char *blob, uint32_t n_merges, const uint32_t *merges,
             uint32_t eot_id);
void bpe_free(BpeTokenizer *t);

/* Encode len bytes of UTF-8 text. On success *ids is a malloc'ed array of
 * *n_ids token ids (free() it; NULL when *n_ids is 0) and 0 is returned;
 * -1 on out of memory (message printed). */
int bpe_encode(const BpeTokenizer *t, const char *text, size_t len,
               uint32_t **ids, size_t *n_ids);
/* Concatenate the bytes of ids into a malloc'ed buffer (*out, *out_len; free()
 * it). Returns 0, or -1 for an id >= vocab size or out of memory (message printed). */
int bpe_decode(const BpeTokenizer *t, const uint32_t *ids, size_t n_ids,
               unsigned char **out, size_t *out_len);
/* Bytes of one token (not NUL-terminated), or NULL if id >= vocab size. */
const unsigned char *bpe_token_bytes(const BpeTokenizer *t, uint32_t id, size_t *len);
/* Look a byte string up in the vocabulary: 1 and *id if present, else 0. */
int bpe_find_token(const BpeTokenizer *t, const void *bytes, size_t len, uint32_t *id);
uint32_t bpe_vocab_size(const BpeTokenizer *t);
uint32_t bpe_eot_id(const BpeTokenizer *t);
/* GPT-2's reversible byte -> code point map used by encoder.json/vocab.bpe:
 * printable bytes map to themselves, the others to 256, 257, ... in order. */
void bpe_byte_to_unicode(uint32_t map[256]);

#endif /* BPE_TOKENIZER_H */

/* ======================================================================= */
#ifdef BPE_IMPLEMENTATION

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define BPE__HEADER_BYTES 32u
#define BPE__NO_RANK      UINT32_MAX
#define BPE__INVALID_CP   UINT32_MAX /* a byte that is not valid UTF-8 */

/* ---- small helpers ---------------------------------------------------- */

static uint32_t bpe__fnv1a(const unsigned char *p, size_t n, uint32_t h)
{
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 16777619u;
    return h;
}
#define BPE__FNV_SEED 2166136261u

static uint32_t bpe__pair_hash(uint32_t left, uint32_t right)
{
    uint64_t k = ((uint64_t)left << 32 | right) * 0x9E3779B97F4A7C15ull;
    return (uint32_t)(k >> 32);
}

static uint32_t bpe__get_u32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void bpe__put_u32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)v; p[1] = (unsigned char)(v >> 8);
    p[2] = (unsigned char)(v >> 16); p[3] = (unsigned char)(v >> 24);
}

/* Smallest power of two >= 2n (load factor <= 1/2 keeps probe chains short). */
static uint32_t bpe__table_size(uint32_t n)
{
    uint32_t size = 16;
    while (size < 2 * (uint64_t)n) size *= 2;
    return size;
}

/* ---- vocabulary and merge hash tables --------------------------------- */

const unsigned char *bpe_token_bytes(const BpeTokenizer *t, uint32_t id, size_t *len)
{
    if (id >= t->vocab_size) { if (len) *len = 0; return NULL; }
    if (len) *len = t->tok_off[id + 1] - t->tok_off[id];
    return t->tok_bytes + t->tok_off[id];
}

int bpe_find_token(const BpeTokenizer *t, const void *bytes, size_t len, uint32_t *id)
{
    uint32_t i = bpe__fnv1a((const unsigned char *)bytes, len, BPE__FNV_SEED) & t->tok_mask;
    for (; t->tok_slots[i] != 0; i = (i + 1) & t->tok_mask) {
        uint32_t cand = t->tok_slots[i] - 1;
        size_t clen;
        const unsigned char *cb = bpe_token_bytes(t, cand, &clen);
        if (clen == len && memcmp(cb, bytes, len) == 0) { *id = cand; return 1; }
    }
    return 0;
}

/* Rank of merging (left, right), or BPE__NO_RANK if that pair is no merge. */
static uint32_t bpe__pair_rank(const BpeTokenizer *t, uint32_t left, uint32_t right)
{
    uint32_t i = bpe__pair_hash(left, right) & t->pair_mask;
    for (; t->pair_slots[i] != 0; i = (i + 1) & t->pair_mask) {
        uint32_t r = t->pair_slots[i] - 1;
        if (t->merges[2 * r] == left && t->merges[2 * r + 1] == right) return r;
    }
    return BPE__NO_RANK;
}

/* Insert every token into the bytes -> id table; fails on a duplicate. */
static int bpe__index_tokens(BpeTokenizer *t, const char *where)
{
    for (uint32_t id = 0; id < t->vocab_size; id++) {
        size_t len;
        const unsigned char *b = bpe_token_bytes(t, id, &len);
        uint32_t dup;
        if (bpe_find_token(t, b, len, &dup)) {
            fprintf(stderr, "error: %s: tokens %u and %u have the same bytes\n", where, dup, id);
            return -1;
        }
        uint32_t i = bpe__fnv1a(b, len, BPE__FNV_SEED) & t->tok_mask;
        while (t->tok_slots[i] != 0) i = (i + 1) & t->tok_mask;
        t->tok_slots[i] = id + 1;
    }
    return 0;
}

/* Byte-level BPE needs every byte as a token, so encoding can never fail. */
static int bpe__index_bytes(BpeTokenizer *t, const char *where)
{
    for (int b = 0; b < 256; b++) {
        unsigned char c = (unsigned char)b;
        if (!bpe_find_token(t, &c, 1, &t->byte_id[b])) {
            fprintf(stderr, "error: %s: byte 0x%02X is not a token\n", where, b);
            return -1;
        }
    }
    return 0;
}

/* Resolve each merge's result token and insert the pair -> rank table. */
static int bpe__index_merges(BpeTokenizer *t, const char *where)
{
    size_t max_len = 0; /* scratch for bytes(left) + bytes(right) */
    for (uint32_t id = 0; id < t->vocab_size; id++) {
        size_t len;
        bpe_token_bytes(t, id, &len);
        if (len > max_len) max_len = len;
    }
    unsigned char *buf = (unsigned char *)malloc(2 * max_len);
    if (!buf) { fprintf(stderr, "error: %s: out of memory\n", where); return -1; }
    int rc = -1;
    for (uint32_t r = 0; r < t->n_merges; r++) {
        uint32_t left = t->merges[2 * r], right = t->merges[2 * r + 1];
        if (left >= t->vocab_size || right >= t->vocab_size) {
            fprintf(stderr, "error: %s: merge %u refers to token %u, vocab size is %u\n", where,
                    r, left >= t->vocab_size ? left : right, t->vocab_size);
            goto done;
        }
        size_t ll, rl;
        const unsigned char *lb = bpe_token_bytes(t, left, &ll);
        const unsigned char *rb = bpe_token_bytes(t, right, &rl);
        memcpy(buf, lb, ll);
        memcpy(buf + ll, rb, rl);
        if (!bpe_find_token(t, buf, ll + rl, &t->merge_result[r])) {
            fprintf(stderr, "error: %s: merge %u (%u + %u) does not give a token\n", where, r, left, right);
            goto done;
        }
        if (bpe__pair_rank(t, left, right) != BPE__NO_RANK) {
            fprintf(stderr, "error: %s: merge %u (%u + %u) is a duplicate\n", where, r, left, right);
            goto done;
        }
        uint32_t i = bpe__pair_hash(left, right) & t->pair_mask;
        while (t->pair_slots[i] != 0) i = (i + 1) & t->pair_mask;
        t->pair_slots[i] = r + 1;
    }
    rc = 0;
done:
    free(buf);
    return rc;
}

void bpe_free(BpeTokenizer *t)
{
    free(t->tok_off); free(t->tok_bytes); free(t->merges); free(t->merge_result);
    free(t->tok_slots); free(t->pair_slots);
    memset(t, 0, sizeof *t);
}

/* bpe_init, naming `where` (a file, or "tokenizer") in its error messages. */
static int bpe__init(BpeTokenizer *t, uint32_t vocab_size, const uint32_t *lens,
                     const unsigned char *blob, uint32_t n_merges, const uint32_t *merges,
                     uint32_t eot_id, const char *where)
{
    memset(t, 0, sizeof *t);
    if (vocab_size < 256 || vocab_size > (1u << 30) || n_merges > (1u << 30) || eot_id >= vocab_size) {
        fprintf(stderr, "error: %s: bad sizes (vocab %u, merges %u, eot %u)\n", where,
                vocab_size, n_merges, eot_id);
        return -1;
    }
    uint32_t tok_size = bpe__table_size(vocab_size), pair_size = bpe__table_size(n_merges);
    uint64_t total = 0;
    /* offsets, rejecting empty tokens and a total that overflows uint32 */
    t->tok_off = (uint32_t *)malloc(((size_t)vocab_size + 1) * sizeof *t->tok_off);
    if (!t->tok_off) goto oom;
    for (uint32_t i = 0; i < vocab_size; i++) {
        if (lens[i] == 0) { fprintf(stderr, "error: %s: token %u is empty\n", where, i); goto fail; }
        t->tok_off[i] = (uint32_t)total;
        total += lens[i];
        if (total > UINT32_MAX) { fprintf(stderr, "error: %s: token bytes exceed 4 GiB\n", where); goto fail; }
    }
    t->tok_off[vocab_size] = (uint32_t)total;

    t->vocab_size = vocab_size;
    t->n_merges = n_merges;
    t->eot_id = eot_id;
    t->tok_bytes = (unsigned char *)malloc(total ? (size_t)total : 1);
    t->merges = (uint32_t *)malloc(((size_t)n_merges * 2 + 1) * sizeof *t->merges);
    t->merge_result = (uint32_t *)malloc(((size_t)n_merges + 1) * sizeof *t->merge_result);
    t->tok_slots = (uint32_t *)calloc(tok_size, sizeof *t->tok_slots);
    t->pair_slots = (uint32_t *)calloc(pair_size, sizeof *t->pair_slots);
    if (!t->tok_bytes || !t->merges || !t->merge_result || !t->tok_slots || !t->pair_slots) goto oom;
    t->tok_mask = tok_size - 1;
    t->pair_mask = pair_size - 1;
    memcpy(t->tok_bytes, blob, (size_t)total);
    if (n_merges) memcpy(t->merges, merges, (size_t)n_merges * 2 * sizeof *merges);

    if (bpe__index_tokens(t, where) || bpe__index_bytes(t, where) || bpe__index_merges(t, where)) goto fail;
    return 0;
oom:
    fprintf(stderr, "error: %s: out of memory\n", where);
fail:
    bpe_free(t);
    return -1;
}

int bpe_init(BpeTokenizer *t, uint32_t vocab_size, const uint32_t *lens,
             const unsigned char *blob, uint32_t n_merges, const uint32_t *merges,
             uint32_t eot_id)
{
    return bpe__init(t, vocab_size, lens, blob, n_merges, merges, eot_id, "tokenizer");
}

uint32_t bpe_vocab_size(const BpeTokenizer *t) { return t->vocab_size; }
uint32_t bpe_eot_id(const BpeTokenizer *t) { return t->eot_id; }

void bpe_byte_to_unicode(uint32_t map[256])
{
    uint32_t next = 256;
    for (uint32_t b = 0; b < 256; b++) {
        int printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
        map[b] = printable ? b : next++;
    }
}

/* ---- file I/O ----------------------------------------------------------- */

/* Whole file into memory. Returns NULL (message printed) on any error. */
static unsigned char *bpe__read_file(const char *path, size_t *size)
{
    FILE *f = fopen(path, "rb");
    if (!f) { fprintf(stderr, "error: cannot open tokenizer file '%s'\n", path); return NULL; }
    unsigned char *buf = NULL;
    long end = -1;
    if (fseek(f, 0, SEEK_END) == 0) end = ftell(f);
    if (end < 0 || fseek(f, 0, SEEK_SET) != 0) {
        fprintf(stderr, "error: cannot read tokenizer file '%s'\n", path);
        fclose(f);
        return NULL;
    }
    buf = (unsigned char *)malloc(end > 0 ? (size_t)end : 1);
    if (!buf) { fprintf(stderr, "error: out of memory reading '%s'\n", path); fclose(f); return NULL; }
    if (fread(buf, 1, (size_t)end, f) != (size_t)end) {
        fprintf(stderr, "error: cannot read tokenizer file '%s'\n", path);
        free(buf); fclose(f);
        return NULL;
    }
    fclose(f);
    *size = (size_t)end;
    return buf;
}

/* Check and decode a whole tokenizer file, buf[0..size), into *t. */
static int bpe__load_buffer(BpeTokenizer *t, const unsigned char *buf, size_t size, const char *path)
{
    if (size < BPE__HEADER_BYTES + 4) {
        fprintf(stderr, "error: '%s': truncated tokenizer file (%zu bytes)\n", path, size);
        return -1;
    }
    uint32_t h[8];
    for (int i = 0; i < 8; i++) h[i] = bpe__get_u32(buf + 4 * i);
    if (h[0] != BPE_FILE_MAGIC) {
        fprintf(stderr, "error: '%s': not a tokenizer file (bad magic 0x%08X)\n", path, h[0]);
        return -1;
    }
    if (h[1] != BPE_FILE_VERSION) {
        fprintf(stderr, "error: '%s': unsupported tokenizer version %u (expected %u)\n",
                path, h[1], BPE_FILE_VERSION);
        return -1;
    }
    uint32_t vocab = h[2], n_merges = h[3], eot = h[4], blob_size = h[5];
    uint64_t expect = (uint64_t)BPE__HEADER_BYTES + 4ull * vocab + 8ull * n_merges + blob_size + 4;
    if (size != expect) {
        fprintf(stderr, "error: '%s': %s tokenizer file (%zu bytes, header implies %llu)\n",
                path, size < expect ? "truncated" : "corrupt", size, (unsigned long long)expect);
        return -1;
    }
    if (bpe__get_u32(buf + size - 4) != bpe__fnv1a(buf, size - 4, BPE__FNV_SEED)) {
        fprintf(stderr, "error: '%s': corrupt tokenizer file (checksum mismatch)\n", path);
        return -1;
    }
    /* decode the little-endian arrays into host order */
    const unsigned char *p = buf + BPE__HEADER_BYTES;
    uint32_t *lens = (uint32_t *)malloc(((size_t)vocab + 1) * sizeof *lens);
    uint32_t *merges = (uint32_t *)malloc(((size_t)n_merges * 2 + 1) * sizeof *merges);
    if (!lens || !merges) {
        fprintf(stderr, "error: out of memory loading '%s'\n", path);
        free(lens); free(merges);
        return -1;
    }
    uint64_t sum = 0;
    for (uint32_t i = 0; i < vocab; i++, p += 4) sum += lens[i] = bpe__get_u32(p);
    for (uint32_t i = 0; i < 2 * n_merges; i++, p += 4) merges[i] = bpe__get_u32(p);
    int rc = -1;
    if (sum != blob_size) {
        fprintf(stderr, "error: '%s': corrupt tokenizer file (token lengths sum to %llu, header says %u)\n",
                path, (unsigned long long)sum, blob_size);
    } else if (bpe__init(t, vocab, lens, p, n_merges, merges, eot, path) == 0) {
        rc = 0;
    }
    free(lens); free(merges);
    return rc;
}

int bpe_load(BpeTokenizer *t, const char *path)
{
    memset(t, 0, sizeof *t);
    size_t size;
    unsigned char *buf = bpe__read_file(path, &size);
    if (!buf) return -1;
    int rc = bpe__load_buffer(t, buf, size, path);
    free(buf);
    return rc;
}

int bpe_save(const BpeTokenizer *t, const char *path)
{
    uint32_t blob = t->tok_off[t->vocab_size];
    size_t size = BPE__HEADER_BYTES + 4 * (size_t)t->vocab_size + 8 * (size_t)t->n_merges + blob + 4;
    unsigned char *buf = (unsigned char *)calloc(size, 1);
    if (!buf) { fprintf(stderr, "error: out of memory saving '%s'\n", path); return -1; }
    uint32_t h[8] = { BPE_FILE_MAGIC, BPE_FILE_VERSION, t->vocab_size, t->n_merges, t->eot_id, blob, 0, 0 };
    unsigned char *p = buf;
    for (int i = 0; i < 8; i++, p += 4) bpe__put_u32(p, h[i]);
    for (uint32_t i = 0; i < t->vocab_size; i++, p += 4) bpe__put_u32(p, t->tok_off[i + 1] - t->tok_off[i]);
    for (uint32_t i = 0; i < 2 * t->n_merges; i++, p += 4) bpe__put_u32(p, t->merges[i]);
    memcpy(p, t->tok_bytes, blob);
    bpe__put_u32(buf + size - 4, bpe__fnv1a(buf, size - 4, BPE__FNV_SEED));

    FILE *f = fopen(path, "wb");
    int ok = f && fwrite(buf, 1, size, f) == size;
    if (f && fclose(f) != 0) ok = 0;
    free(buf);
    if (!ok) { fprintf(stderr, "error: cannot write tokenizer file '%s'\n", path); return -1; }
    return 0;
}

/* ---- pre-tokenisation --------------------------------------------------- */

enum { BPE__SPACE, BPE__LETTER, BPE__NUMBER, BPE__OTHER };

/* Decode one UTF-8 character at s[0..n) (n >= 1): returns its byte length and
 * sets *cp. Anything malformed (bad lead/continuation byte, truncated, overlong,
 * surrogate, > U+10FFFF) is one byte with *cp = BPE__INVALID_CP. */
static size_t bpe__utf8_next(const unsigned char *s, size_t n, uint32_t *cp)
{
    unsigned c = s[0];
    size_t len;
    uint32_t v, min;
    if (c < 0x80) { *cp = c; return 1; }
    if ((c & 0xE0) == 0xC0)      { len = 2; v = c & 0x1F; min = 0x80; }
    else if ((c & 0xF0) == 0xE0) { len = 3; v = c & 0x0F; min = 0x800; }
    else if ((c & 0xF8) == 0xF0) { len = 4; v = c & 0x07; min = 0x10000; }
    else goto invalid;
    if (len > n) goto invalid;
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xC0) != 0x80) goto invalid;
        v = v << 6 | (s[i] & 0x3F);
    }
    if (v < min || v > 0x10FFFF || (v >= 0xD800 && v <= 0xDFFF)) goto invalid;
    *cp = v;
    return len;
invalid:
    *cp = BPE__INVALID_CP;
    return 1;
}

static int bpe__in_ranges(uint32_t cp, const uint32_t (*r)[2], size_t n)
{
    size_t lo = 0, hi = n; /* binary search for the range with r[i][0] <= cp */
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (r[mid][1] < cp) lo = mid + 1; else hi = mid;
    }
    return lo < n && r[lo][0] <= cp;
}

static int bpe__class(uint32_t cp);

/* Class and byte length of the character at s[0..n), n >= 1. */
static size_t bpe__char_at(const unsigned char *s, size_t n, int *cls)
{
    uint32_t cp;
    size_t len = bpe__utf8_next(s, n, &cp);
    *cls = bpe__class(cp);
    return len;
}

/* End of the run of characters of class cls starting at s[i] (which has it). */
static size_t bpe__run_end(const unsigned char *s, size_t n, size_t i, int cls)
{
    while (i < n) {
        int c;
        size_t len = bpe__char_at(s + i, n - i, &c);
        if (c != cls) break;
        i += len;
    }
    return i;
}

/* Byte offset where the pre-token starting at s[i] ends: the alternatives of
 * the GPT-2 pattern are tried in order, as the regex engine does. */
static size_t bpe__pretoken_end(const unsigned char *s, size_t n, size_t i)
{
    /* 's 't 'm 'd 're 've 'll  (ASCII, case-sensitive) */
    if (s[i] == '\'' && i + 1 < n) {
        unsigned char a = s[i + 1], b = i + 2 < n ? s[i + 2] : 0;
        if (a == 's' || a == 't' || a == 'm' || a == 'd') return i + 2;
        if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return i + 3;
    }
    /* ' ?\p{L}+', ' ?\p{N}+', ' ?[^\s\p{L}\p{N}]+': an optional space, then a
     * run of one class. The three classes are disjoint, so at most one applies. */
    size_t j = i + (s[i] == ' ' && i + 1 < n);
    int cls;
    bpe__char_at(s + j, n - j, &cls);
    if (cls != BPE__SPACE) return bpe__run_end(s, n, j, cls);

    /* '\s+(?!\S)' then '\s+': a whitespace run, but if a non-space follows it,
     * give back the run's last character so it can prefix the next word
     * (" word"); a single whitespace character before a non-space stays alone. */
    size_t last = i, k = i;
    while (k < n) {
        int c;
        size_t len = bpe__char_at(s + k, n - k, &c);
        if (c != BPE__SPACE) break;
        last = k;
        k += len;
    }
    if (k < n && last > i) return last;
    return k;
}

/* ---- byte-pair merging -------------------------------------------------- */

typedef struct { uint32_t *v; size_t n, cap; } BpeIds;

static int bpe__reserve(BpeIds *a, size_t want)
{
    if (want <= a->cap) return 0;
    size_t cap = a->cap ? a->cap : 64;
    while (cap < want) cap *= 2;
    uint32_t *v = (uint32_t *)realloc(a->v, cap * sizeof *v);
    if (!v) return -1;
    a->v = v;
    a->cap = cap;
    return 0;
}

/* BPE one pre-token (bytes w[0..len)), appending its ids to out. word is
 * scratch space. Each round merges every occurrence, left to right, of the
 * lowest-ranked adjacent pair; O(len * rounds), fine for word-sized pieces. */
static int bpe__encode_piece(const BpeTokenizer *t, const unsigned char *w, size_t len,
                             BpeIds *word, BpeIds *out)
{
    if (bpe__reserve(word, len) || bpe__reserve(out, out->n + len)) return -1;
    uint32_t *sym = word->v;
    size_t n = len;
    for (size_t i = 0; i < len; i++) sym[i] = t->byte_id[w[i]];
    for (;;) {
        uint32_t best = BPE__NO_RANK;
        for (size_t i = 0; i + 1 < n; i++) {
            uint32_t r = bpe__pair_rank(t, sym[i], sym[i + 1]);
            if (r < best) best = r;
        }
        if (best == BPE__NO_RANK) break;
        uint32_t left = t->merges[2 * best], right = t->merges[2 * best + 1];
        size_t m = 0;
        for (size_t i = 0; i < n;) {
            if (i + 1 < n && sym[i] == left && sym[i + 1] == right) {
                sym[m++] = t->merge_result[best];
                i += 2;
            } else {
                sym[m++] = sym[i++];
            }
        }
        n = m;
    }
    memcpy(out->v + out->n, sym, n * sizeof *sym);
    out->n += n;
    return 0;
}

int bpe_encode(const BpeTokenizer *t, const char *text, size_t len, uint32_t **ids, size_t *n_ids)
{
    const unsigned char *s = (const unsigned char *)text;
    BpeIds out = {NULL, 0, 0}, word = {NULL, 0, 0};
    *ids = NULL;
    *n_ids = 0;
    for (size_t pos = 0; pos < len;) {
        size_t end = bpe__pretoken_end(s, len, pos);
        if (bpe__encode_piece(t, s + pos, end - pos, &word, &out)) {
            fprintf(stderr, "error: out of memory while encoding\n");
            free(out.v); free(word.v);
            return -1;
        }
        pos = end;
    }
    free(word.v);
    if (out.n == 0) { free(out.v); return 0; }
    *ids = out.v;
    *n_ids = out.n;
    return 0;
}

int bpe_decode(const BpeTokenizer *t, const uint32_t *ids, size_t n_ids,
               unsigned char **out, size_t *out_len)
{
    size_t total = 0;
    for (size_t i = 0; i < n_ids; i++) {
        if (ids[i] >= t->vocab_size) {
            fprintf(stderr, "error: token id %u out of range (vocab size %u)\n", ids[i], t->vocab_size);
            return -1;
        }
        total += t->tok_off[ids[i] + 1] - t->tok_off[ids[i]];
    }
    unsigned char *buf = (unsigned char *)malloc(total ? total : 1);
    if (!buf) { fprintf(stderr, "error: out of memory while decoding\n"); return -1; }
    size_t pos = 0;
    for (size_t i = 0; i < n_ids; i++) {
        size_t len;
        const unsigned char *b = bpe_token_bytes(t, ids[i], &len);
        memcpy(buf + pos, b, len);
        pos += len;
    }
    *out = buf;
    *out_len = total;
    return 0;
}

/* ---- Unicode classes ---------------------------------------------------- */

/* Inclusive code point ranges of JS's \p{L}, \p{N} and \s (with /u). */
/* BEGIN GENERATED UNICODE TABLES (Unicode 17.0):
   node data/gen_unicode_tables.js --update data/tokenizer.h */
static const uint32_t bpe__letter_ranges[684][2] = {
    {0x41,0x5A},{0x61,0x7A},{0xAA,0xAA},{0xB5,0xB5},{0xBA,0xBA},{0xC0,0xD6},
    {0xD8,0xF6},{0xF8,0x2C1},{0x2C6,0x2D1},{0x2E0,0x2E4},{0x2EC,0x2EC},{0x2EE,0x2EE},
    {0x370,0x374},{0x376,0x377},{0x37A,0x37D},{0x37F,0x37F},{0x386,0x386},{0x388,0x38A},
    {0x38C,0x38C},{0x38E,0x3A1},{0x3A3,0x3F5},{0x3F7,0x481},{0x48A,0x52F},{0x531,0x556},
    {0x559,0x559},{0x560,0x588},{0x5D0,0x5EA},{0x5EF,0x5F2},{0x620,0x64A},{0x66E,0x66F},
    {0x671,0x6D3},{0x6D5,0x6D5},{0x6E5,0x6E6},{0x6EE,0x6EF},{0x6FA,0x6FC},{0x6FF,0x6FF},
    {0x710,0x710},{0x712,0x72F},{0x74D,0x7A5},{0x7B1,0x7B1},{0x7CA,0x7EA},{0x7F4,0x7F5},
    {0x7FA,0x7FA},{0x800,0x815},{0x81A,0x81A},{0x824,0x824},{0x828,0x828},{0x840,0x858},
    {0x860,0x86A},{0x870,0x887},{0x889,0x88F},{0x8A0,0x8C9},{0x904,0x939},{0x93D,0x93D},
    {0x950,0x950},{0x958,0x961},{0x971,0x980},{0x985,0x98C},{0x98F,0x990},{0x993,0x9A8},
    {0x9AA,0x9B0},{0x9B2,0x9B2},{0x9B6,0x9B9},{0x9BD,0x9BD},{0x9CE,0x9CE},{0x9DC,0x9DD},
    {0x9DF,0x9E1},{0x9F0,0x9F1},{0x9FC,0x9FC},{0xA05,0xA0A},{0xA0F,0xA10},{0xA13,0xA28},
    {0xA2A,0xA30},{0xA32,0xA33},{0xA35,0xA36},{0xA38,0xA39},{0xA59,0xA5C},{0xA5E,0xA5E},
    {0xA72,0xA74},{0xA85,0xA8D},{0xA8F,0xA91},{0xA93,0xAA8},{0xAAA,0xAB0},{0xAB2,0xAB3},
    {0xAB5,0xAB9},{0xABD,0xABD},{0xAD0,0xAD0},{0xAE0,0xAE1},{0xAF9,0xAF9},{0xB05,0xB0C},
    {0xB0F,0xB10},{0xB13,0xB28},{0xB2A,0xB30},{0xB32,0xB33},{0xB35,0xB39},{0xB3D,0xB3D},
    {0xB5C,0xB5D},{0xB5F,0xB61},{0xB71,0xB71},{0xB83,0xB83},{0xB85,0xB8A},{0xB8E,0xB90},
    {0xB92,0xB95},{0xB99,0xB9A},{0xB9C,0xB9C},{0xB9E,0xB9F},{0xBA3,0xBA4},{0xBA8,0xBAA},
    {0xBAE,0xBB9},{0xBD0,0xBD0},{0xC05,0xC0C},{0xC0E,0xC10},{0xC12,0xC28},{0xC2A,0xC39},
    {0xC3D,0xC3D},{0xC58,0xC5A},{0xC5C,0xC5D},{0xC60,0xC61},{0xC80,0xC80},{0xC85,0xC8C},
    {0xC8E,0xC90},{0xC92,0xCA8},{0xCAA,0xCB3},{0xCB5,0xCB9},{0xCBD,0xCBD},{0xCDC,0xCDE},
    {0xCE0,0xCE1},{0xCF1,0xCF2},{0xD04,0xD0C},{0xD0E,0xD10},{0xD12,0xD3A},{0xD3D,0xD3D},
    {0xD4E,0xD4E},{0xD54,0xD56},{0xD5F,0xD61},{0xD7A,0xD7F},{0xD85,0xD96},{0xD9A,0xDB1},
    {0xDB3,0xDBB},{0xDBD,0xDBD},{0xDC0,0xDC6},{0xE01,0xE30},{0xE32,0xE33},{0xE40,0xE46},
    {0xE81,0xE82},{0xE84,0xE84},{0xE86,0xE8A},{0xE8C,0xEA3},{0xEA5,0xEA5},{0xEA7,0xEB0},
    {0xEB2,0xEB3},{0xEBD,0xEBD},{0xEC0,0xEC4},{0xEC6,0xEC6},{0xEDC,0xEDF},{0xF00,0xF00},
    {0xF40,0xF47},{0xF49,0xF6C},{0xF88,0xF8C},{0x1000,0x102A},{0x103F,0x103F},{0x1050,0x1055},
    {0x105A,0x105D},{0x1061,0x1061},{0x1065,0x1066},{0x106E,0x1070},{0x1075,0x1081},{0x108E,0x108E},
    {0x10A0,0x10C5},{0x10C7,0x10C7},{0x10CD,0x10CD},{0x10D0,0x10FA},{0x10FC,0x1248},{0x124A,0x124D},
    {0x1250,0x1256},{0x1258,0x1258},{0x125A,0x125D},{0x1260,0x1288},{0x128A,0x128D},{0x1290,0x12B0},
    {0x12B2,0x12B5},{0x12B8,0x12BE},{0x12C0,0x12C0},{0x12C2,0x12C5},{0x12C8,0x12D6},{0x12D8,0x1310},
    {0x1312,0x1315},{0x1318,0x135A},{0x1380,0x138F},{0x13A0,0x13F5},{0x13F8,0x13FD},{0x1401,0x166C},
    {0x166F,0x167F},{0x1681,0x169A},{0x16A0,0x16EA},{0x16F1,0x16F8},{0x1700,0x1711},{0x171F,0x1731},
    {0x1740,0x1751},{0x1760,0x176C},{0x176E,0x1770},{0x1780,0x17B3},{0x17D7,0x17D7},{0x17DC,0x17DC},
    {0x1820,0x1878},{0x1880,0x1884},{0x1887,0x18A8},{0x18AA,0x18AA},{0x18B0,0x18F5},{0x1900,0x191E},
    {0x1950,0x196D},{0x1970,0x1974},{0x1980,0x19AB},{0x19B0,0x19C9},{0x1A00,0x1A16},{0x1A20,0x1A54},
    {0x1AA7,0x1AA7},{0x1B05,0x1B33},{0x1B45,0x1B4C},{0x1B83,0x1BA0},{0x1BAE,0x1BAF},{0x1BBA,0x1BE5},
    {0x1C00,0x1C23},{0x1C4D,0x1C4F},{0x1C5A,0x1C7D},{0x1C80,0x1C8A},{0x1C90,0x1CBA},{0x1CBD,0x1CBF},
    {0x1CE9,0x1CEC},{0x1CEE,0x1CF3},{0x1CF5,0x1CF6},{0x1CFA,0x1CFA},{0x1D00,0x1DBF},{0x1E00,0x1F15},
    {0x1F18,0x1F1D},{0x1F20,0x1F45},{0x1F48,0x1F4D},{0x1F50,0x1F57},{0x1F59,0x1F59},{0x1F5B,0x1F5B},
    {0x1F5D,0x1F5D},{0x1F5F,0x1F7D},{0x1F80,0x1FB4},{0x1FB6,0x1FBC},{0x1FBE,0x1FBE},{0x1FC2,0x1FC4},
    {0x1FC6,0x1FCC},{0x1FD0,0x1FD3},{0x1FD6,0x1FDB},{0x1FE0,0x1FEC},{0x1FF2,0x1FF4},{0x1FF6,0x1FFC},
    {0x2071,0x2071},{0x207F,0x207F},{0x2090,0x209C},{0x2102,0x2102},{0x2107,0x2107},{0x210A,0x2113},
    {0x2115,0x2115},{0x2119,0x211D},{0x2124,0x2124},{0x2126,0x2126},{0x2128,0x2128},{0x212A,0x212D},
    {0x212F,0x2139},{0x213C,0x213F},{0x2145,0x2149},{0x214E,0x214E},{0x2183,0x2184},{0x2C00,0x2CE4},
    {0x2CEB,0x2CEE},{0x2CF2,0x2CF3},{0x2D00,0x2D25},{0x2D27,0x2D27},{0x2D2D,0x2D2D},{0x2D30,0x2D67},
    {0x2D6F,0x2D6F},{0x2D80,0x2D96},{0x2DA0,0x2DA6},{0x2DA8,0x2DAE},{0x2DB0,0x2DB6},{0x2DB8,0x2DBE},
    {0x2DC0,0x2DC6},{0x2DC8,0x2DCE},{0x2DD0,0x2DD6},{0x2DD8,0x2DDE},{0x2E2F,0x2E2F},{0x3005,0x3006},
    {0x3031,0x3035},{0x303B,0x303C},{0x3041,0x3096},{0x309D,0x309F},{0x30A1,0x30FA},{0x30FC,0x30FF},
    {0x3105,0x312F},{0x3131,0x318E},{0x31A0,0x31BF},{0x31F0,0x31FF},{0x3400,0x4DBF},{0x4E00,0xA48C},
    {0xA4D0,0xA4FD},{0xA500,0xA60C},{0xA610,0xA61F},{0xA62A,0xA62B},{0xA640,0xA66E},{0xA67F,0xA69D},
    {0xA6A0,0xA6E5},{0xA717,0xA71F},{0xA722,0xA788},{0xA78B,0xA7DC},{0xA7F1,0xA801},{0xA803,0xA805},
    {0xA807,0xA80A},{0xA80C,0xA822},{0xA840,0xA873},{0xA882,0xA8B3},{0xA8F2,0xA8F7},{0xA8FB,0xA8FB},
    {0xA8FD,0xA8FE},{0xA90A,0xA925},{0xA930,0xA946},{0xA960,0xA97C},{0xA984,0xA9B2},{0xA9CF,0xA9CF},
    {0xA9E0,0xA9E4},{0xA9E6,0xA9EF},{0xA9FA,0xA9FE},{0xAA00,0xAA28},{0xAA40,0xAA42},{0xAA44,0xAA4B},
    {0xAA60,0xAA76},{0xAA7A,0xAA7A},{0xAA7E,0xAAAF},{0xAAB1,0xAAB1},{0xAAB5,0xAAB6},{0xAAB9,0xAABD},
    {0xAAC0,0xAAC0},{0xAAC2,0xAAC2},{0xAADB,0xAADD},{0xAAE0,0xAAEA},{0xAAF2,0xAAF4},{0xAB01,0xAB06},
    {0xAB09,0xAB0E},{0xAB11,0xAB16},{0xAB20,0xAB26},{0xAB28,0xAB2E},{0xAB30,0xAB5A},{0xAB5C,0xAB69},
    {0xAB70,0xABE2},{0xAC00,0xD7A3},{0xD7B0,0xD7C6},{0xD7CB,0xD7FB},{0xF900,0xFA6D},{0xFA70,0xFAD9},
    {0xFB00,0xFB06},{0xFB13,0xFB17},{0xFB1D,0xFB1D},{0xFB1F,0xFB28},{0xFB2A,0xFB36},{0xFB38,0xFB3C},
    {0xFB3E,0xFB3E},{0xFB40,0xFB41},{0xFB43,0xFB44},{0xFB46,0xFBB1},{0xFBD3,0xFD3D},{0xFD50,0xFD8F},
    {0xFD92,0xFDC7},{0xFDF0,0xFDFB},{0xFE70,0xFE74},{0xFE76,0xFEFC},{0xFF21,0xFF3A},{0xFF41,0xFF5A},
    {0xFF66,0xFFBE},{0xFFC2,0xFFC7},{0xFFCA,0xFFCF},{0xFFD2,0xFFD7},{0xFFDA,0xFFDC},{0x10000,0x1000B},
    {0x1000D,0x10026},{0x10028,0x1003A},{0x1003C,0x1003D},{0x1003F,0x1004D},{0x10050,0x1005D},{0x10080,0x100FA},
    {0x10280,0x1029C},{0x102A0,0x102D0},{0x10300,0x1031F},{0x1032D,0x10340},{0x10342,0x10349},{0x10350,0x10375},
    {0x10380,0x1039D},{0x103A0,0x103C3},{0x103C8,0x103CF},{0x10400,0x1049D},{0x104B0,0x104D3},{0x104D8,0x104FB},
    {0x10500,0x10527},{0x10530,0x10563},{0x10570,0x1057A},{0x1057C,0x1058A},{0x1058C,0x10592},{0x10594,0x10595},
    {0x10597,0x105A1},{0x105A3,0x105B1},{0x105B3,0x105B9},{0x105BB,0x105BC},{0x105C0,0x105F3},{0x10600,0x10736},
    {0x10740,0x10755},{0x10760,0x10767},{0x10780,0x10785},{0x10787,0x107B0},{0x107B2,0x107BA},{0x10800,0x10805},
    {0x10808,0x10808},{0x1080A,0x10835},{0x10837,0x10838},{0x1083C,0x1083C},{0x1083F,0x10855},{0x10860,0x10876},
    {0x10880,0x1089E},{0x108E0,0x108F2},{0x108F4,0x108F5},{0x10900,0x10915},{0x10920,0x10939},{0x10940,0x10959},
    {0x10980,0x109B7},{0x109BE,0x109BF},{0x10A00,0x10A00},{0x10A10,0x10A13},{0x10A15,0x10A17},{0x10A19,0x10A35},
    {0x10A60,0x10A7C},{0x10A80,0x10A9C},{0x10AC0,0x10AC7},{0x10AC9,0x10AE4},{0x10B00,0x10B35},{0x10B40,0x10B55},
    {0x10B60,0x10B72},{0x10B80,0x10B91},{0x10C00,0x10C48},{0x10C80,0x10CB2},{0x10CC0,0x10CF2},{0x10D00,0x10D23},
    {0x10D4A,0x10D65},{0x10D6F,0x10D85},{0x10E80,0x10EA9},{0x10EB0,0x10EB1},{0x10EC2,0x10EC7},{0x10F00,0x10F1C},
    {0x10F27,0x10F27},{0x10F30,0x10F45},{0x10F70,0x10F81},{0x10FB0,0x10FC4},{0x10FE0,0x10FF6},{0x11003,0x11037},
    {0x11071,0x11072},{0x11075,0x11075},{0x11083,0x110AF},{0x110D0,0x110E8},{0x11103,0x11126},{0x11144,0x11144},
    {0x11147,0x11147},{0x11150,0x11172},{0x11176,0x11176},{0x11183,0x111B2},{0x111C1,0x111C4},{0x111DA,0x111DA},
    {0x111DC,0x111DC},{0x11200,0x11211},{0x11213,0x1122B},{0x1123F,0x11240},{0x11280,0x11286},{0x11288,0x11288},
    {0x1128A,0x1128D},{0x1128F,0x1129D},{0x1129F,0x112A8},{0x112B0,0x112DE},{0x11305,0x1130C},{0x1130F,0x11310},
    {0x11313,0x11328},{0x1132A,0x11330},{0x11332,0x11333},{0x11335,0x11339},{0x1133D,0x1133D},{0x11350,0x11350},
    {0x1135D,0x11361},{0x11380,0x11389},{0x1138B,0x1138B},{0x1138E,0x1138E},{0x11390,0x113B5},{0x113B7,0x113B7},
    {0x113D1,0x113D1},{0x113D3,0x113D3},{0x11400,0x11434},{0x11447,0x1144A},{0x1145F,0x11461},{0x11480,0x114AF},
    {0x114C4,0x114C5},{0x114C7,0x114C7},{0x11580,0x115AE},{0x115D8,0x115DB},{0x11600,0x1162F},{0x11644,0x11644},
    {0x11680,0x116AA},{0x116B8,0x116B8},{0x11700,0x1171A},{0x11740,0x11746},{0x11800,0x1182B},{0x118A0,0x118DF},
    {0x118FF,0x11906},{0x11909,0x11909},{0x1190C,0x11913},{0x11915,0x11916},{0x11918,0x1192F},{0x1193F,0x1193F},
    {0x11941,0x11941},{0x119A0,0x119A7},{0x119AA,0x119D0},{0x119E1,0x119E1},{0x119E3,0x119E3},{0x11A00,0x11A00},
    {0x11A0B,0x11A32},{0x11A3A,0x11A3A},{0x11A50,0x11A50},{0x11A5C,0x11A89},{0x11A9D,0x11A9D},{0x11AB0,0x11AF8},
    {0x11BC0,0x11BE0},{0x11C00,0x11C08},{0x11C0A,0x11C2E},{0x11C40,0x11C40},{0x11C72,0x11C8F},{0x11D00,0x11D06},
    {0x11D08,0x11D09},{0x11D0B,0x11D30},{0x11D46,0x11D46},{0x11D60,0x11D65},{0x11D67,0x11D68},{0x11D6A,0x11D89},
    {0x11D98,0x11D98},{0x11DB0,0x11DDB},{0x11EE0,0x11EF2},{0x11F02,0x11F02},{0x11F04,0x11F10},{0x11F12,0x11F33},
    {0x11FB0,0x11FB0},{0x12000,0x12399},{0x12480,0x12543},{0x12F90,0x12FF0},{0x13000,0x1342F},{0x13441,0x13446},
    {0x13460,0x143FA},{0x14400,0x14646},{0x16100,0x1611D},{0x16800,0x16A38},{0x16A40,0x16A5E},{0x16A70,0x16ABE},
    {0x16AD0,0x16AED},{0x16B00,0x16B2F},{0x16B40,0x16B43},{0x16B63,0x16B77},{0x16B7D,0x16B8F},{0x16D40,0x16D6C},
    {0x16E40,0x16E7F},{0x16EA0,0x16EB8},{0x16EBB,0x16ED3},{0x16F00,0x16F4A},{0x16F50,0x16F50},{0x16F93,0x16F9F},
    {0x16FE0,0x16FE1},{0x16FE3,0x16FE3},{0x16FF2,0x16FF3},{0x17000,0x18CD5},{0x18CFF,0x18D1E},{0x18D80,0x18DF2},
    {0x1AFF0,0x1AFF3},{0x1AFF5,0x1AFFB},{0x1AFFD,0x1AFFE},{0x1B000,0x1B122},{0x1B132,0x1B132},{0x1B150,0x1B152},
    {0x1B155,0x1B155},{0x1B164,0x1B167},{0x1B170,0x1B2FB},{0x1BC00,0x1BC6A},{0x1BC70,0x1BC7C},{0x1BC80,0x1BC88},
    {0x1BC90,0x1BC99},{0x1D400,0x1D454},{0x1D456,0x1D49C},{0x1D49E,0x1D49F},{0x1D4A2,0x1D4A2},{0x1D4A5,0x1D4A6},
    {0x1D4A9,0x1D4AC},{0x1D4AE,0x1D4B9},{0x1D4BB,0x1D4BB},{0x1D4BD,0x1D4C3},{0x1D4C5,0x1D505},{0x1D507,0x1D50A},
    {0x1D50D,0x1D514},{0x1D516,0x1D51C},{0x1D51E,0x1D539},{0x1D53B,0x1D53E},{0x1D540,0x1D544},{0x1D546,0x1D546},
    {0x1D54A,0x1D550},{0x1D552,0x1D6A5},{0x1D6A8,0x1D6C0},{0x1D6C2,0x1D6DA},{0x1D6DC,0x1D6FA},{0x1D6FC,0x1D714},
    {0x1D716,0x1D734},{0x1D736,0x1D74E},{0x1D750,0x1D76E},{0x1D770,0x1D788},{0x1D78A,0x1D7A8},{0x1D7AA,0x1D7C2},
    {0x1D7C4,0x1D7CB},{0x1DF00,0x1DF1E},{0x1DF25,0x1DF2A},{0x1E030,0x1E06D},{0x1E100,0x1E12C},{0x1E137,0x1E13D},
    {0x1E14E,0x1E14E},{0x1E290,0x1E2AD},{0x1E2C0,0x1E2EB},{0x1E4D0,0x1E4EB},{0x1E5D0,0x1E5ED},{0x1E5F0,0x1E5F0},
    {0x1E6C0,0x1E6DE},{0x1E6E0,0x1E6E2},{0x1E6E4,0x1E6E5},{0x1E6E7,0x1E6ED},{0x1E6F0,0x1E6F4},{0x1E6FE,0x1E6FF},
    {0x1E7E0,0x1E7E6},{0x1E7E8,0x1E7EB},{0x1E7ED,0x1E7EE},{0x1E7F0,0x1E7FE},{0x1E800,0x1E8C4},{0x1E900,0x1E943},
    {0x1E94B,0x1E94B},{0x1EE00,0x1EE03},{0x1EE05,0x1EE1F},{0x1EE21,0x1EE22},{0x1EE24,0x1EE24},{0x1EE27,0x1EE27},
    {0x1EE29,0x1EE32},{0x1EE34,0x1EE37},{0x1EE39,0x1EE39},{0x1EE3B,0x1EE3B},{0x1EE42,0x1EE42},{0x1EE47,0x1EE47},
    {0x1EE49,0x1EE49},{0x1EE4B,0x1EE4B},{0x1EE4D,0x1EE4F},{0x1EE51,0x1EE52},{0x1EE54,0x1EE54},{0x1EE57,0x1EE57},
    {0x1EE59,0x1EE59},{0x1EE5B,0x1EE5B},{0x1EE5D,0x1EE5D},{0x1EE5F,0x1EE5F},{0x1EE61,0x1EE62},{0x1EE64,0x1EE64},
    {0x1EE67,0x1EE6A},{0x1EE6C,0x1EE72},{0x1EE74,0x1EE77},{0x1EE79,0x1EE7C},{0x1EE7E,0x1EE7E},{0x1EE80,0x1EE89},
    {0x1EE8B,0x1EE9B},{0x1EEA1,0x1EEA3},{0x1EEA5,0x1EEA9},{0x1EEAB,0x1EEBB},{0x20000,0x2A6DF},{0x2A700,0x2B81D},
    {0x2B820,0x2CEAD},{0x2CEB0,0x2EBE0},{0x2EBF0,0x2EE5D},{0x2F800,0x2FA1D},{0x30000,0x3134A},{0x31350,0x33479}
};
static const uint32_t bpe__number_ranges[146][2] = {
    {0x30,0x39},{0xB2,0xB3},{0xB9,0xB9},{0xBC,0xBE},{0x660,0x669},{0x6F0,0x6F9},
    {0x7C0,0x7C9},{0x966,0x96F},{0x9E6,0x9EF},{0x9F4,0x9F9},{0xA66,0xA6F},{0xAE6,0xAEF},
    {0xB66,0xB6F},{0xB72,0xB77},{0xBE6,0xBF2},{0xC66,0xC6F},{0xC78,0xC7E},{0xCE6,0xCEF},
    {0xD58,0xD5E},{0xD66,0xD78},{0xDE6,0xDEF},{0xE50,0xE59},{0xED0,0xED9},{0xF20,0xF33},
    {0x1040,0x1049},{0x1090,0x1099},{0x1369,0x137C},{0x16EE,0x16F0},{0x17E0,0x17E9},{0x17F0,0x17F9},
    {0x1810,0x1819},{0x1946,0x194F},{0x19D0,0x19DA},{0x1A80,0x1A89},{0x1A90,0x1A99},{0x1B50,0x1B59},
    {0x1BB0,0x1BB9},{0x1C40,0x1C49},{0x1C50,0x1C59},{0x2070,0x2070},{0x2074,0x2079},{0x2080,0x2089},
    {0x2150,0x2182},{0x2185,0x2189},{0x2460,0x249B},{0x24EA,0x24FF},{0x2776,0x2793},{0x2CFD,0x2CFD},
    {0x3007,0x3007},{0x3021,0x3029},{0x3038,0x303A},{0x3192,0x3195},{0x3220,0x3229},{0x3248,0x324F},
    {0x3251,0x325F},{0x3280,0x3289},{0x32B1,0x32BF},{0xA620,0xA629},{0xA6E6,0xA6EF},{0xA830,0xA835},
    {0xA8D0,0xA8D9},{0xA900,0xA909},{0xA9D0,0xA9D9},{0xA9F0,0xA9F9},{0xAA50,0xAA59},{0xABF0,0xABF9},
    {0xFF10,0xFF19},{0x10107,0x10133},{0x10140,0x10178},{0x1018A,0x1018B},{0x102E1,0x102FB},{0x10320,0x10323},
    {0x10341,0x10341},{0x1034A,0x1034A},{0x103D1,0x103D5},{0x104A0,0x104A9},{0x10858,0x1085F},{0x10879,0x1087F},
    {0x108A7,0x108AF},{0x108FB,0x108FF},{0x10916,0x1091B},{0x109BC,0x109BD},{0x109C0,0x109CF},{0x109D2,0x109FF},
    {0x10A40,0x10A48},{0x10A7D,0x10A7E},{0x10A9D,0x10A9F},{0x10AEB,0x10AEF},{0x10B58,0x10B5F},{0x10B78,0x10B7F},
    {0x10BA9,0x10BAF},{0x10CFA,0x10CFF},{0x10D30,0x10D39},{0x10D40,0x10D49},{0x10E60,0x10E7E},{0x10F1D,0x10F26},
    {0x10F51,0x10F54},{0x10FC5,0x10FCB},{0x11052,0x1106F},{0x110F0,0x110F9},{0x11136,0x1113F},{0x111D0,0x111D9},
    {0x111E1,0x111F4},{0x112F0,0x112F9},{0x11450,0x11459},{0x114D0,0x114D9},{0x11650,0x11659},{0x116C0,0x116C9},
    {0x116D0,0x116E3},{0x11730,0x1173B},{0x118E0,0x118F2},{0x11950,0x11959},{0x11BF0,0x11BF9},{0x11C50,0x11C6C},
    {0x11D50,0x11D59},{0x11DA0,0x11DA9},{0x11DE0,0x11DE9},{0x11F50,0x11F59},{0x11FC0,0x11FD4},{0x12400,0x1246E},
    {0x16130,0x16139},{0x16A60,0x16A69},{0x16AC0,0x16AC9},{0x16B50,0x16B59},{0x16B5B,0x16B61},{0x16D70,0x16D79},
    {0x16E80,0x16E96},{0x16FF4,0x16FF6},{0x1CCF0,0x1CCF9},{0x1D2C0,0x1D2D3},{0x1D2E0,0x1D2F3},{0x1D360,0x1D378},
    {0x1D7CE,0x1D7FF},{0x1E140,0x1E149},{0x1E2F0,0x1E2F9},{0x1E4F0,0x1E4F9},{0x1E5F1,0x1E5FA},{0x1E8C7,0x1E8CF},
    {0x1E950,0x1E959},{0x1EC71,0x1ECAB},{0x1ECAD,0x1ECAF},{0x1ECB1,0x1ECB4},{0x1ED01,0x1ED2D},{0x1ED2F,0x1ED3D},
    {0x1F100,0x1F10C},{0x1FBF0,0x1FBF9}
};
static const uint32_t bpe__space_ranges[10][2] = {
    {0x9,0xD},{0x20,0x20},{0xA0,0xA0},{0x1680,0x1680},{0x2000,0x200A},{0x2028,0x2029},
    {0x202F,0x202F},{0x205F,0x205F},{0x3000,0x3000},{0xFEFF,0xFEFF}
};
/* END GENERATED UNICODE TABLES */

/* Exact \p{L} / \p{N} / \s of JavaScript /u regexes (tables above). */
static int bpe__class(uint32_t cp)
{
    if (cp == BPE__INVALID_CP) return BPE__OTHER;
    if (cp < 0x80) { /* ASCII fast path */
        if ((cp >= 'a' && cp <= 'z') || (cp >= 'A' && cp <= 'Z')) return BPE__LETTER;
        if (cp >= '0' && cp <= '9') return BPE__NUMBER;
        if (cp == ' ' || (cp >= '\t' && cp <= '\r')) return BPE__SPACE;
        return BPE__OTHER;
    }
#define BPE__IN(table) bpe__in_ranges(cp, table, sizeof table / sizeof table[0])
    if (BPE__IN(bpe__letter_ranges)) return BPE__LETTER;
    if (BPE__IN(bpe__number_ranges)) return BPE__NUMBER;
    if (BPE__IN(bpe__space_ranges)) return BPE__SPACE;
#undef BPE__IN
    return BPE__OTHER;
}

#endif /* BPE_IMPLEMENTATION */
