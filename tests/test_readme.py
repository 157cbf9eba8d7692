"""Every example in README.md runs, its results table is docs/main's, and every relative link in README.md and
docs/*.md resolves.

The examples are read from README.md itself: each fenced block follows a `<!-- readme-test: NAME -->` marker, and
a block without one fails `test_every_readme_block_is_tested`. So an edit that breaks a README command fails here.
The paper-scale commands cannot run on a CPU in seconds: they run on the shipped corpus with the substitutions
written out below (PAPER_TO_TINY and friends), each of which must still find its option in the README's command,
and every other option runs exactly as written.
"""
import ast
import json
import math
import os
import re
import shlex
import subprocess

import pytest
import torch

from conftest import REPO, fairseq_cli

README = os.path.join(REPO, "README.md")
DOCS = os.path.join(REPO, "docs")
MARKED_BLOCK = re.compile(r"<!-- readme-test: (\w+) -->\n```(\w+)\n(.*?)\n```\n", re.S)
TESTED = {"setup", "train", "evaluate", "generate", "python", "reproduce"}

# The README's fairseq-train command is fairseq's transformer_lm_wiki103 recipe (8 GPUs, days). Here: its own arch
# (msformer_lm_bottom_up_wiki103: residual upsampling, linear pooling, adaptive input and softmax, tied) at tiny
# size for one update of 3 x 256 tokens on the shipped corpus, on the CPU (--fp16 needs CUDA), validating one batch.
PAPER_TO_TINY = {"--tokens-per-sample": "128", "--max-tokens": "256", "--max-update": "1"}
CUDA_ONLY = ["--fp16"]
TINY_SIZE = [
    "--cpu", "--decoder-embed-dim", "32", "--decoder-ffn-embed-dim", "64", "--decoder-attention-heads", "2",
    "--scale-layers", "1,1", "--token-layers", "1",
    # the preset's cutoffs 20000,60000 are for WikiText-103's 267k types; the shipped corpus has 13k
    "--adaptive-input-cutoff", "2000,6000", "--adaptive-softmax-cutoff", "2000,6000",
    "--max-valid-steps", "1", "--num-workers", "0",
]
EVAL_SHARD = ["--cpu", "--num-shards", "200", "--shard-id", "0"]  # one 200th of the test split (~10 samples)
GENERATE_TINY = {"--max-len-b": "10"}  # 10 tokens, prompt included, instead of 100


def readme_blocks():
    """{name: (language, text)} of README.md's marked fenced blocks."""
    text = open(README, encoding="utf-8").read()
    return {m.group(1): (m.group(2), m.group(3)) for m in MARKED_BLOCK.finditer(text)}


def shell_commands(block):
    """A bash block's commands as word lists: continuation lines joined, comments dropped."""
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if words:
            commands.append(words)
    return commands


def option(argv, name):
    assert name in argv, f"README command has no {name}: {' '.join(argv)}"
    return argv[argv.index(name) + 1]


def substituted(argv, paths, replace=None, drop=(), extra=()):
    """argv with README paths mapped to the test's (by prefix), option values replaced, flags dropped and options
    appended; each replaced or dropped option must be in the README's command, so a stale substitution fails."""
    argv = list(argv)
    for i, word in enumerate(argv):
        for readme_path, path in paths.items():
            if word == readme_path or word.startswith(readme_path + "/"):
                argv[i] = str(path) + word[len(readme_path):]
    for name, value in (replace or {}).items():
        option(argv, name)
        argv[argv.index(name) + 1] = value
    for flag in drop:
        assert flag in argv, f"README command has no {flag}: {' '.join(argv)}"
        argv.remove(flag)
    return argv + list(extra)


def cli_output(argv, stdin=None):
    """Runs a README command (argv[0]: a fairseq console script); its stdout and stderr (eval-lm logs to stderr)."""
    proc = fairseq_cli(*argv, stdin=stdin)
    return proc.stdout + proc.stderr


def block(name, language="bash"):
    blocks = readme_blocks()
    assert name in blocks, f"README.md has no block marked <!-- readme-test: {name} -->"
    assert blocks[name][0] == language, f"README block {name} is {blocks[name][0]}, expected {language}"
    return blocks[name][1]


