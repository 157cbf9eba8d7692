#!/usr/bin/env python3
"""Tokenize a folder of plain-text books with sacremoses and split it by book into train/valid/test.

The text step of ``scripts/data/prepare_books.sh``; it can also be run on its own::

    python scripts/data/books_to_text.py BOOKS_DIR OUT_DIR [--valid-fraction 0.01] [--test-fraction 0.01]

BOOKS_DIR holds one text file per book (``*.txt``, in any sub-folders: BookCorpus's ``books1/epubtxt/`` works
as it is). Step by step:

1. **Split by book**, deterministically: books are ordered by the SHA-1 of their path relative to BOOKS_DIR;
   the first ones go to valid, the next ones to test (each a fraction of the books, at least one), the rest to
   train. The order of the file system, the machine and the run never matter.
2. **Tokenize** every paragraph with sacremoses (``MosesTokenizer(lang="en")``, ``escape=False``,
   ``aggressive_dash_splits=True``: what fairseq's ``--tokenizer moses --moses-no-escape`` does to a prompt);
   case is kept. A paragraph is a line (BookCorpus) or, with ``--wrapped``, a block of lines between blank lines
   (hard-wrapped books such as Project Gutenberg's).
3. **Concatenate** each split into ``books.{train,valid,test}.tokens``: one paragraph per line, an empty line
   between two books (fairseq's ``--sample-break-mode complete_doc`` sees books).

Resumable: every book is tokenized into ``OUT_DIR/tokenized/<its path>.tok`` (written whole, then renamed), and a
rerun tokenizes only the books that have no ``.tok`` yet or changed since. A book that cannot be decoded stops the
run with one line naming it; every book tokenized before it is kept.
"""
import argparse
import filecmp
import hashlib
import json
import os
import sys
import time
from multiprocessing import Pool

SPLITS = ("train", "valid", "test")
_tokenizer = None  # one MosesTokenizer per worker process


class BooksError(Exception):
    """Bad input: reported as one line, before or without losing any finished work."""


def find_books(books_dir):
    """Relative POSIX paths of the *.txt files under books_dir, sorted."""
    if not os.path.isdir(books_dir):
        raise BooksError(f"'{books_dir}' is not a directory")
    books = []
    for root, dirs, files in os.walk(books_dir):
        dirs.sort()
        for name in files:
            if name.endswith(".txt"):
                books.append(os.path.relpath(os.path.join(root, name), books_dir).replace(os.sep, "/"))
    if not books:
        raise BooksError(f"no books (*.txt files) under '{books_dir}'")
    return sorted(books)


def split_books(books, valid_fraction, test_fraction):
    """{book: split}: in SHA-1 order of the paths, valid then test take their share (at least one book each)."""
    ordered = sorted(books, key=lambda book: hashlib.sha1(book.encode("utf-8")).hexdigest())
    n_valid = max(1, round(valid_fraction * len(books)))
    n_test = max(1, round(test_fraction * len(books)))
    if n_valid + n_test >= len(books):
        raise BooksError(f"{len(books)} books are too few for {n_valid} valid + {n_test} test books and a train split")
    return {book: "valid" if i < n_valid else "test" if i < n_valid + n_test else "train"
            for i, book in enumerate(ordered)}


def paragraphs(text, wrapped):
    """The paragraphs of a book: its non-blank lines, or (wrapped) its blocks of lines between blank lines."""
    if not wrapped:
        return [line.strip() for line in text.splitlines() if line.strip()]
    blocks, current = [], []
    for line in text.splitlines() + [""]:
        if line.strip():
            current.append(line.strip())
        elif current:
            blocks.append(" ".join(current))
            current = []
    return blocks


def tokenize_book(job):
    """Worker: one book -> its .tok file. Returns (book, None), or (book, error message) for a bad book."""
    global _tokenizer
    source, target, book, options = job
    if _tokenizer is None:
        from sacremoses import MosesTokenizer
        _tokenizer = MosesTokenizer(lang="en")
    try:
        with open(source, encoding=options["encoding"], errors=options["encoding_errors"]) as f:
            text = f.read()
    except UnicodeDecodeError as e:
        return book, (f"book '{book}' is not valid {options['encoding']} (byte {e.start}); convert it, or pass "
                      f"--encoding-errors replace")
    lines = []
    for paragraph in paragraphs(text, options["wrapped"]):
        tokens = _tokenizer.tokenize(paragraph, escape=False, return_str=True, aggressive_dash_splits=True)
        if tokens.strip():
            lines.append(" ".join(tokens.split()))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(target + ".part", "w", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in lines)
    os.replace(target + ".part", target)  # a .tok file is always complete
    return book, None


