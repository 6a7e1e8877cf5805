# The two set-up commands of the README. Each creates/refreshes .venv from the pinned requirements, then acts.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: setup data train finetune-demo test test-fast test-timm bench bench-accelerator device-wheels notebook clean
FASHION_MNIST := /usr/share/datasets/fashion-mnist

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

# The CPU kernels of BatchWhitening's group products (bw_jax/kernels), built now rather than by the first
# process that needs them (cached per source, compiler and CPU; a no-op afterwards).
setup: $(STAMP)
	$(BIN)/python -m bw_jax.nn.kernels

# Fashion-MNIST, the offline default dataset, from Debian's package when apt-get can install it.
data:
	@if [ -f $(FASHION_MNIST)/train-images-idx3-ubyte.gz ]; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	  (apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null) || \
	  echo "Could not install dataset-fashion-mnist; tests on the real data will be skipped."; \
	else echo "Fashion-MNIST missing: run 'sudo apt-get install dataset-fashion-mnist' (or set config.dataset.data_dir)."; fi

# The main job: configs/default.py (BW EfficientNet on Fashion-MNIST). Rerunning resumes from the latest
# checkpoint in $(WORKDIR); `make train WORKDIR=runs/other` starts afresh elsewhere.
WORKDIR ?= runs/default
train: setup data
	$(BIN)/python -m bw_jax.main --config=configs/default.py --workdir=$(WORKDIR)

# From a pretrained network (docs/design.md §3.5): the BN run, its conversion to the main job's BW placements
# before and after calibration, one epoch of fine-tuning, the main job from scratch; the table in
# $(DEMO_WORKDIR)/table.md. ~25 minutes on a quiet 2-core CPU; rerunning resumes the runs.
DEMO_WORKDIR ?= runs/finetune_demo
finetune-demo: setup data
	$(BIN)/python -m bw_jax.finetune_demo --workdir=$(DEMO_WORKDIR)

test: setup data
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

# The edit-test loop: everything but the tests marked slow (≤ 3 minutes on 2 cores).
test-fast: setup data
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not slow"

# timm's tf_efficientnet_b* against timm's own models (tests/test_timm_import.py), in an environment of its own
# with PyTorch and timm (requirements-timm.txt, 8 GB installed); `make test` skips that module.
TIMM_VENV := .venv-timm
$(TIMM_VENV)/.installed: requirements-timm.txt requirements-dev.txt requirements.txt pyproject.toml
	test -x $(TIMM_VENV)/bin/python || $(PYTHON) -m venv $(TIMM_VENV)
	$(TIMM_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-timm.txt
	$(TIMM_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

test-timm: $(TIMM_VENV)/.installed
	$(TIMM_VENV)/bin/python -m pytest -q tests/test_timm_import.py

bench: setup
	$(BIN)/python benchmarks/bw_layer.py

# On a GPU or TPU machine: train step, BW layer, input pipeline and a float64 check in ≤ 8 minutes (one H100).
bench-accelerator: setup
	$(BIN)/python benchmarks/accelerator.py --out runs/accelerator

# For benchmarks/device_run.sh on a machine without a registry: the pure-Python wheels its image lacks (it has
# JAX, Flax, Optax, Orbax, absl-py, PyYAML), at requirements.txt's pins, for its Python 3.12 on x86-64.
DEVICE_WHEELS ?= device_wheels
DEVICE_WHEEL_PACKAGES := ml-collections
device-wheels:
	$(PYTHON) -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
	  --python-version 3.12 --implementation cp --platform manylinux2014_x86_64 --dest $(DEVICE_WHEELS) \
	  $(foreach package,$(DEVICE_WHEEL_PACKAGES),$$(grep -i '^$(package)==' requirements.txt))

# The Colab notebook, run here and stored with its outputs (figures visible where the repository is browsed).
notebook: setup data
	TF_CPP_MIN_LOG_LEVEL=2 $(BIN)/python colab/execute.py

clean:
	rm -rf $(VENV) $(TIMM_VENV) .pytest_cache