# ---------------------------------------------------------------- the paper-scale commands, tiny


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
    """The README's train block, run: returns (README data path, README save dir, test save dir, output)."""
    prepare, train = shell_commands(block("train"))
    # prepare_wikitext103.sh downloads 180 MB: tests/test_data_scripts.py runs it on a fake WikiText-103 tree.
    # Here: the README names the script as test_data_scripts runs it, and it parses.
    assert prepare == ["bash", "scripts/data/prepare_wikitext103.sh"], prepare
    subprocess.run(["bash", "-n", os.path.join(REPO, *prepare[1].split("/"))], check=True)

    assert train[0] == "fairseq-train"
    readme_data, readme_save_dir = train[1], option(train, "--save-dir")
    save_dir = tmp_path_factory.mktemp("bottom_up_wt103")
    argv = substituted(train, {readme_data: corpus, readme_save_dir: save_dir}, PAPER_TO_TINY, CUDA_ONLY,
                       TINY_SIZE)
    out = cli_output(argv)
    return readme_data, readme_save_dir, save_dir, out


def test_train_command_trains(trained):
    _, _, save_dir, out = trained
    assert "msformer bottom_up (hourglass rule, linear pooling)" in out  # the README's --arch, built
    losses = [float(x) for x in re.findall(r"\| train \|.*? loss ([\d.]+)", out)]
    assert losses and all(math.isfinite(x) for x in losses)
    assert {"checkpoint_best.pt", "checkpoint_last.pt"} <= set(os.listdir(save_dir))


def test_evaluate_command_scores_the_test_split(trained, corpus):
    readme_data, readme_save_dir, save_dir, _ = trained
    (evaluate,) = shell_commands(block("evaluate"))
    assert evaluate[0] == "fairseq-eval-lm" and evaluate[1] == readme_data
    assert option(evaluate, "--path").startswith(readme_save_dir + "/"), "evaluates a checkpoint train did not write"
    assert option(evaluate, "--context-window") == "400"
    # trained on 128-token samples, scored on 512: sinusoidal positions grow, as the README says
    out = cli_output(substituted(evaluate, {readme_data: corpus, readme_save_dir: save_dir}, extra=EVAL_SHARD))
    evaluated = re.search(r"Evaluated ([\d,]+) tokens", out)
    assert evaluated and int(evaluated.group(1).replace(",", "")) > 0, out[-2000:]
    ppl = float(re.search(r"Perplexity: ([\d.]+)", out).group(1))
    assert 1 < ppl < float("inf")


def test_generate_command_continues_the_prompt(trained, corpus):
    readme_data, readme_save_dir, save_dir, _ = trained
    (words,) = shell_commands(block("generate"))
    pipe = words.index("|")
    assert words[0] == "echo" and words[pipe + 1] == "fairseq-interactive"
    prompt, interactive = " ".join(words[1:pipe]), words[pipe + 1:]
    assert interactive[1] == readme_data
    assert option(interactive, "--path").startswith(readme_save_dir + "/")
    argv = substituted(interactive, {readme_data: corpus, readme_save_dir: save_dir}, GENERATE_TINY,
                       extra=["--cpu", "--seed", "1"])
    out = cli_output(argv, stdin=prompt + "\n")
    hypothesis = re.search(r"^H-0\t\S+\t(.*)$", out, re.M).group(1).split()
    detokenized = re.search(r"^D-0\t\S+\t(.*)$", out, re.M).group(1)
    assert hypothesis[:len(prompt.split())] == prompt.split()  # the prompt, in the dictionary (no <unk>)
    assert len(prompt.split()) < len(hypothesis) <= 10  # sampled a continuation (an early end of sentence allowed)
    assert detokenized.startswith(prompt)


# ---------------------------------------------------------------- the Python interface


def run_python_block(source):
    """Runs the block statement by statement as a REPL would; returns its namespace and the values of its bare
    expressions (what the README shows as comments)."""
    namespace, values = {}, []
    for node in ast.parse(source).body:
        if isinstance(node, ast.Expr):
            values.append(eval(compile(ast.Expression(node.value), README, "eval"), namespace))
        else:
            exec(compile(ast.Module([node], type_ignores=[]), README, "exec"), namespace)
    return namespace, values