def check_options(tokenized_dir, options):
    """Books tokenized by an earlier run are reused only if they were made with the same options."""
    path = os.path.join(tokenized_dir, "options.json")
    if os.path.exists(path):
        with open(path) as f:
            earlier = json.load(f)
        if earlier != options:
            raise BooksError(f"'{tokenized_dir}' was tokenized with other options ({earlier}); pass the same ones, "
                             f"or delete it to start over")
    else:
        os.makedirs(tokenized_dir, exist_ok=True)
        with open(path, "w") as f:
            json.dump(options, f)


def tokenize_all(books_dir, tokenized_dir, books, options, workers):
    """Tokenizes the books whose .tok is missing or older than the book, showing progress."""
    def tok_path(book):
        return os.path.join(tokenized_dir, book + ".tok")

    def done(book):
        return os.path.exists(tok_path(book)) and (
            os.path.getmtime(tok_path(book)) >= os.path.getmtime(os.path.join(books_dir, book)))

    pending = [book for book in books if not done(book)]
    print(f"{len(books)} books, {len(books) - len(pending)} already tokenized, tokenizing {len(pending)}", flush=True)
    jobs = [(os.path.join(books_dir, book), tok_path(book), book, options) for book in pending]
    started = last_report = time.time()
    with Pool(max(1, workers)) as pool:
        for n, (book, error) in enumerate(pool.imap_unordered(tokenize_book, jobs), start=1):
            if error:
                pool.terminate()
                raise BooksError(error)
            if time.time() - last_report > 10 or n == len(jobs):
                last_report = time.time()
                print(f"  tokenized {n}/{len(jobs)} books ({time.time() - started:.0f} s)", flush=True)


def write_splits(tokenized_dir, out_dir, split_of):
    """books.<split>.tokens for each split (books in SHA-1 order, an empty line between two), splits.tsv, and
    per-split counts."""
    stats = {split: {"books": 0, "empty_books": 0, "lines": 0, "tokens": 0} for split in SPLITS}
    handles = {split: open(os.path.join(out_dir, f"books.{split}.tokens.part"), "w", encoding="utf-8")
               for split in SPLITS}
    for book, split in split_of.items():  # already in SHA-1 order
        with open(os.path.join(tokenized_dir, book + ".tok"), encoding="utf-8") as f:
            lines = f.readlines()
        s = stats[split]
        if not lines:
            s["empty_books"] += 1
            continue
        if s["books"]:
            handles[split].write("\n")
        handles[split].writelines(lines)
        s["books"] += 1
        s["lines"] += len(lines)
        s["tokens"] += sum(line.count(" ") + 1 for line in lines)
    for split, handle in handles.items():
        handle.close()
        final = os.path.join(out_dir, f"books.{split}.tokens")
        if os.path.exists(final) and filecmp.cmp(handle.name, final, shallow=False):
            os.remove(handle.name)  # unchanged: keep the old file and its time, so its BPE is not redone
        else:
            os.replace(handle.name, final)
    with open(os.path.join(out_dir, "splits.tsv"), "w", encoding="utf-8") as f:
        f.writelines(f"{book}\t{split}\n" for book, split in split_of.items())
    return stats


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("books_dir", help="folder of plain-text books (*.txt, sub-folders included)")
    parser.add_argument("out_dir", help="where to write books.{train,valid,test}.tokens, splits.tsv and tokenized/")
    parser.add_argument("--valid-fraction", type=float, default=0.01,
                        help="share of the books held out for validation (at least one book)")
    parser.add_argument("--test-fraction", type=float, default=0.01,
                        help="share of the books held out for testing (at least one book)")
    parser.add_argument("--wrapped", action="store_true",
                        help="the books are hard-wrapped: a paragraph is a block of lines between blank lines "
                             "(default: every line is a paragraph, as in BookCorpus)")
    parser.add_argument("--encoding", default="utf-8", help="encoding of the books")
    parser.add_argument("--encoding-errors", default="strict", choices=["strict", "replace", "ignore"],
                        help="what to do with bytes the encoding cannot decode: stop with an error naming the book "
                             "(strict), or replace or drop them")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="parallel tokenizer processes")
    args = parser.parse_args(argv)

    options = {"wrapped": args.wrapped, "encoding": args.encoding, "encoding_errors": args.encoding_errors,
               "tokenizer": "sacremoses MosesTokenizer(lang=en) escape=False aggressive_dash_splits=True"}
    try:
        books = find_books(args.books_dir)
        split_of = split_books(books, args.valid_fraction, args.test_fraction)
        tokenized_dir = os.path.join(args.out_dir, "tokenized")
        check_options(tokenized_dir, options)
        tokenize_all(args.books_dir, tokenized_dir, books, options, args.workers)
    except BooksError as e:
        sys.exit(f"books_to_text.py: error: {e}")
    stats = write_splits(tokenized_dir, args.out_dir, split_of)
    for split, s in stats.items():
        empty = f" ({s['empty_books']} empty, skipped)" if s["empty_books"] else ""
        print(f"{split}: {s['books']} books{empty}, {s['lines']:,} lines, {s['tokens']:,} tokens")


if __name__ == "__main__":
    main()
