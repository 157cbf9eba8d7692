"""Tests of the shipped corpus (data-bin/pydoc) and of the data-preparation scripts.

- the shipped corpus loads with fairseq and has the expected size and vocabulary;
- scripts/data/prepare_wikitext103.sh binarizes a small fake WikiText-103 tree;
- scripts/data/prepare_pydoc.sh runs end to end on a tiny fake python3.11-doc .deb;
- the reST cleaner of scripts/data/pydoc_to_text.py on small inline snippets.

The scripts run in the current interpreter's environment: its bin directory is put
first on PATH, so that `fairseq-preprocess` and `python` resolve to this virtualenv.
The full pydoc corpus is never rebuilt here (see scripts/data/prepare_pydoc.sh).
"""
import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
from fairseq.data import Dictionary, data_utils

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(REPO, "scripts")
PYDOC = os.path.join(REPO, "data-bin", "pydoc")


def load_script_module(name):
    """Imports scripts/<room>/<name>.py, e.g. "data/pydoc_to_text" (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(os.path.basename(name), os.path.join(SCRIPTS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    saved, sys.dont_write_bytecode = sys.dont_write_bytecode, True   # no __pycache__ in scripts/
    try:
        spec.loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = saved
    return module


ptt = load_script_module("data/pydoc_to_text")


def script_env(**extra):
    """Environment for the scripts: this interpreter's bin dir first on PATH."""
    env = dict(os.environ)
    bindir = os.path.dirname(sys.executable)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env["PYTHON"] = sys.executable
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_script(name, *args, **env):
    return subprocess.run(["bash", os.path.join(SCRIPTS, name), *map(str, args)], env=script_env(**env),
                          capture_output=True, text=True, timeout=300)


def load_split(destdir, split, dictionary):
    ds = data_utils.load_indexed_dataset(os.path.join(destdir, split), dictionary, dataset_impl=None)
    assert ds is not None, f"{split} split missing in {destdir}"
    return ds


# --------------------------------------------------------------------------- #
# (a) the shipped corpus
# --------------------------------------------------------------------------- #

def test_shipped_pydoc_corpus_loads():
    d = Dictionary.load(os.path.join(PYDOC, "dict.txt"))
    # WikiText-style cap: at most 16,000 types, plus fairseq's 4 specials and padding to a multiple of 8.
    assert 10_000 < len(d) <= 16_000 + d.nspecial + 8
    assert d.index("the") != d.unk() and d.index("Python") != d.unk()

    counts = {}
    for split in ("train", "valid", "test"):
        ds = load_split(PYDOC, split, d)
        assert len(ds) > 0
        n_lines = len(ds)
        n_symbols = int(ds.sizes.sum())                  # each line ends with </s>
        unk = sum(int((ds[i] == d.unk()).sum()) for i in range(len(ds)))
        counts[split] = (n_lines, n_symbols - n_lines, unk)
        # every line ends with the end-of-sentence symbol, and no id is out of range
        last = ds[len(ds) - 1]
        assert int(last[-1]) == d.eos() and int(last.max()) < len(d)

    train_lines, train_tokens, train_unk = counts["train"]
    # The build has 1,171,669 train tokens (README.md); 1.1M is a safe lower bound.
    assert train_tokens >= 1_100_000
    assert train_unk > 0                                  # rare words were replaced by <unk>
    assert train_unk / train_tokens < 0.05
    for split in ("valid", "test"):
        lines, tokens, unk = counts[split]
        assert tokens >= 30_000, (split, tokens)
        assert 0 < unk / tokens < 0.10, (split, unk, tokens)


def test_shipped_pydoc_has_readme_and_licence():
    readme = open(os.path.join(PYDOC, "README.md"), encoding="utf-8").read()
    assert "python3.11-doc" in readme and "PSF" in readme and "scripts/data/prepare_pydoc.sh" in readme
    assert "PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2" in open(os.path.join(PYDOC, "COPYRIGHT")).read()
    assert not os.path.exists(os.path.join(PYDOC, "preprocess.log"))


# --------------------------------------------------------------------------- #
# (b) scripts/data/prepare_wikitext103.sh on a fake WikiText-103 tree
# --------------------------------------------------------------------------- #

FAKE_WIKI = {
    "train": [
        " ",
        " = Valkyria Chronicles III = ",
        " ",
        " Senjō no Valkyria 3 : <unk> Chronicles is a tactical role @-@ playing video game . ",
        " The game began development in 2010 , carrying over a large portion of the work . ",
        " ",
        " = = Gameplay = = ",
        " ",
        " As with previous <unk> Chronicles games , the game is a tactical role @-@ playing game . ",
        " The game 's battle system , the <unk> system , is carried over directly . ",
    ],
    "valid": [" ", " = Homarus gammarus = ", " ", " Homarus gammarus is a species of <unk> lobster . "],
    "test": [" ", " = Robert <unk> = ", " ", " Robert <unk> is an English film and television actor . "],
}