def test_python_example_loads_samples_and_scores(trained, monkeypatch):
    """The README's from_pretrained example, as written, on the checkpoint the train command left (in place of
    make demo's, the same kind of checkpoint on the same corpus), run from the repository root."""
    _, _, save_dir, _ = trained
    source = block("python", "python")
    assert "'checkpoints/demo'" in source
    monkeypatch.chdir(REPO)
    namespace, values = run_python_block(source.replace("'checkpoints/demo'", repr(str(save_dir))))
    lm = namespace["lm"]
    assert type(lm).__name__ == "GeneratorHubInterface" and not lm.training
    sample, perplexity = [v for v in values if v is not lm]
    assert isinstance(sample, str) and sample.startswith("The built-in function ")
    assert perplexity.dim() == 0 and 1 < perplexity.item() < float("inf")


def test_python_example_needs_the_corpus_tokenizer(trained, monkeypatch):
    """The README's claim: without tokenizer='moses' "built-in" is <unk>; with fairseq's default escaping
    "doesn't" is; with the corpus's own settings (the README's) neither."""
    from fairseq_msformer.models.msformer_lm import MsformerLanguageModel

    _, _, save_dir, _ = trained
    monkeypatch.chdir(REPO)
    assert "tokenizer='moses', moses_no_escape=True" in block("python", "python")

    def tokens(sentence, **tokenizer):
        """The dictionary entries the hub interface turns `sentence` into (<unk> for unknown words)."""
        lm = MsformerLanguageModel.from_pretrained(str(save_dir), "checkpoint_last.pt",
                                                   data_name_or_path="data-bin/pydoc", **tokenizer)
        return lm.src_dict.string(lm.encode(sentence)).split()

    assert tokens("The built-in function doesn't") == ["The", "<unk>", "function", "<unk>"]
    assert tokens("The built-in function doesn't", tokenizer="moses") == \
        ["The", "built", "@-@", "in", "function", "doesn", "<unk>"]  # doesn &apos;t
    readme_settings = dict(tokenizer="moses", moses_no_escape=True)
    assert tokens("The built-in function doesn't", **readme_settings) == \
        ["The", "built", "@-@", "in", "function", "doesn", "'t"]


# ---------------------------------------------------------------- setup and reproduction commands


