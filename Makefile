# align-detr: every set-up step a fresh machine needs lives here.
#   make setup       venv + torch + detectron2 + deps + our compiled extension (idempotent)
#   make test        setup, then the pytest suite (CPU, offline)
#   make bench       setup, then every benchmark; writes benchmarks/RESULTS.md
#   make cuda-check  compile the CUDA sources into a scratch directory (no GPU needed)

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.align-detr-deps
CUDA_HOME ?= /usr/local/cuda
CUDA_CHECK_ARCH ?= 8.0;9.0
CUDA_CHECK_DIR ?= build-cuda-check

# Runtime dependencies of detectron2 (installed without its own resolver, see DESIGN.md) and ours.
D2_DEPS := Pillow matplotlib "pycocotools>=2.0.2" "termcolor>=1.1" "yacs>=0.1.8" tabulate \
	cloudpickle "tqdm>4.29.0" tensorboard "omegaconf>=2.1,<2.4" "hydra-core>=1.1" black \
	packaging fvcore iopath
OUR_DEPS := "setuptools<81" ninja wheel scipy opencv-python-headless pytest

.PHONY: setup deps ext test bench cuda-check clean

setup: ext

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q -U pip  # pip 23 cannot do editable installs with setuptools>=80

# Heavy, rarely-changing dependencies: redone only when this Makefile changes.
$(STAMP): Makefile | $(PY)
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1 $(OUR_DEPS) $(D2_DEPS)
	$(PY) tools/install_detectron2.py
	touch $@

deps: $(STAMP)

# The extension: pip's editable install compiles align_detr._C; ninja makes re-runs cheap.
ext: $(STAMP)
	@if $(PY) tools/ext_is_fresh.py; then echo "align_detr._C is up to date"; else \
		$(PIP) install -q --no-build-isolation --no-deps -e . ; fi

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) benchmarks/run_all.py

cuda-check: $(STAMP)
	rm -rf $(CUDA_CHECK_DIR)
	FORCE_CUDA=1 CUDA_HOME=$(CUDA_HOME) TORCH_CUDA_ARCH_LIST="$(CUDA_CHECK_ARCH)" \
		$(PY) setup.py build_ext --build-temp $(CUDA_CHECK_DIR)/temp --build-lib $(CUDA_CHECK_DIR)/lib
	@ls $(CUDA_CHECK_DIR)/lib/align_detr/_C*.so >/dev/null && echo "cuda-check: CUDA sources compiled"

clean:
	rm -rf build $(CUDA_CHECK_DIR) *.egg-info align_detr/_C*.so
