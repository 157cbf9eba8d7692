#!/usr/bin/env python3
"""Turn the Python documentation's reStructuredText sources into a WikiText-style
language-modelling corpus.

Used by ``scripts/data/prepare_pydoc.sh``; it can also be run on its own::

    python scripts/data/pydoc_to_text.py SOURCES_DIR OUT_DIR

where SOURCES_DIR is ``usr/share/doc/python3.11/html/_sources`` of an extracted
Debian ``python3.11-doc`` package. It writes ``pydoc.{train,valid,test}.tokens``
into OUT_DIR and prints a summary.

The pipeline, step by step:

1. **Clean** each ``*.rst.txt`` document into plain English prose
   (:func:`rst_to_blocks`): directive lines and their options, labels, comments,
   heading adornments, tables, literal code blocks (the indented block after a
   paragraph ending in ``::``, code-block/doctest/... directives) and ``>>>``
   sessions are dropped; inline markup is stripped (``:func:`foo``` -> ``foo``,
   ````code```` -> ``code``, ``*emph*`` -> ``emph``, ```link <url>`_`` -> ``link``);
   wrapped lines are joined so that every paragraph is one line. Headings become
   WikiText-style ``= Title =`` / ``= = Subtitle = =`` lines.
2. **Tokenize** every line with sacremoses (``MosesTokenizer(lang="en")``,
   ``escape=False``); case is kept.
3. **Split by document** into train/valid/test, deterministically: documents are
   visited in the order of the SHA-1 of their relative path and given to valid,
   then test, until each holds ~5% of all tokens; the rest is train.
4. **Cap the vocabulary** WikiText-style: words are counted on train only; the
   most frequent types with count >= 3 are kept (at most 16,000); every other
   token, in all three splits, becomes the literal ``<unk>``.

Output format: one paragraph or heading per line, and an empty line between two
documents (so fairseq's ``--sample-break-mode complete_doc`` sees documents).
"""

import argparse
import collections
import hashlib
import json
import os
import re
import sys
from multiprocessing import Pool

# --------------------------------------------------------------------------- #
# Part 1: reStructuredText -> plain prose
# --------------------------------------------------------------------------- #

# Directives whose *content* is prose and is kept (the directive line itself,
# its arguments -- e.g. a function signature -- and its options are dropped).
PROSE_DIRECTIVES = {
    # admonitions and other prose containers
    "note", "warning", "seealso", "important", "caution", "tip", "hint",
    "attention", "danger", "error", "admonition", "impl-detail", "topic",
    "sidebar", "glossary", "epigraph", "only", "centered",
    # API descriptions: the signature is code, the body is prose
    "function", "method", "classmethod", "staticmethod", "abstractmethod",
    "coroutinefunction", "coroutinemethod", "awaitablefunction",
    "awaitablemethod", "decorator", "decoratormethod", "class", "exception",
    "attribute", "data", "describe", "object", "opcode", "cmdoption",
    "option", "envvar", "pdbcommand", "2to3fixer",
}
# Directives whose first argument(s) are version numbers and whose remaining
# argument text (plus content) is prose, e.g. ".. versionchanged:: 3.2 Added x."
VERSION_DIRECTIVES = {"versionadded": 1, "versionchanged": 1, "deprecated": 1,
                      "deprecated-removed": 2}
# Directives that take no arguments: their content may start on the line right
# after the directive, without a blank line in between.
NO_ARGUMENT_DIRECTIVES = {
    "note", "warning", "seealso", "important", "caution", "tip", "hint",
    "attention", "danger", "error", "impl-detail", "glossary", "epigraph",
}
# Every other directive (code-block, doctest, testcode, productionlist, toctree,
# index, include, image, table, list-table, module, rubric, audit-event, ...)
# is dropped together with its content. Domain directives such as
# ``c:function`` are treated like their plain counterpart (prose content).

# Substitutions that Sphinx defines for the whole documentation set.
DEFAULT_SUBSTITUTIONS = {"version": "3.11", "release": "3.11.2", "today": ""}

# Sphinx renders some roles with a prefix.
ROLE_PREFIX = {"rfc": "RFC ", "pep": "PEP ", "issue": "bpo-", "gh": "gh-"}

