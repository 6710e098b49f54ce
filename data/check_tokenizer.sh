#!/usr/bin/env bash
# Checks that data/prepare tokenises exactly like the reference JS encoder of
# the npm package gpt-3-encoder: every State of the Union document, a Unicode
# stress text and a sweep over all of Unicode (see check_tokenizer.js).
# Runs data/prepare.sh first if its outputs are missing. Ends with a line
# "N passed, N failed"; exits non-zero on any mismatch.
#   usage: data/check_tokenizer.sh [--sweep-stride N]   (default 251; 1 = every code point, slow)
set -euo pipefail

DATA=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE="$DATA/cache"

if [ ! -x "$DATA/prepare" ] || [ ! -f "$DATA/gpt2.tok" ] || [ ! -f "$CACHE/sotu_docs.txt" ] ||
   [ ! -f "$CACHE/gpt-3-encoder/package/index.js" ] ||
   [ "$DATA/prepare.c" -nt "$DATA/prepare" ] || [ "$DATA/tokenizer.h" -nt "$DATA/prepare" ]; then
    bash "$DATA/prepare.sh"
fi

# gpt-3-encoder has no runtime dependencies (only jest, for its own tests), so
# its index.js runs straight from the unpacked tarball without `npm install`.
mapfile -t DOCS < "$CACHE/sotu_docs.txt"
exec node "$DATA/check_tokenizer.js" --encoder-dir "$CACHE/gpt-3-encoder/package" --prepare "$DATA/prepare" \
    --tokenizer "$DATA/gpt2.tok" --work "$CACHE/check" "$@" "${DOCS[@]}"