@pytest.fixture
def fake_wikitext(tmp_path):
    root = tmp_path / "download"
    (root / "wikitext-103").mkdir(parents=True)
    for split, lines in FAKE_WIKI.items():
        (root / "wikitext-103" / f"wiki.{split}.tokens").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def check_binarized(destdir, splits=FAKE_WIKI):
    assert os.path.isfile(os.path.join(destdir, "dict.txt"))
    d = Dictionary.load(os.path.join(destdir, "dict.txt"))
    assert d.index("Valkyria") != d.unk() and d.index("=") != d.unk()
    for split, lines in splits.items():
        for ext in ("bin", "idx"):
            assert os.path.isfile(os.path.join(destdir, f"{split}.{ext}"))
        ds = load_split(destdir, split, d)
        assert len(ds) == len(lines)                      # one sample per line, empty lines included
        assert int(ds.sizes.sum()) == sum(len(line.split()) + 1 for line in lines)
        # words not seen in train are <unk> in valid/test
        expected = " ".join(w if d.index(w) != d.unk() else "<unk>" for w in lines[3].split())
        assert d.string(ds[3]) == expected
        if split == "train":
            assert expected == lines[3].strip()


def test_prepare_wikitext103_existing_download(fake_wikitext, tmp_path):
    # DOWNLOAD_DIR already holds wikitext-103/: no download, straight to fairseq-preprocess.
    dest = tmp_path / "data-bin" / "wikitext-103"
    r = run_script("data/prepare_wikitext103.sh", DOWNLOAD_DIR=fake_wikitext, DESTDIR=dest, WORKERS=1)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "skipping download" in r.stdout
    check_binarized(dest)

    # A second run refuses to overwrite the dictionary unless FORCE=1.
    r = run_script("data/prepare_wikitext103.sh", DOWNLOAD_DIR=fake_wikitext, DESTDIR=dest, WORKERS=1)
    assert r.returncode != 0 and "FORCE=1" in r.stderr


def test_prepare_wikitext103_explicit_dir_and_errors(fake_wikitext, tmp_path):
    dest = tmp_path / "out"
    # The directory with the .tokens files given as an argument (its parent works too).
    r = run_script("data/prepare_wikitext103.sh", fake_wikitext / "wikitext-103", DESTDIR=dest, WORKERS=1)
    assert r.returncode == 0, r.stdout + r.stderr
    check_binarized(dest)

    # Clear errors for a missing directory or missing files, before any work is done.
    r = run_script("data/prepare_wikitext103.sh", tmp_path / "nope", DESTDIR=tmp_path / "x")
    assert r.returncode != 0 and "is not a directory" in r.stderr
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "wiki.train.tokens").write_text("a b\n")
    r = run_script("data/prepare_wikitext103.sh", WIKITEXT_DIR=tmp_path / "partial", DESTDIR=tmp_path / "x")
    assert r.returncode != 0 and "wiki.valid.tokens" in r.stderr
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- #
# scripts/data/prepare_pydoc.sh end to end, on a tiny fake python3.11-doc package
# --------------------------------------------------------------------------- #

FAKE_DOC = """\
Module number {i}
=================

The module number {i} does useful things with the :class:`Thing` objects of the
standard library. It is a good module, and a very good example for this test.

Basic use
---------

Call :func:`~pkg.mod.do_it` to do it::

    do_it({i})

Every word that is rare{i} becomes an unknown word in the corpus.
"""


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb is needed to build a fake .deb")
def test_prepare_pydoc_on_fake_package(tmp_path):
    pkg = tmp_path / "pkg"
    sources = pkg / "usr/share/doc/python3.11/html/_sources"
    (sources / "library").mkdir(parents=True)
    for i in range(12):
        (sources / "library" / f"mod{i}.rst.txt").write_text(FAKE_DOC.format(i=i), encoding="utf-8")
    (pkg / "usr/share/doc/python3.11-doc").mkdir(parents=True)
    (pkg / "usr/share/doc/python3.11-doc/copyright").write_text("PSF LICENSE AGREEMENT (test copy)\n")
    (pkg / "DEBIAN").mkdir()
    (pkg / "DEBIAN/control").write_text(
        "Package: python3.11-doc\nVersion: 0.0-test\nArchitecture: all\n"
        "Maintainer: test <test@example.org>\nDescription: fake\n")
    deb = tmp_path / "python3.11-doc_0.0-test_all.deb"
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(pkg), str(deb)], check=True,
                   capture_output=True)

    dest = tmp_path / "data-bin" / "pydoc"
    work = tmp_path / "work"
    r = run_script("data/prepare_pydoc.sh", deb, DESTDIR=dest, PYDOC_WORKDIR=work, WORKERS=1)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "built from 3.11.2-6+deb12u8" in r.stderr        # the version mismatch is reported

    for name in ("dict.txt", "README.md", "COPYRIGHT", "train.bin", "train.idx", "valid.bin", "test.idx"):
        assert (dest / name).is_file(), name
    assert not (dest / "preprocess.log").exists()
    d = Dictionary.load(str(dest / "dict.txt"))
    assert d.index("module") != d.unk() and d.index("rare3") == d.unk()
    train = load_split(str(dest), "train", d)
    assert len(train) > 0

    text = (work / "text" / "pydoc.train.tokens").read_text(encoding="utf-8")
    assert "= Module number" in text and "= = Basic use = =" in text
    assert "do_it (" not in text and "::" not in text and "<unk>" in text
    assert "Call do_it to do it :" in text
    assert "0.0-test" in (dest / "README.md").read_text()