ADORNMENT_RE = re.compile(r"""^([!-/:-@\[-`{-~])\1{2,}\s*$""")  # e.g. =====, ----, ****
SIMPLE_TABLE_BORDER_RE = re.compile(r"^=+( +=+)+\s*$")          # e.g. =====  =====
GRID_TABLE_RE = re.compile(r"^\+[-=+]+\+\s*$")                  # e.g. +----+----+
DIRECTIVE_RE = re.compile(r"^\.\.\s+([\w:.+-]+)::(?:\s+(.*))?$")
LABEL_RE = re.compile(r"^\.\.\s+_([^:]+|`[^`]+`):(\s.*)?$")     # .. _label: [url]
ANONYMOUS_TARGET_RE = re.compile(r"^__\s+\S")                    # __ http://...
SUBSTITUTION_DEF_RE = re.compile(r"^\.\.\s+\|([^|]+)\|\s+([\w-]+)::\s*(.*)$")
FOOTNOTE_RE = re.compile(r"^\.\.\s+\[([^\]]+)\](?:\s+(.*))?$")
BULLET_RE = re.compile(r"^([-*+\u2022])(\s+|$)")
ENUM_RE = re.compile(r"^(?:(?:\d+|#)\.|\(?(?:\d+|#|[a-zA-Z])\))(\s+|$)")
FIELD_RE = re.compile(r"^:([^:`\s][^:`]*):(?:\s+(.*))?$")
OPTION_LINE_RE = re.compile(r"^:[\w -]+:(\s|$)")
# Bibliographic fields at the top of a document: metadata, not prose.
DOCINFO_FIELDS = {"author", "authors", "release", "date", "version", "editor",
                  "copyright", "contact", "organization", "status", "address",
                  "revision", "email", "licence", "license", "audience"}

# Inline markup, matched left to right in a single pass so that, e.g., the text
# of a ``literal`` is never re-read as *emphasis*. Lazy quantifiers (``??``, ``*?``)
# make each construct end at its first possible end-string.
_START = r"(?<![\w*`\\])"   # an emphasis start-string follows neither a word character nor a *
_END = r"(?![\w*`])"         # ... and its end-string is not followed by one
INLINE_RE = re.compile(
    r"``(?P<literal>\S(?:.*?\S)??)``(?!`)"                             # ``code``
    r"|(?P<role>(?::[\w.+-]+)+):`(?P<role_text>(?:[^`\\]|\\.)+)`"      # :role:`text`
    r"|`(?P<ref>(?:[^`\\]|\\.)+)`(?P<underscores>__?)"                 # `text <url>`_
    r"|`(?P<interpreted>(?:[^`\\]|\\.)+)`(?::[\w.+-]+:)?"              # `text`
    r"|" + _START + r"\*\*(?P<strong>\S(?:.*?\S)??)\*\*" + _END +      # **strong**
    r"|" + _START + r"\*(?P<emph>[^\s*](?:.*?[^\s\\])??)\*" + _END +   # *emph*
    r"|\s?\[(?:#[\w-]*|\d+|\*)\]_"                                     # footnote ref [#x]_
    r"|(?<![\w|])\|(?P<subst>[\w.-](?:[\w .-]*[\w.-])?)\|(?![\w|])"   # |substitution|
    r"|\\(?P<escaped>.)"                                               # \* and "\ "
)


