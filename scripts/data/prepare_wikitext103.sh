#!/usr/bin/env bash
# Downloads WikiText-103 and binarizes it for fairseq, the way fairseq's
# examples/language_model (prepare-wikitext-103.sh + README) does:
#
#   fairseq-preprocess --only-source \
#       --trainpref wikitext-103/wiki.train.tokens \
#       --validpref wikitext-103/wiki.valid.tokens \
#       --testpref  wikitext-103/wiki.test.tokens \
#       --destdir data-bin/wikitext-103 --workers N
#
# Usage:
#   scripts/data/prepare_wikitext103.sh [WIKITEXT_DIR]
#
# Environment (all optional):
#   WIKITEXT_DIR   a directory that already holds wiki.{train,valid,test}.tokens
#                  (or holds a wikitext-103/ directory with them); same as the
#                  argument. When given, nothing is downloaded.
#   DOWNLOAD_DIR   where wikitext-103-v1.zip is downloaded and unpacked when no
#                  WIKITEXT_DIR is given (default: <repo>/data); if
#                  DOWNLOAD_DIR/wikitext-103/ already has the three files, the
#                  download is skipped
#   DESTDIR        output directory (default: <repo>/data-bin/wikitext-103)
#   WORKERS        fairseq-preprocess workers (default: number of CPUs)
#   FORCE=1        replace an existing DESTDIR (fairseq-preprocess refuses to
#                  overwrite a dict.txt)
#
# Needs fairseq-preprocess on PATH (activate the virtualenv that has fairseq);
# downloading needs wget, curl or python, unpacking needs unzip or python.
set -euo pipefail

URL="https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-v1.zip"
ZIP_NAME="wikitext-103-v1.zip"
SPLITS=(train valid test)

die() { echo "prepare_wikitext103.sh: error: $*" >&2; exit 1; }

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
WIKITEXT_DIR="${1:-${WIKITEXT_DIR:-}}"
DOWNLOAD_DIR="${DOWNLOAD_DIR:-$REPO_ROOT/data}"
DESTDIR="${DESTDIR:-$REPO_ROOT/data-bin/wikitext-103}"
WORKERS="${WORKERS:-$(nproc 2>/dev/null || echo 1)}"
PYTHON="${PYTHON:-python}"

# has_tokens DIR: true if DIR holds all of wiki.{train,valid,test}.tokens
has_tokens() {
    local split
    for split in "${SPLITS[@]}"; do
        [[ -f "$1/wiki.$split.tokens" ]] || return 1
    done
}

command -v fairseq-preprocess >/dev/null \
    || die "fairseq-preprocess not found on PATH (activate the virtualenv that has fairseq)"

# 1. Find (or fetch) the raw WikiText-103 token files.
if [[ -n "$WIKITEXT_DIR" ]]; then
    [[ -d "$WIKITEXT_DIR" ]] || die "WIKITEXT_DIR '$WIKITEXT_DIR' is not a directory"
    if ! has_tokens "$WIKITEXT_DIR" && has_tokens "$WIKITEXT_DIR/wikitext-103"; then
        WIKITEXT_DIR="$WIKITEXT_DIR/wikitext-103"
    fi
    has_tokens "$WIKITEXT_DIR" \
        || die "'$WIKITEXT_DIR' must contain wiki.train.tokens, wiki.valid.tokens and wiki.test.tokens"
    echo "Using the WikiText-103 files in $WIKITEXT_DIR"
elif has_tokens "$DOWNLOAD_DIR/wikitext-103"; then
    WIKITEXT_DIR="$DOWNLOAD_DIR/wikitext-103"
    echo "$WIKITEXT_DIR already holds WikiText-103, skipping download"
else
    mkdir -p "$DOWNLOAD_DIR"
    ZIP="$DOWNLOAD_DIR/$ZIP_NAME"
    if [[ -f "$ZIP" ]]; then
        echo "$ZIP already exists, skipping download"
    else
        echo "Downloading $URL ..."
        if command -v wget >/dev/null; then
            wget -O "$ZIP.part" "$URL" || { rm -f "$ZIP.part"; die "download of $URL failed"; }
        elif command -v curl >/dev/null; then
            curl -fL -o "$ZIP.part" "$URL" || { rm -f "$ZIP.part"; die "download of $URL failed"; }
        else
            "$PYTHON" -c 'import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])' \
                "$URL" "$ZIP.part" || { rm -f "$ZIP.part"; die "download of $URL failed"; }
        fi
        mv "$ZIP.part" "$ZIP"
        echo "$URL successfully downloaded."
    fi
    echo "Unpacking $ZIP ..."
    if command -v unzip >/dev/null; then
        unzip -q -o "$ZIP" -d "$DOWNLOAD_DIR" || die "could not unpack $ZIP (a partial download? delete it and retry)"
    else
        "$PYTHON" -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' \
            "$ZIP" "$DOWNLOAD_DIR" || die "could not unpack $ZIP (a partial download? delete it and retry)"
    fi
    WIKITEXT_DIR="$DOWNLOAD_DIR/wikitext-103"
    has_tokens "$WIKITEXT_DIR" || die "$ZIP did not unpack to $WIKITEXT_DIR/wiki.{train,valid,test}.tokens"
fi

# 2. Binarize.
if [[ -e "$DESTDIR/dict.txt" ]]; then
    [[ "${FORCE:-0}" == 1 ]] || die "$DESTDIR already holds a binarized corpus; set FORCE=1 to replace it"
    rm -rf "$DESTDIR"
fi
mkdir -p "$DESTDIR"
echo "Binarizing into $DESTDIR with $WORKERS workers ..."
fairseq-preprocess --only-source \
    --trainpref "$WIKITEXT_DIR/wiki.train.tokens" \
    --validpref "$WIKITEXT_DIR/wiki.valid.tokens" \
    --testpref "$WIKITEXT_DIR/wiki.test.tokens" \
    --destdir "$DESTDIR" --workers "$WORKERS" \
    || die "fairseq-preprocess failed"

echo "Done: $DESTDIR ($(wc -l < "$DESTDIR/dict.txt") dictionary entries)"
