"""fairseq-hydra-train configs (fairseq_msformer/config/): each equals its --arch preset, and the tiny ones train.

Under hydra an --arch preset only sets the family (fairseq's add_defaults fills every other option from the
dataclass before the preset runs), so each config spells out its sizes; the first tests check that they equal the
preset's, so the two cannot drift apart. The last one trains each tiny config for a few updates on the shipped
corpus, run from the repository root as a user runs it.
"""
import argparse
import os
import re
from dataclasses import MISSING, fields

import pytest
from fairseq.data import Dictionary
from fairseq.dataclass.initialize import add_defaults, hydra_init
from fairseq.models import ARCH_CONFIG_REGISTRY
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import CORPUS, REPO, USER_DIR, WIKITEXT103_TYPES, fairseq_cli
from fairseq_msformer.models.config import FAMILIES, MsformerLMConfig, check_config

CONFIG_DIR = os.path.join(USER_DIR, "config")
CONFIGS = sorted(name[: -len(".yaml")] for name in os.listdir(CONFIG_DIR) if name.endswith(".yaml"))
TINY = [name for name in CONFIGS if name.endswith("_tiny")]
FROM_TASK = {"max_target_positions", "tokens_per_sample"}  # interpolated from the task, not model options

# fairseq stores its schema under the config's name, which hydra >= 1.1 warns about at every compose
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def composed(name):
    """The config fairseq-hydra-train builds from fairseq_msformer/config/<name>.yaml, model options filled in."""
    hydra_init(name)
    # version_base 1.1: what fairseq-hydra-train's @hydra.main (no version_base) assumes; None would also set
    # hydra's process-wide base to 1.3, under which fairseq's own hydra.experimental.initialize (argparse ->
    # omegaconf, convert_namespace_to_omegaconf) raises in every later test of the session
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.1"):
        cfg = compose(config_name=name)
    add_defaults(cfg)  # merges the model options with MsformerLMConfig, as fairseq-train does
    return cfg


def unused_by(family):
    """Options a family's model never reads: the other families' ('top-down only: ...' in their help), and
    retina's layer counts per coarse scale (its layers are all token-level)."""
    others = [f.replace("_", "-") + " only:" for f in FAMILIES if f != family]
    unused = {f.name for f in fields(MsformerLMConfig) if f.metadata.get("help", "").startswith(tuple(others))}
    return unused | ({"scale_layers"} if family == "retina" else set())


def preset(arch):
    """({option: value} that `--arch <arch>` gives, the options the preset sets itself): the preset's values over
    the dataclass defaults, for the options its family reads."""
    args = argparse.Namespace()
    ARCH_CONFIG_REGISTRY[arch](args)
    skip = FROM_TASK | unused_by(args.family) | {"_name"}
    values = {f.name: getattr(args, f.name, f.default) for f in fields(MsformerLMConfig) if f.name not in skip}
    assert MISSING not in values.values()
    return values, set(vars(args)) - skip


def test_every_family_has_a_tiny_and_a_large_config():
    for family in ("bottom_up", "top_down", "retina"):
        assert f"{family}_tiny" in CONFIGS and f"{family}_wiki103" in CONFIGS
    assert {"bottom_up_paper", "top_down_paper"} <= set(CONFIGS)
    assert all("msformer_lm_" + name in ARCH_CONFIG_REGISTRY for name in CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_equals_its_preset(name):
    cfg = composed(name)
    model = OmegaConf.to_container(cfg.model, resolve=True, enum_to_str=True)
    expected, set_by_preset = preset("msformer_lm_" + name)
    assert model["_name"] == "msformer_lm"
    assert {k: model[k] for k in expected} == expected

    # complete: everything the preset sets is written in the file, not left to the dataclass defaults
    written = OmegaConf.load(os.path.join(CONFIG_DIR, name + ".yaml")).model
    assert set_by_preset <= set(written), f"{name}.yaml leaves {sorted(set_by_preset - set(written))} implicit"

    # and the model/task combination passes the checks fairseq-train runs before the first update
    vocab = len(Dictionary.load(os.path.join(CORPUS, "dict.txt"))) if name in TINY else WIKITEXT103_TYPES
    check_config(cfg.model, vocab, cfg.task.tokens_per_sample)


@pytest.mark.parametrize("name", TINY)
def test_tiny_config_trains_on_the_shipped_corpus(name, tmp_path):
    # From the repository root, as a user runs it: the config's own data (data-bin/pydoc) and user_dir.
    save_dir = tmp_path / "checkpoints"
    proc = fairseq_cli(
        "fairseq-hydra-train", "--config-dir", CONFIG_DIR, "--config-name", name, "common.cpu=true",
        f"checkpoint.save_dir={save_dir}", "optimization.max_update=2", "dataset.max_tokens=512",
        "dataset.max_valid_steps=1",
        "common.log_interval=1", cwd=REPO,
    )
    log = proc.stdout + proc.stderr
    family = name[: -len("_tiny")]
    assert f"msformer {family} (" in log                     # the model the config describes was built
    assert re.search(r"valid on 'valid' subset \| loss [\d.]+ \| ppl [\d.]+ .*num_updates 2", log), log[-3000:]
    assert (save_dir / "checkpoint_last.pt").is_file()
    assert (save_dir / ".hydra" / "config.yaml").is_file()   # hydra's snapshot lands next to the checkpoints