class RstCleaner:
    """Converts one reStructuredText document into a list of blocks.

    Each block is ``(level, text)``: ``level`` is 0 for a paragraph and
    1, 2, ... for a section heading of that depth.

    ``refs`` maps a ``:ref:`` label or a ``:doc:`` name to the title Sphinx would
    show for it; it is filled by a first pass over all documents (see
    :func:`collect_refs`). Labels it does not know are shown as-is.
    """

    def __init__(self, docname="", refs=None):
        self.docname = docname
        self.refs = refs or {}
        self.substitutions = dict(DEFAULT_SUBSTITUTIONS)
        self.blocks = []               # output: (level, text)
        self.heading_styles = []       # adornment styles in order of first use
        self.pending_labels = []       # labels waiting for the next heading
        self.labels = {}               # label -> heading title (found here)

    # ---- inline markup ----------------------------------------------------- #

    def strip_inline(self, text):
        """Removes inline reST markup from one paragraph of text."""
        return re.sub(r"\s+", " ", INLINE_RE.sub(self._inline, text)).strip()

    def _inline(self, m):
        g = m.group
        if g("literal") is not None:
            return g("literal")
        if g("role") is not None:
            return self._role(g("role"), g("role_text"))
        if g("ref") is not None:
            # `title <target>`_ -> title; `<target>`_ -> target; `name`_ -> name
            text = _unescape(g("ref"))
            mm = re.match(r"^(.*?)\s*<([^<>]*)>$", text, re.S)
            if mm:
                text = mm.group(1) or mm.group(2)
            return text
        if g("interpreted") is not None:
            return _unescape(g("interpreted"))
        if g("strong") is not None:
            return self.strip_inline(g("strong"))
        if g("emph") is not None:
            return self.strip_inline(g("emph"))
        if g("subst") is not None:
            name = g("subst")
            return self.substitutions.get(name.lower(), name)
        if g("escaped") is not None:
            char = g("escaped")
            return "" if char.isspace() else char
        return ""  # footnote reference

    def _role(self, role, text):
        """Text shown for an interpreted-text role such as :func:`~os.path.join`."""
        name = role.strip(":").split(":")[-1].lower()   # "c:func" -> "func"
        text = _unescape(text)
        explicit = re.match(r"^(.*?)\s*<([^<>]*)>$", text, re.S)
        if explicit and explicit.group(1):               # `title <target>`
            return explicit.group(1)
        if explicit:
            text = explicit.group(2)
        if name == "ref":
            return self.refs.get("label:" + text.lower(), text)
        if name == "doc":
            return self.refs.get("doc:" + _resolve_doc(self.docname, text), text)
        if name in ROLE_PREFIX:
            return ROLE_PREFIX[name] + text.split("#")[0]
        if name == "abbr":                                  # LIFO (last-in, first-out)
            return re.sub(r"\s*\(.*\)\s*$", "", text, flags=re.S)
        if name in ("samp", "file", "menuselection", "guilabel"):
            text = re.sub(r"(?<!\\)[{}]", "", text)         # {variable} parts
            return text.replace("-->", ">")
        # Python/C cross-references: "!" suppresses the link, "~" shows the last part.
        text = text.lstrip("!")
        if text.startswith("~"):
            text = text[1:].split(".")[-1]
        return text

    # ---- block structure --------------------------------------------------- #

    def run(self, source):
        """Cleans a whole document; returns the list of ``(level, text)`` blocks."""
        lines = source.expandtabs(8).replace("\r\n", "\n").split("\n")
        self._parse([line.rstrip() for line in lines])
        return self.blocks

    def _emit(self, level, text):
        text = self.strip_inline(text)
        if text and re.search(r"\w", text):
            self.blocks.append((level, text))

    def _parse(self, lines):
        """Parses a list of lines that form one body (a document, a directive's
        content, a list item, a block quote, ...)."""
        nonblank = [ln for ln in lines if ln.strip()]
        if not nonblank:
            return
        base = min(_indent(ln) for ln in nonblank)
        i, n = 0, len(lines)
        while i < n:
            line = lines[i]
            if not line.strip():
                i += 1
                continue
            stripped = line.strip()
            ind = _indent(line)
            nxt = lines[i + 1] if i + 1 < n else ""

            # An indented region at the start of a block: a block quote.
            if ind > base:
                j = _end_of_indented(lines, i, base)
                self._parse(lines[i:j])
                i = j
                continue

            # Explicit markup: directives, labels, comments, footnotes, ...
            if stripped == ".." or stripped.startswith(".. ") or ANONYMOUS_TARGET_RE.match(stripped):
                j = _end_of_indented(lines, i + 1, base)
                self._explicit_markup(stripped, lines[i + 1:j])
                i = j
                continue

            # Section title with an overline.
            if (ADORNMENT_RE.match(stripped) and nxt.strip() and i + 2 < n
                    and lines[i + 2].strip() == stripped and not ADORNMENT_RE.match(nxt.strip())):
                self._heading(nxt.strip(), (stripped[0], True))
                i += 3
                continue

            # Section title with an underline only.
            nstr = nxt.strip()
            if (nstr and ADORNMENT_RE.match(nstr) and _indent(nxt) == ind
                    and not ADORNMENT_RE.match(stripped) and len(nstr) >= len(stripped) - 1):
                self._heading(stripped, (nstr[0], False))
                i += 2
                continue

            # Transition (a horizontal rule) or a stray adornment line.
            if ADORNMENT_RE.match(stripped):
                i += 1
                continue

            # Tables are not prose: drop them.
            if GRID_TABLE_RE.match(stripped):
                i = _end_of_paragraph(lines, i)
                continue
            if SIMPLE_TABLE_BORDER_RE.match(stripped):
                i = _end_of_simple_table(lines, i)
                continue

            # Interactive sessions (doctest blocks).
            if stripped.startswith(">>>"):
                i = _end_of_paragraph(lines, i)
                continue

            # Bullet and enumerated list items: each item is its own body.
            marker = BULLET_RE.match(stripped) or ENUM_RE.match(stripped)
            if marker:
                j = _end_of_indented(lines, i + 1, base)
                self._parse(_with_first_line(stripped[marker.end():], lines[i + 1:j]))
                i = j
                continue

            # Field lists (":Author: x" at the top of a document, ":param x: ...").
            field = FIELD_RE.match(stripped)
            if field:
                j = _end_of_indented(lines, i + 1, base)
                if field.group(1).strip().lower() not in DOCINFO_FIELDS:
                    first = field.group(1) + ": " + (field.group(2) or "")
                    self._parse(_with_first_line(first, lines[i + 1:j]))
                i = j
                continue

            # Line blocks ("| text").
            if stripped.startswith("| ") or stripped == "|":
                j = _end_of_paragraph(lines, i)
                self._emit(0, " ".join(ln.strip()[1:] for ln in lines[i:j]))
                i = j
                continue

            # Otherwise: a paragraph (or the term of a definition-list item).
            j = i + 1
            while j < n and lines[j].strip() and _indent(lines[j]) == ind:
                j += 1
            text = " ".join(ln.strip() for ln in lines[i:j])
            if j < n and lines[j].strip() and _indent(lines[j]) > ind:
                # Definition list: the term, then its indented definition.
                self._emit(0, text)
                k = _end_of_indented(lines, j, base)
                self._parse(lines[j:k])
                i = k
                continue
            i = j
            if text.endswith("::"):
                # "Paragraph::" introduces a literal block: keep "Paragraph:",
                # drop the indented block that follows.
                text = text[:-2].rstrip() if text.endswith(" ::") else text[:-1]
                k = i
                while k < n and not lines[k].strip():
                    k += 1
                if k < n and _indent(lines[k]) > ind:
                    i = _end_of_indented(lines, k, ind)
            self._emit(0, text)

    def _heading(self, title, style):
        if style not in self.heading_styles:
            self.heading_styles.append(style)
        level = self.heading_styles.index(style) + 1
        before = len(self.blocks)
        self._emit(level, title)
        if len(self.blocks) > before:
            for label in self.pending_labels:
                self.labels[label] = self.blocks[-1][1]
        self.pending_labels = []

    def _explicit_markup(self, first, body):
        """Handles a ``.. something`` construct; ``body`` is its indented part."""
        label = LABEL_RE.match(first)
        if label:
            if not (label.group(2) or "").strip():         # internal target
                self.pending_labels.append(label.group(1).strip("`").lower())
            return
        subst = SUBSTITUTION_DEF_RE.match(first)
        if subst:
            if subst.group(2) == "replace":
                value = " ".join([subst.group(3)] + [ln.strip() for ln in body])
                self.substitutions[subst.group(1).lower()] = self.strip_inline(value)
            return
        directive = DIRECTIVE_RE.match(first)
        if directive:
            self._directive(directive.group(1).lower(), directive.group(2) or "", body)
            return
        footnote = FOOTNOTE_RE.match(first)
        if footnote:
            # Footnotes and citations are prose: keep their text.
            self._parse(_with_first_line(footnote.group(2) or "", body))
            return
        # Anything else is a comment or an external hyperlink target: drop it.

    def _directive(self, name, argument, body):
        plain = name.split(":")[-1]                       # "c:function" -> "function"
        domain = ":" in name
        if plain not in PROSE_DIRECTIVES and plain not in VERSION_DIRECTIVES:
            return                                          # code, tables, toctree, ...
        # Split the body into header (argument continuation lines and
        # ":option: value" lines) and content, which follows a blank line.
        k = 0
        while k < len(body) and body[k].strip():
            if not OPTION_LINE_RE.match(body[k].strip()) and plain in NO_ARGUMENT_DIRECTIVES:
                break                                       # content starts at once
            k += 1
        header, content = body[:k], body[k:]
        if plain in VERSION_DIRECTIVES and not domain:
            # ".. versionchanged:: 3.2 Text..." - keep the text after the version(s).
            words = " ".join([argument] + [ln.strip() for ln in header
                                           if not OPTION_LINE_RE.match(ln.strip())]).split(None)
            text = " ".join(words[VERSION_DIRECTIVES[plain]:])
            if text:
                self._emit(0, text)
        self._parse(content)