def make_dry_run(target):
    """`make -n TARGET`: the recipe make would run (nothing runs; the target must exist)."""
    proc = subprocess.run(["make", "-n", target], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, f"make -n {target}: {proc.stderr}"
    return proc.stdout


def test_setup_commands_are_make_targets():
    """`make test` is this suite and `make demo` takes minutes (its pipeline, train -> eval-lm -> interactive,
    is what the tests above run): here their recipes, which must exist and run the demo script / the suite."""
    commands = shell_commands(block("setup"))
    assert commands == [["make", "demo"], ["make", "test"]]
    demo = make_dry_run("demo")
    assert "bash scripts/experiments/demo.sh" in demo and os.path.exists(os.path.join(REPO, "scripts/experiments/demo.sh"))
    assert "-m pytest tests" in make_dry_run("test")
    assert "`make install`" in open(README, encoding="utf-8").read()
    make_dry_run("install")  # the README names it too


def test_reproduce_command_is_the_main_suite():
    """`make reproduce` is what the README says it is; the pipeline itself runs in tests/test_scripts.py
    (reproduce.py --quick: train, eval-lm, curves, resume), the full suite takes an hour."""
    import reproduce

    (command,) = shell_commands(block("reproduce"))
    assert command == ["make", "reproduce"]
    comment = block("reproduce").split("#", 1)[1]
    claimed = re.search(r"= python (scripts/\S+(?: --[\w-]+ [\w.]+)*)", comment).group(1).split()
    assert " ".join(claimed) in make_dry_run("reproduce")
    args = reproduce.parse_args(claimed[1:])
    assert args.suite == "main" and os.path.samefile(args.out, os.path.join(DOCS, "main"))  # whose figures it quotes


README_ROWS = {  # the README's results table -> docs/main/results.json
    "`transformer_lm`, 4 layers": "transformer_lm",
    "bottom-up, 12 layers": "bottom_up",
    "top-down, 12 layers": "top_down",
    "retina, 4 layers": "retina",
    "bottom-up, blocks of 2 and 16 tokens": "bottom_up_2_8",
}


def test_results_table_is_docs_main():
    """The README's headline figures are docs/main/results.json's (reproduce.py rewrites that file: a rerun whose
    figures differ fails here until the README follows)."""
    results = json.load(open(os.path.join(DOCS, "main", "results.json")))
    baseline = results["transformer_lm"]
    text = open(README, encoding="utf-8").read()
    rows = {cells[0]: cells[1:] for cells in
            ([c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| "))
            if cells[0] in README_ROWS}
    assert set(rows) == set(README_ROWS), f"README results rows: {sorted(rows)}"
    for label, (valid, test, memory, speed) in rows.items():
        r = results[README_ROWS[label]]
        assert float(valid) == r["valid_ppl"] and float(test) == r["test_ppl"], label
        assert memory == f"{r['activation_mib'] / baseline['activation_mib']:.2f}x".replace("1.00x", "1x"), label
        assert speed == f"{r['train_tokens_per_s'] / baseline['train_tokens_per_s']:.2f}x".replace("1.00x", "1x"), label


PEERS_START, PEERS_END = "<!-- by family: docs/peers/results.md -->", "<!-- end by family -->"


def test_family_tables_are_docs_peers():
    """The README's tables of ours against the peers, one per family, are the 'By family' section that
    reproduce.py --suite peers writes to docs/peers/results.md (from docs/peers/results.json), verbatim."""
    text = open(README, encoding="utf-8").read()
    assert text.count(PEERS_START) == 1 and text.count(PEERS_END) == 1
    in_readme = text.split(PEERS_START)[1].split(PEERS_END)[0]
    generated = open(os.path.join(DOCS, "peers", "results.md"), encoding="utf-8").read()
    assert "### By family" in generated
    assert in_readme.strip() == generated.split("### By family")[1].strip()


# ---------------------------------------------------------------- every block tested, every link resolves


def test_every_readme_block_is_tested():
    text = open(README, encoding="utf-8").read()
    fences = [line for line in text.splitlines() if line.startswith("```")]
    assert len(fences) % 2 == 0
    blocks = readme_blocks()
    assert len(blocks) == len(fences) // 2, "a fenced block in README.md has no <!-- readme-test: NAME --> marker"
    assert set(blocks) == TESTED, f"marked blocks {sorted(blocks)}, tested {sorted(TESTED)}"


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def markdown_pages():
    return [README] + sorted(os.path.join(DOCS, f) for f in os.listdir(DOCS) if f.endswith(".md"))


def github_anchors(path):
    """The anchors GitHub gives a page's headings: lower case, punctuation other than - and _ dropped, spaces -."""
    text = re.sub(r"```.*?```", "", open(path, encoding="utf-8").read(), flags=re.S)
    headings = re.findall(r"^#+ (.*)$", text, re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_relative_links_resolve():
    broken = []
    for page in markdown_pages():
        text = re.sub(r"```.*?```", "", open(page, encoding="utf-8").read(), flags=re.S)
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto: not checked offline
            file_part, _, anchor = target.partition("#")
            resolved = os.path.normpath(os.path.join(os.path.dirname(page), file_part)) if file_part else page
            where = f"{os.path.relpath(page, REPO)}: ({target})"
            if not os.path.exists(resolved):
                broken.append(f"{where} -> no such file")
            elif anchor and resolved.endswith(".md") and anchor not in github_anchors(resolved):
                broken.append(f"{where} -> no heading #{anchor}")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_link_check_sees_links():
    """The link check is not vacuous: it finds the README's docs map and the plot."""
    targets = LINK.findall(open(README, encoding="utf-8").read())
    assert "docs/architectures.md" in targets and "docs/main/perplexity_vs_memory.png" in targets
    assert "docs/training.md#installation" in targets  # an anchor, checked against the page's headings
    assert "installation" in github_anchors(os.path.join(DOCS, "training.md"))
    assert "paper-scale-presets-against-a-14-layer-transformer_lm-memory-and-speed" in \
        github_anchors(os.path.join(DOCS, "results.md"))  # backticks and the colon dropped, as GitHub does
