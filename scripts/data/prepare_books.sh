#!/usr/bin/env bash
# Binarizes a BookCorpus-style collection of raw books for fairseq:
#   a folder of plain-text books -> split by book, sacremoses tokenization (scripts/data/books_to_text.py)
#   -> optional GPT-2 BPE with fairseq's own encoder -> fairseq-preprocess --only-source.
#
# Usage:
#   scripts/data/prepare_books.sh BOOKS_DIR
#
# BOOKS_DIR holds one text file per book (*.txt, in any sub-folders; BookCorpus's books1/epubtxt/ works as
# it is). The split is by book and deterministic (SHA-1 order of the books' paths, see books_to_text.py).
#
# Environment (all optional):
#   DESTDIR            output directory (default: <repo>/data-bin/books)
#   FORCE=1            replace an existing DESTDIR (otherwise the script stops before doing any work)
#   BOOKS_WORKDIR      tokenized books, split text and BPE (default: <repo>/data/books). Keep it: a rerun
#                      after an interruption tokenizes only the books that are not done yet
#   VALID_FRACTION     share of the books held out for validation (default: 0.01, at least one book)
#   TEST_FRACTION      share of the books held out for testing (default: 0.01, at least one book)
#   WRAPPED=1          the books are hard-wrapped (Project Gutenberg style): a paragraph is a block of lines
#                      between blank lines; by default every line is a paragraph (BookCorpus)
#   ENCODING           encoding of the books (default: utf-8)
#   ENCODING_ERRORS    strict (default: stop with one line naming a book that does not decode), replace, ignore
#   GPT2_ENCODER_JSON  with GPT2_VOCAB_BPE: apply fairseq's GPT-2 BPE to the tokenized text. Both files come
#   GPT2_VOCAB_BPE     from https://dl.fbaipublicfiles.com/fairseq/gpt2_bpe/ (encoder.json, vocab.bpe)
#   SRCDICT            an existing dictionary to binarize with (e.g. GPT-2's dict.txt from the same place);
#                      by default one is built from train
#   NWORDS             keep at most this many types in the built dictionary (fairseq-preprocess --nwordssrc)
#   THRESHOLD          map types seen at most this many times in train to <unk> (--thresholdsrc)
#   WORKERS            parallel workers (default: number of CPUs)
#   PYTHON             interpreter with sacremoses and fairseq (default: python)
#
# Needs fairseq-preprocess on PATH (activate the virtualenv that has fairseq).
set -euo pipefail

SPLITS=(train valid test)

die() { echo "prepare_books.sh: error: $*" >&2; exit 1; }

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BOOKS_DIR="${1:-}"
DESTDIR="${DESTDIR:-$REPO_ROOT/data-bin/books}"
WORKDIR="${BOOKS_WORKDIR:-$REPO_ROOT/data/books}"
WORKERS="${WORKERS:-$(nproc 2>/dev/null || echo 1)}"
PYTHON="${PYTHON:-python}"

# Everything that can be wrong with the input is checked before any work is done.
[[ -n "$BOOKS_DIR" ]] || die "usage: scripts/data/prepare_books.sh BOOKS_DIR (a folder of plain-text books)"
[[ -d "$BOOKS_DIR" ]] || die "BOOKS_DIR '$BOOKS_DIR' is not a directory"
command -v "$PYTHON" >/dev/null || die "'$PYTHON' not found; set PYTHON to an interpreter with sacremoses"
"$PYTHON" -c "import sacremoses" 2>/dev/null \
    || die "sacremoses is not installed for '$PYTHON' (pip install sacremoses)"
command -v fairseq-preprocess >/dev/null \
    || die "fairseq-preprocess not found on PATH (activate the virtualenv that has fairseq)"
if [[ -e "$DESTDIR/dict.txt" && "${FORCE:-0}" != 1 ]]; then
    die "$DESTDIR already holds a binarized corpus; set FORCE=1 to replace it"
fi
BPE=0
if [[ -n "${GPT2_ENCODER_JSON:-}${GPT2_VOCAB_BPE:-}" ]]; then
    [[ -f "${GPT2_ENCODER_JSON:-}" && -f "${GPT2_VOCAB_BPE:-}" ]] \
        || die "the GPT-2 BPE needs both GPT2_ENCODER_JSON and GPT2_VOCAB_BPE as existing files"
    BPE=1
fi
[[ -z "${SRCDICT:-}" || -f "$SRCDICT" ]] || die "SRCDICT '$SRCDICT' is not a file"

# 1. Split by book and tokenize (resumable; progress on stdout; a bad book stops it with one line).
TEXT_OPTIONS=(--valid-fraction "${VALID_FRACTION:-0.01}" --test-fraction "${TEST_FRACTION:-0.01}"
              --encoding "${ENCODING:-utf-8}" --encoding-errors "${ENCODING_ERRORS:-strict}" --workers "$WORKERS")
[[ "${WRAPPED:-0}" == 1 ]] && TEXT_OPTIONS+=(--wrapped)
echo "Tokenizing the books in $BOOKS_DIR (work directory $WORKDIR) ..."
"$PYTHON" "$REPO_ROOT/scripts/data/books_to_text.py" "$BOOKS_DIR" "$WORKDIR" "${TEXT_OPTIONS[@]}" || exit 1
SUFFIX=tokens

# 2. Optional GPT-2 BPE, with fairseq's own encoder; a split is encoded again only if its text changed.
if [[ "$BPE" == 1 ]]; then
    for split in "${SPLITS[@]}"; do
        text="$WORKDIR/books.$split.tokens"
        bpe="$WORKDIR/books.$split.bpe"
        if [[ -f "$bpe" && "$bpe" -nt "$text" ]]; then
            echo "$bpe is up to date"
            continue
        fi
        echo "GPT-2 BPE: $split ..."
        "$PYTHON" -m fairseq.examples.roberta.multiprocessing_bpe_encoder \
            --encoder-json "$GPT2_ENCODER_JSON" --vocab-bpe "$GPT2_VOCAB_BPE" \
            --inputs "$text" --outputs "$bpe.part" --keep-empty --workers "$WORKERS" \
            || die "the GPT-2 BPE encoder failed on $text"
        mv "$bpe.part" "$bpe"
    done
    SUFFIX=bpe
fi

# 3. Binarize.
PREPROCESS_OPTIONS=(--workers "$WORKERS")
[[ -n "${SRCDICT:-}" ]] && PREPROCESS_OPTIONS+=(--srcdict "$SRCDICT")
[[ -n "${NWORDS:-}" ]] && PREPROCESS_OPTIONS+=(--nwordssrc "$NWORDS")
[[ -n "${THRESHOLD:-}" ]] && PREPROCESS_OPTIONS+=(--thresholdsrc "$THRESHOLD")
if [[ -e "$DESTDIR/dict.txt" ]]; then
    rm -rf "$DESTDIR"   # FORCE=1 (checked above)
fi
mkdir -p "$DESTDIR"
echo "Binarizing into $DESTDIR with $WORKERS workers ..."
fairseq-preprocess --only-source \
    --trainpref "$WORKDIR/books.train.$SUFFIX" \
    --validpref "$WORKDIR/books.valid.$SUFFIX" \
    --testpref "$WORKDIR/books.test.$SUFFIX" \
    --destdir "$DESTDIR" "${PREPROCESS_OPTIONS[@]}" \
    || die "fairseq-preprocess failed"
cp "$WORKDIR/splits.tsv" "$DESTDIR/splits.tsv"   # which book went to which split

echo "Done: $DESTDIR ($(wc -l < "$DESTDIR/dict.txt") dictionary entries)"