def _indent(line):
    return len(line) - len(line.lstrip(" "))


def _with_first_line(text, rest):
    """Lines of a body whose first line starts after a marker (a list bullet, a
    footnote label, a field name): the first line is re-indented like the lines
    that continue it, so that the paragraph is read as one."""
    follow = [ln for ln in rest if ln.strip()]
    if rest and rest[0].strip():
        indent = _indent(rest[0])
    else:
        indent = min((_indent(ln) for ln in follow), default=0)
    return [" " * indent + text] + rest


def _unescape(text):
    return re.sub(r"\\(.)", lambda m: "" if m.group(1).isspace() else m.group(1), text)


def _end_of_indented(lines, start, base):
    """Index just past the region from ``start`` made of blank lines and lines
    indented more than ``base`` (trailing blank lines included)."""
    j = start
    while j < len(lines) and (not lines[j].strip() or _indent(lines[j]) > base):
        j += 1
    return j


def _end_of_paragraph(lines, start):
    j = start
    while j < len(lines) and lines[j].strip():
        j += 1
    return j


def _end_of_simple_table(lines, start):
    """A simple table ends with a border line followed by a blank line."""
    j = start + 1
    while j < len(lines):
        if SIMPLE_TABLE_BORDER_RE.match(lines[j].strip()) or ADORNMENT_RE.match(lines[j].strip()):
            if j + 1 >= len(lines) or not lines[j + 1].strip():
                return j + 1
        j += 1
    return j


