"""fairseq-msformer: multi-scale Transformer language models as a fairseq --user-dir plugin.

fairseq itself is not a declared dependency: install the pinned build with
`pip install --no-deps ve-fairseq==0.12.3` and `pip install -r requirements.txt` (see the README and Makefile),
because every fairseq build on PyPI declares torchaudio, which would replace your torch.
"""
from setuptools import find_packages, setup

setup(
    name="fairseq-msformer",
    version="0.1.0",
    description="Multi-scale Transformer language models (top-down, bottom-up, retina) for fairseq",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["fairseq_msformer", "fairseq_msformer.*"]),
    # the fairseq-hydra-train configs (--config-dir <package>/config)
    package_data={"fairseq_msformer": ["config/*.yaml", "config/recipe/*.yaml"]},
    python_requires=">=3.10",
    install_requires=["numpy<2"],
    license="MIT",
)
