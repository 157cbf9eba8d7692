"""scripts/data/prepare_books.sh (with scripts/data/books_to_text.py) on a few tiny fake books.

- a folder of books is split by book, tokenized with sacremoses and binarized, deterministically;
- a rerun tokenizes only the books not done yet, and the optional GPT-2 BPE goes through fairseq's own encoder
  (with a tiny GPT-2-format vocabulary made here: the real encoder.json/vocab.bpe are downloads);
- bad input stops with one line, before any work or without losing any.
"""
import json
import os
import shutil

import pytest
from fairseq.data import Dictionary
from fairseq.data.encoders.gpt2_bpe_utils import bytes_to_unicode, get_encoder

from test_data_scripts import load_script_module, load_split, run_script

btt = load_script_module("data/books_to_text")

BOOK = """Chapter {i}

The ship number{i} didn't land -- it "floated" over the well-known city.
She said: it's over, book{i}.

The end.
"""
BOOKS = {f"{genre}/book{i}.txt": BOOK.format(i=i) for i, genre in enumerate(["romance"] * 3 + ["scifi"] * 3)}
TOKENIZED_LINE = "The ship number{i} didn 't land -- it \" floated \" over the well @-@ known city ."
PARAGRAPHS_PER_BOOK = 4


def write_books(root, books=BOOKS):
    for path, text in books.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text, encoding="utf-8")
    return root


def prepare(books_dir, workdir, destdir, **env):
    return run_script("data/prepare_books.sh", books_dir, BOOKS_WORKDIR=workdir, DESTDIR=destdir, WORKERS=1, **env)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """One run on the six fake books: (books folder, work directory, binarized directory, its output)."""
    root = tmp_path_factory.mktemp("books")
    books, work, dest = write_books(root / "books"), root / "work", root / "data-bin"
    r = prepare(books, work, dest)
    assert r.returncode == 0, r.stdout + r.stderr
    return books, work, dest, r.stdout


def test_books_are_split_by_book_tokenized_and_binarized(prepared):
    books, work, dest, out = prepared
    split_of = dict(line.split("\t") for line in (dest / "splits.tsv").read_text().splitlines())
    assert split_of == btt.split_books(list(BOOKS), 0.01, 0.01)   # the documented rule, whatever the listing order
    assert sorted(split_of.values()) == ["test", "train", "train", "train", "train", "valid"]

    d = Dictionary.load(str(dest / "dict.txt"))
    for split in ("train", "valid", "test"):
        text = (work / f"books.{split}.tokens").read_text(encoding="utf-8")
        mine = [i for i, book in enumerate(BOOKS) if split_of[book] == split]
        # every book is whole in exactly one split, tokenized as fairseq's --tokenizer moses --moses-no-escape
        for i in range(len(BOOKS)):
            assert (TOKENIZED_LINE.format(i=i) in text) == (i in mine), (split, i)
        # fairseq keeps the empty line between two books: one sample per line
        ds = load_split(str(dest), split, d)
        assert len(ds) == len(mine) * PARAGRAPHS_PER_BOOK + len(mine) - 1
        assert sum(len(line.split()) + 1 for line in text.splitlines()) == int(ds.sizes.sum())
    assert "6 books, 0 already tokenized, tokenizing 6" in out


def test_rerun_resumes_and_applies_fairseq_gpt2_bpe(prepared, tmp_path):
    books, work, _, _ = prepared
    work = shutil.copytree(work, tmp_path / "work")
    (work / "tokenized" / "scifi" / "book4.txt.tok").unlink()             # as if interrupted before that book
    encoder_json, vocab_bpe = tiny_gpt2_bpe(tmp_path)
    r = prepare(books, work, tmp_path / "data-bin", GPT2_ENCODER_JSON=encoder_json, GPT2_VOCAB_BPE=vocab_bpe)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "6 books, 5 already tokenized, tokenizing 1" in r.stdout

    bpe = get_encoder(str(encoder_json), str(vocab_bpe))
    for split in ("train", "valid", "test"):
        tokens = (work / f"books.{split}.tokens").read_text(encoding="utf-8").splitlines()
        ids = (work / f"books.{split}.bpe").read_text(encoding="utf-8").splitlines()
        assert [bpe.decode(map(int, line.split())) for line in ids] == tokens   # empty lines kept
    assert Dictionary.load(str(tmp_path / "data-bin" / "dict.txt")).index(str(bpe.encoder["Ġthe"])) > 3


def tiny_gpt2_bpe(directory):
    """encoder.json and vocab.bpe in GPT-2's format: the 256 byte symbols and three merges (-> 'Ġthe')."""
    merges = [("t", "h"), ("th", "e"), ("Ġ", "the")]
    symbols = list(bytes_to_unicode().values()) + ["".join(m) for m in merges]
    (directory / "encoder.json").write_text(json.dumps({s: i for i, s in enumerate(symbols)}))
    (directory / "vocab.bpe").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                         encoding="utf-8")
    return directory / "encoder.json", directory / "vocab.bpe"


def test_bad_input_stops_with_one_line_and_loses_nothing(prepared, tmp_path):
    books, work, dest, _ = prepared

    def fails(books_dir, message, destdir=tmp_path / "out", **env):
        r = prepare(books_dir, tmp_path / "work", destdir, **env)
        assert r.returncode != 0 and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
        assert not (tmp_path / "out").exists()

    fails(tmp_path / "nope", "is not a directory")
    fails(tmp_path, "no books (*.txt files)")
    fails(books, "already holds a binarized corpus; set FORCE=1", destdir=dest)
    fails(books, "needs both GPT2_ENCODER_JSON and GPT2_VOCAB_BPE", GPT2_ENCODER_JSON=tmp_path)
    assert not (tmp_path / "work").exists()                                # all of these before any work

    # A book that does not decode stops the run; every book tokenized before stays.
    work = shutil.copytree(work, tmp_path / "earlier_work")
    work_before = sorted(p.name for p in (work / "tokenized").rglob("*.tok"))
    with_bad = shutil.copytree(books, tmp_path / "books")
    (with_bad / "scifi" / "bad.txt").write_bytes(b"caf\xe9 latin-1\n")
    r = prepare(with_bad, work, tmp_path / "out")
    assert r.returncode != 0 and "book 'scifi/bad.txt' is not valid utf-8" in r.stderr
    assert r.stderr.count("\n") == 1 and not (tmp_path / "out").exists()
    assert sorted(p.name for p in (work / "tokenized").rglob("*.tok")) == work_before


def test_paragraphs_and_split_rule():
    text = "A first line\nwrapped here.\n\n\nA second\nparagraph.\n"
    assert btt.paragraphs(text, wrapped=False) == ["A first line", "wrapped here.", "A second", "paragraph."]
    assert btt.paragraphs(text, wrapped=True) == ["A first line wrapped here.", "A second paragraph."]

    books = [f"b{i}.txt" for i in range(200)]
    split = btt.split_books(books, 0.05, 0.02)
    assert split == btt.split_books(books[::-1], 0.05, 0.02)
    assert [list(split.values()).count(s) for s in ("valid", "test", "train")] == [10, 4, 186]
    with pytest.raises(btt.BooksError, match="too few"):
        btt.split_books(books[:2], 0.01, 0.01)