def _resolve_doc(docname, target):
    """``:doc:`` targets are relative to the current document unless they start with /."""
    if target.startswith("/"):
        return target.lstrip("/")
    return os.path.normpath(os.path.join(os.path.dirname(docname), target)).replace(os.sep, "/")


def rst_to_blocks(source, docname="", refs=None):
    """Cleans one reST document; returns ``[(level, text), ...]`` (level 0 = paragraph)."""
    return RstCleaner(docname, refs).run(source)


def collect_refs(documents):
    """First pass: maps ``label:<name>`` and ``doc:<name>`` to the titles that
    Sphinx shows for ``:ref:`` and ``:doc:`` references without an explicit title."""
    refs = {}
    for docname, source in documents:
        cleaner = RstCleaner(docname)
        blocks = cleaner.run(source)
        for label, title in cleaner.labels.items():
            refs["label:" + label] = title
        titles = [text for level, text in blocks if level > 0]
        if titles:
            refs["doc:" + docname] = titles[0]
    return refs


# --------------------------------------------------------------------------- #
# Part 2: tokenization, document split, vocabulary cap
# --------------------------------------------------------------------------- #

# Python identifiers with underscores (tp_flags, sys.exc_info, __init__) are
# kept whole; Moses would otherwise split them into "tp _ flags".
PROTECTED_PATTERNS = [r"[\w.]*_\w*(?:\.\w+)*"]

_tokenizer = None


def _tokenize_document(job):
    """Worker: cleaned blocks of one document -> list of token lines."""
    global _tokenizer
    if _tokenizer is None:
        from sacremoses import MosesTokenizer
        _tokenizer = MosesTokenizer(lang="en")
    out = []
    for level, text in job:
        # aggressive dash splits ("built @-@ in"), no escaping: what fairseq-interactive's
        # `--tokenizer moses --moses-no-escape` does to a prompt, and WikiText-103's convention
        tokens = _tokenizer.tokenize(text, escape=False, return_str=True, aggressive_dash_splits=True,
                                     protected_patterns=PROTECTED_PATTERNS).split()
        if not tokens:
            continue
        if level > 0:                                        # WikiText heading style
            marks = " ".join(["="] * level)
            tokens = marks.split() + tokens + marks.split()
        out.append(" ".join(tokens))
    return out


def find_sources(src_dir):
    """Sorted relative names (without .rst.txt) of the documents to use."""
    names = []
    for root, _dirs, files in os.walk(src_dir):
        for f in files:
            if f.endswith(".rst.txt"):
                rel = os.path.relpath(os.path.join(root, f), src_dir).replace(os.sep, "/")
                names.append(rel[: -len(".rst.txt")])
    # includes/ holds fragments pulled into other pages; contents is a toctree.
    return sorted(n for n in names if not n.startswith("includes/") and n != "contents")


