# Two commands do everything on a fresh machine (Python 3.11 or 3.12, package registries reachable):
#   make demo   - set up .venv, train a small bottom-up model on the shipped corpus, score it, sample from it
#   make test   - set up .venv and run the whole test suite
#   make reproduce - transformer_lm against deeper multi-scale models on the shipped corpus (docs/main)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
FAIRSEQ_BUILD ?= ve-fairseq==0.12.3

.PHONY: install peers demo test reproduce clean

install: $(VENV)/.installed

# --system-site-packages: a torch that is already installed (a cluster's CUDA build) is used as it is;
# torch==2.13.0 is installed only when none can be imported.
$(VENV)/.installed: requirements.txt setup.py
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps $(FAIRSEQ_BUILD)
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -c "import fairseq, torch, numpy; print('fairseq', fairseq.__version__, '| torch', torch.__version__, '| numpy', numpy.__version__)"
	touch $@

# the outside implementations run beside ours (scripts/peers); the venv's torch and numpy are pinned so none moves
peers: $(VENV)/.peers-installed

$(VENV)/.peers-installed: $(VENV)/.installed requirements-peers.txt
	$(PY) -c "import torch, numpy; print(f'torch=={torch.__version__}\nnumpy=={numpy.__version__}')" > $(VENV)/peers-constraints.txt
	$(PY) -m pip install -q -r requirements-peers.txt -c $(VENV)/peers-constraints.txt
	touch $@

demo: install
	PATH="$(abspath $(VENV))/bin:$$PATH" bash scripts/experiments/demo.sh

# one pytest worker per core (pytest-xdist); a file's tests stay on one worker, so module fixtures are built once
test: install peers
	$(PY) -m pytest tests -q -n auto --dist loadfile

# The edit-test loop (under 2 minutes on 2 cores): the test files that build models in this process and start no
# process (no fairseq CLI, no script): leaks, influence, incremental decoding, retina, precision, options.
# The planted bugs (scripts/checks/planted_bugs.py) run these same files.
FAST_TESTS := tests/test_causality.py tests/test_influence.py tests/test_incremental.py tests/test_retina.py \
              tests/test_precision.py tests/test_options.py
.PHONY: test-fast
test-fast: install
	$(PY) -m pytest $(FAST_TESTS) -q

# the paper's trade-off in miniature (scripts/experiments/reproduce.py; resumable, about an hour on a 2-core CPU)
reproduce: install
	$(PY) scripts/experiments/reproduce.py --suite main

clean:
	rm -rf $(VENV) checkpoints/demo
