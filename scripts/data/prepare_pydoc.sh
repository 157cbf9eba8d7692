#!/usr/bin/env bash
# Rebuilds the shipped corpus data-bin/pydoc/ from scratch, deterministically.
#
# Source: the reStructuredText sources of the Python 3.11 documentation, as
# packaged by Debian in python3.11-doc (PSF License Version 2).
#
# Usage:
#   scripts/data/prepare_pydoc.sh [PATH/TO/python3.11-doc_*.deb]
#
# Environment (all optional):
#   PYDOC_DEB      an already downloaded python3.11-doc .deb (same as the argument);
#                  without one, the script runs `apt-get download python3.11-doc`
#   DESTDIR        output directory (default: <repo>/data-bin/pydoc); it is replaced
#   WORKERS        parallel workers for tokenizing and fairseq-preprocess (default: 2)
#   PYTHON         Python interpreter with sacremoses installed (default: python)
#   PYDOC_WORKDIR  keep the intermediate files (extracted package and the
#                  tokenized text pydoc.{train,valid,test}.tokens) in this
#                  directory; by default a temporary directory is used and removed
#
# Steps: download/extract the package -> clean + tokenize + split + cap the
# vocabulary (scripts/data/pydoc_to_text.py) -> fairseq-preprocess --only-source.
set -euo pipefail

die() { echo "prepare_pydoc.sh: error: $*" >&2; exit 1; }

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DEB="${1:-${PYDOC_DEB:-}}"
DESTDIR="${DESTDIR:-$REPO_ROOT/data-bin/pydoc}"
WORKERS="${WORKERS:-2}"
PYTHON="${PYTHON:-python}"
# The version data-bin/pydoc was built from; another one builds a different corpus.
EXPECTED_VERSION="3.11.2-6+deb12u8"

command -v "$PYTHON" >/dev/null || die "'$PYTHON' not found; set PYTHON to an interpreter with sacremoses"
"$PYTHON" -c "import sacremoses" 2>/dev/null \
    || die "sacremoses is not installed for '$PYTHON' (pip install sacremoses)"
command -v fairseq-preprocess >/dev/null \
    || die "fairseq-preprocess not found on PATH (activate the virtualenv that has fairseq)"

# Work directory: kept if the user named one, otherwise temporary.
if [[ -n "${PYDOC_WORKDIR:-}" ]]; then
    WORKDIR="$PYDOC_WORKDIR"
    mkdir -p "$WORKDIR"
else
    WORKDIR="$(mktemp -d)"
    trap 'rm -rf "$WORKDIR"' EXIT
fi
WORKDIR="$(cd "$WORKDIR" && pwd)"

# 1. Get the package.
if [[ -z "$DEB" ]]; then
    command -v apt-get >/dev/null || die "apt-get not found: pass the path of a python3.11-doc .deb"
    echo "Downloading python3.11-doc with apt-get ..."
    (cd "$WORKDIR" && apt-get download python3.11-doc) \
        || die "apt-get download python3.11-doc failed (try 'apt-get update' first, or pass a .deb)"
    DEB="$(ls "$WORKDIR"/python3.11-doc_*.deb | head -n 1)"
fi
[[ -f "$DEB" ]] || die "no such file: $DEB"
DEB="$(cd "$(dirname "$DEB")" && pwd)/$(basename "$DEB")"

# 2. Extract it (dpkg -x, or ar + tar where dpkg is missing).
rm -rf "$WORKDIR/x"
mkdir -p "$WORKDIR/x"
if command -v dpkg-deb >/dev/null; then
    VERSION="$(dpkg-deb -f "$DEB" Version)"
    dpkg -x "$DEB" "$WORKDIR/x"
else
    # A .deb is an ar archive holding data.tar.{xz,gz,zst}; tar detects the compression.
    command -v ar >/dev/null || die "neither dpkg-deb nor ar found: cannot extract $DEB"
    VERSION="$(basename "$DEB" | sed -n 's/^python3\.11-doc_\(.*\)_all\.deb$/\1/p')"
    mkdir -p "$WORKDIR/ar"
    (cd "$WORKDIR/ar" && ar x "$DEB")
    tar -xf "$WORKDIR"/ar/data.tar.* -C "$WORKDIR/x"
fi
if [[ "$VERSION" != "$EXPECTED_VERSION" ]]; then
    echo "warning: python3.11-doc version is $VERSION, data-bin/pydoc was built from $EXPECTED_VERSION;" \
         "the corpus will differ" >&2
fi
SOURCES="$WORKDIR/x/usr/share/doc/python3.11/html/_sources"
[[ -d "$SOURCES" ]] || die "$SOURCES not found in $DEB"

# 3. reST -> cleaned, tokenized, split, vocabulary-capped text.
echo "Cleaning and tokenizing the documentation sources (python3.11-doc $VERSION) ..."
TEXT="$WORKDIR/text"
rm -rf "$TEXT"
mkdir -p "$TEXT"
"$PYTHON" "$REPO_ROOT/scripts/data/pydoc_to_text.py" "$SOURCES" "$TEXT" \
    --workers "$WORKERS" --stats "$TEXT/stats.json" | tee "$TEXT/summary.txt"