def split_documents(doc_tokens, valid_frac=0.05, test_frac=0.05):
    """Deterministic split by document: visit documents in SHA-1 order of their
    name; fill valid, then test, up to their share of tokens; the rest is train."""
    total = sum(doc_tokens.values())
    targets = {"valid": valid_frac * total, "test": test_frac * total}
    sizes = {"valid": 0, "test": 0}
    split = {}
    for name in sorted(doc_tokens, key=lambda d: hashlib.sha1(d.encode("utf-8")).hexdigest()):
        split[name] = "train"
        for part in ("valid", "test"):
            if sizes[part] + doc_tokens[name] <= targets[part]:
                split[name] = part
                sizes[part] += doc_tokens[name]
                break
    return split


def build_vocab(train_lines, min_count=3, max_size=16000):
    """WikiText-style vocabulary: most frequent train types with count >= min_count."""
    counts = collections.Counter(tok for line in train_lines for tok in line.split())
    kept = sorted((c, w) for w, c in counts.items() if c >= min_count and w != "<unk>")
    kept.sort(key=lambda cw: (-cw[0], cw[1]))                # frequency, then alphabetical
    return {w for _c, w in kept[:max_size]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sources", help="the html/_sources directory of python3.11-doc")
    parser.add_argument("outdir", help="where to write pydoc.{train,valid,test}.tokens")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--min-count", type=int, default=3)
    parser.add_argument("--max-vocab", type=int, default=16000)
    parser.add_argument("--valid-frac", type=float, default=0.05)
    parser.add_argument("--test-frac", type=float, default=0.05)
    parser.add_argument("--stats", help="also write the summary as JSON to this file")
    args = parser.parse_args(argv)

    names = find_sources(args.sources)
    if not names:
        sys.exit(f"error: no *.rst.txt files under {args.sources}")
    documents = []
    for name in names:
        with open(os.path.join(args.sources, name + ".rst.txt"), encoding="utf-8") as f:
            documents.append((name, f.read()))

    # 1. clean (two passes: the first finds the titles that :ref:/:doc: show)
    refs = collect_refs(documents)
    cleaned = [rst_to_blocks(src, name, refs) for name, src in documents]

    # 2. tokenize (in parallel; the result is independent of the worker count)
    with Pool(max(1, args.workers)) as pool:
        tokenized = pool.map(_tokenize_document, cleaned, chunksize=4)
    doc_lines = {name: lines for (name, _), lines in zip(documents, tokenized) if lines}
    doc_tokens = {name: sum(len(l.split()) for l in lines) for name, lines in doc_lines.items()}

    # 3. split by document
    split = split_documents(doc_tokens, args.valid_frac, args.test_frac)
    parts = {p: [n for n in sorted(doc_lines) if split[n] == p] for p in ("train", "valid", "test")}

    # 4. vocabulary from train only; everything else becomes <unk>
    vocab = build_vocab((l for n in parts["train"] for l in doc_lines[n]),
                        args.min_count, args.max_vocab)

    os.makedirs(args.outdir, exist_ok=True)
    stats = {"documents_read": len(names), "vocab_size": len(vocab), "splits": {}}
    for part, docs in parts.items():
        n_tok = n_unk = n_lines = 0
        types = set()
        path = os.path.join(args.outdir, f"pydoc.{part}.tokens")
        with open(path, "w", encoding="utf-8") as f:
            for d, name in enumerate(docs):
                if d:
                    f.write("\n")                         # empty line between documents
                for line in doc_lines[name]:
                    toks = [t if t in vocab else "<unk>" for t in line.split()]
                    n_tok += len(toks)
                    n_unk += sum(t == "<unk>" for t in toks)
                    types.update(toks)
                    n_lines += 1
                    f.write(" ".join(toks) + "\n")
        stats["splits"][part] = {"documents": len(docs), "lines": n_lines, "tokens": n_tok,
                                 "unk": n_unk, "oov_rate": n_unk / max(1, n_tok),
                                 "types": len(types)}

    print(f"documents read: {len(names)}, vocabulary: {len(vocab)} types "
          f"(count >= {args.min_count} on train, at most {args.max_vocab}) + <unk>")
    print(f"{'split':6} {'docs':>5} {'lines':>7} {'tokens':>9} {'types':>6} {'<unk>':>7} {'OOV':>6}")
    for part, s in stats["splits"].items():
        print(f"{part:6} {s['documents']:5d} {s['lines']:7d} {s['tokens']:9d} {s['types']:6d} "
              f"{s['unk']:7d} {100 * s['oov_rate']:5.2f}%")
    if args.stats:
        with open(args.stats, "w") as f:
            json.dump(stats, f, indent=2)


if __name__ == "__main__":
    main()