# --------------------------------------------------------------------------- #
# (c) the reST cleaner
# --------------------------------------------------------------------------- #

SNIPPET = textwrap.dedent("""\
    .. _json-intro:

    :mod:`json` --- JSON encoder and decoder
    ========================================

    .. module:: json
       :synopsis: Encode and decode the JSON format.

    .. index:: single: JSON

    `JSON (JavaScript Object Notation) <https://json.org>`_, specified by
    :rfc:`7159`, is a **lightweight** data interchange format. Use
    :func:`json.dumps` with ``indent=4`` for *pretty* output [#f1]_.

    Encoding basic Python objects::

        >>> import json
        >>> json.dumps(['foo', {'bar': ('baz', None, 1.0, 2)}])
        '["foo", {"bar": ["baz", null, 1.0, 2]}]'

    >>> json.loads('[1]')
    [1]

    .. code-block:: python

       print("never in the corpus")

    .. function:: dumps(obj, *, skipkeys=False)
                  loads(s)

       Serialize *obj* to a JSON formatted :class:`str`.

       .. versionchanged:: 3.6 All optional parameters are now keyword-only.

       .. note::
          Keys in key/value pairs of JSON are always of the type :class:`str`.

    Basic Usage
    -----------

    =====  =====
    JSON   Python
    =====  =====
    array  list
    =====  =====

    * First item of a list,
      continued on a second line.
    * Second item.

    See :ref:`json-intro` and :pep:`8`.
    """)


def test_cleaner_on_snippet():
    blocks = ptt.rst_to_blocks(SNIPPET, "library/json", refs={"label:json-intro": "JSON intro"})
    assert blocks == [
        (1, "json --- JSON encoder and decoder"),
        (0, "JSON (JavaScript Object Notation), specified by RFC 7159, is a lightweight data interchange "
            "format. Use json.dumps with indent=4 for pretty output."),
        (0, "Encoding basic Python objects:"),
        (0, "Serialize obj to a JSON formatted str."),
        (0, "All optional parameters are now keyword-only."),
        (0, "Keys in key/value pairs of JSON are always of the type str."),
        (2, "Basic Usage"),
        (0, "First item of a list, continued on a second line."),
        (0, "Second item."),
        (0, "See JSON intro and PEP 8."),
    ]
    # Labels right before a heading are collected for :ref: (first pass over all documents).
    refs = ptt.collect_refs([("library/json", SNIPPET)])
    assert refs["label:json-intro"] == "json --- JSON encoder and decoder"
    assert refs["doc:library/json"] == "json --- JSON encoder and decoder"


@pytest.mark.parametrize("rst, text", [
    ("A :meth:`~io.TextIOBase.read` call.", "A read call."),
    ("See :ref:`the tutorial <tut-intro>`.", "See the tutorial."),
    ("Set ``x*y`` and *args* but 2*3*4 stays.", "Set x*y and args but 2*3*4 stays."),
    ("A `link`_ and an `anonymous one <http://x>`__.", "A link and an anonymous one."),
    ("Fixed in :issue:`123` and :gh:`456`.", "Fixed in bpo-123 and gh-456."),
    ("Python |version| is here, :abbr:`LIFO (last-in, first-out)`.", "Python 3.11 is here, LIFO."),
    ("An escaped \\*star\\* and :samp:`print({x})`.", "An escaped *star* and print(x)."),
])
def test_cleaner_inline_markup(rst, text):
    assert ptt.rst_to_blocks(rst) == [(0, text)]


def test_tokenize_split_and_vocab():
    lines = ptt._tokenize_document([(1, "A Title"), (0, "It's sys.exc_info(), isn't it?")])
    assert lines == ["= A Title =", "It 's sys.exc_info ( ) , isn 't it ?"]

    sizes = {f"doc{i}": 100 for i in range(20)}
    split = ptt.split_documents(sizes)
    assert split == ptt.split_documents(dict(reversed(list(sizes.items()))))   # order-independent
    assert sorted(split.values()).count("valid") == 1 and sorted(split.values()).count("test") == 1

    vocab = ptt.build_vocab(["a a a b b b c c", "a d d d"], min_count=3, max_size=2)
    assert vocab == {"a", "b"}                            # count >= 3, ties broken alphabetically