# 4. Binarize for fairseq.
echo "Binarizing into $DESTDIR ..."
rm -rf "$DESTDIR"
mkdir -p "$DESTDIR"
fairseq-preprocess --only-source \
    --trainpref "$TEXT/pydoc.train.tokens" \
    --validpref "$TEXT/pydoc.valid.tokens" \
    --testpref "$TEXT/pydoc.test.tokens" \
    --destdir "$DESTDIR" --workers "$WORKERS" > "$TEXT/preprocess.out" 2>&1 \
    || { cat "$TEXT/preprocess.out" >&2; die "fairseq-preprocess failed"; }
rm -f "$DESTDIR/preprocess.log"   # holds absolute paths and timestamps: not reproducible

# The licence of the source text travels with the corpus.
cp "$WORKDIR/x/usr/share/doc/python3.11-doc/copyright" "$DESTDIR/COPYRIGHT"

# 5. README with the figures of this build.
DICT_SIZE="$(wc -l < "$DESTDIR/dict.txt")"
"$PYTHON" - "$TEXT/stats.json" "$VERSION" "$DICT_SIZE" > "$DESTDIR/README.md" <<'PYEOF'
import json, sys
stats = json.load(open(sys.argv[1]))
version, dict_size = sys.argv[2], int(sys.argv[3])
# fairseq adds </s> to every line, including the empty line between two documents.
rows = "\n".join(
    f"| {part} | {s['documents']} | {s['lines']:,} | {s['tokens']:,} | "
    f"{s['tokens'] + s['lines'] + s['documents'] - 1:,} | {s['types']:,} | "
    f"{s['unk']:,} | {100 * s['oov_rate']:.2f}% |"
    for part, s in stats["splits"].items())
print(f"""# pydoc: an English language-modelling corpus from the Python 3.11 documentation

A small WikiText-style corpus, binarized for fairseq (`fairseq-preprocess --only-source`),
shipped so that the project can train and evaluate real language models without a download.

## Source and licence

- Debian package `python3.11-doc`, version {version} (Debian 12 "bookworm"): the
  reStructuredText sources of the Python 3.11 documentation,
  `usr/share/doc/python3.11/html/_sources/**/*.rst.txt` ({stats['documents_read']} documents used;
  `includes/` fragments and the `contents` table of contents are skipped).
- Python and its documentation are Copyright (c) 2001-2023 Python Software Foundation, licensed
  under the PSF License Agreement (PSF License Version 2); code in the documentation is dual
  licensed under the PSF License and the Zero-Clause BSD license. `COPYRIGHT` in this directory is
  the package's full copyright and licence file.

## How it was built

`scripts/data/prepare_pydoc.sh` (with `scripts/data/pydoc_to_text.py`) rebuilds this directory from scratch
and deterministically:

1. `apt-get download python3.11-doc`, `dpkg -x`.
2. Each document is turned into plain prose: directives and their options, labels, comments,
   heading adornments, tables, literal code blocks (after `::`, code-block/doctest/... directives)
   and `>>>` sessions are dropped; inline markup is stripped (`` :func:`foo` `` -> `foo`,
   `` :ref:`label` `` -> the title of that section); the
   prose inside notes, version notes and API descriptions is kept; wrapped lines are joined, so
   every paragraph is one line. Headings are WikiText-style lines (`= Title =`, `= = Section = =`).
   Documents are separated by an empty line (usable with `--sample-break-mode complete_doc`).
3. Tokenized with sacremoses (`MosesTokenizer(lang="en")`, `escape=False`, `aggressive_dash_splits=True` as fairseq's `--tokenizer moses --moses-no-escape`, case kept; Python
   identifiers with underscores such as `sys.exc_info` are kept whole).
4. Split by document: in SHA-1 order of their paths, documents fill valid, then test, up to 5% of
   the tokens each; the rest is train.
5. Vocabulary capped WikiText-style: types with count >= 3 in train, at most 16,000 (here
   {stats['vocab_size']:,}); every other token in all three splits is replaced by `<unk>`.
6. `fairseq-preprocess --only-source --trainpref ... --validpref ... --testpref ... --workers 2`.

## Figures

| split | documents | lines | tokens | symbols in .bin | types | `<unk>` | OOV rate |
| --- | --- | --- | --- | --- | --- | --- | --- |
{rows}

Lines are paragraphs and headings; tokens exclude the end-of-sentence symbol `</s>` that fairseq
adds to every line (and to the empty line between two documents), which the ".bin" column
includes. Types include `<unk>`; OOV rate = share of `<unk>` tokens. `dict.txt` lists
{dict_size:,} symbols: the {stats['vocab_size']:,} kept types and `madeupword` fillers that pad the
dictionary to a multiple of 8; `<unk>` is one of the 4 special symbols fairseq adds on load
(`Dictionary.load` gives {dict_size + 4:,} entries).

## Use

```
fairseq-train data-bin/pydoc --task language_modeling ...
fairseq-eval-lm data-bin/pydoc --path checkpoints/checkpoint_best.pt ...
```
""")
PYEOF

echo
echo "Done: $DESTDIR"
du -sh "$DESTDIR"
if [[ -n "${PYDOC_WORKDIR:-}" ]]; then
    echo "Tokenized text kept in $TEXT"
fi
