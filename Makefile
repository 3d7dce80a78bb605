# vidistill — the two commands of the README:
#   make demo   set up .venv and run the main job (the whole pipeline, locally)
#   make test   set up .venv and run the test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
# CPU machines: pip must take the CPU build of torch, never the CUDA one. Where the CPU wheel is not
# on a local find-links path, point TORCH_INDEX_URL at PyTorch's CPU wheel index.
TORCH_INDEX_URL ?=
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
ORT_EXTRA := $(if $(HAS_GPU),gpu,cpu)
TORCH_PIP_ARGS := $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL),)
PROFILE ?= demo
PYTEST_ARGS ?=

SETUP_LOG := $(VENV)/setup.log
# `$(Q) command args...`: a set-up step whose output goes to $(SETUP_LOG); when it fails, the command and the
# log's last lines are shown
Q = run() { "$$@" >> $(SETUP_LOG) 2>&1 || { echo "[setup] failed: $$*"; tail -n 40 $(SETUP_LOG); exit 1; }; }; run

.PHONY: setup demo test bench clean lint browser gpu-check gpu-check-wheels rehearsal rehearsal-tools
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@: > $(SETUP_LOG)
	@echo "[setup] installing into $(VENV): the $(if $(HAS_GPU),CUDA,CPU) build of torch==$(TORCH_VERSION), then vidistill (a few minutes; log: $(SETUP_LOG))"
	@$(Q) $(PIP) install -q --upgrade pip
	@$(Q) $(PIP) install -q torch==$(TORCH_VERSION) $(TORCH_PIP_ARGS)
	@$(Q) $(PY) -c "import torch,sys; v=torch.__version__; sys.exit(0 if v.startswith('$(TORCH_VERSION)') else 'torch ' + v + ' installed, expected $(TORCH_VERSION)')"
	@if [ -z "$(HAS_GPU)" ]; then $(Q) $(PY) -c "import torch,sys; sys.exit('a CUDA build of torch was installed on a CPU machine; set TORCH_INDEX_URL to the CPU wheel index') if torch.version.cuda else None"; fi
	@$(Q) $(PIP) install -q -c constraints.txt -e ".[$(ORT_EXTRA),dev]"
	@$(Q) $(PY) -c "import vidistill, torch, av, cv2, onnxruntime, mlflow, kfp"
	@touch $@

# the report's browser test renders the HTML report in headless Chromium (Debian's `chromium`): installed
# quietly when missing and apt-get can run; otherwise that one test skips and says why
browser:
	@command -v chromium >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1 || \
	  { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium || \
	    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium; }; } \
	  >> $(VENV)/setup.log 2>&1 || echo "[setup] chromium could not be installed (see $(SETUP_LOG)); the browser test will skip"

demo: setup
	@$(VENV)/bin/vidistill demo --profile $(PROFILE)

test: setup browser rehearsal-tools
	@$(PY) -m pytest -q $(PYTEST_ARGS)

# the cluster rehearsal (issue 25; scripts/rehearsal.py): the overlay rendered, PostgreSQL + MLflow as their
# manifests run them, every pipeline task as its pod (bubblewrap), the predictor queried with tritonclient,
# a new class rolled out. Needs bubblewrap, kubectl and PostgreSQL's server (Debian packages, installed
# when missing and apt-get can run). tests/test_rehearsal.py runs the same script inside `make test`.
rehearsal-tools:
	@command -v bwrap >/dev/null 2>&1 && ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || \
	  { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends bubblewrap postgresql || \
	    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends bubblewrap postgresql; }; } \
	  >> $(SETUP_LOG) 2>&1 || echo "[setup] bubblewrap/postgresql could not be installed (see $(SETUP_LOG)); the rehearsal will say what is missing"

rehearsal: setup rehearsal-tools
	@$(PY) scripts/rehearsal.py

bench: setup
	$(VENV)/bin/vidistill bench prep

# --- GPU check (issue 19): `make gpu-check [GPU_CHECK_OUT=dir]` sets up as above on a GPU machine, then
# runs scripts/gpu-check.sh (README, "GPU"). Without a GPU: one line, exit 0, nothing installed.
GPU_CHECK_OUT ?= outputs/gpu_check
gpu-check:
	@if [ -z "$(HAS_GPU)" ]; then echo "gpu-check: no NVIDIA GPU on this machine (nvidia-smi -L finds none): nothing to check"; exit 0; fi; \
	$(MAKE) --no-print-directory setup && GPU_CHECK_PYTHON=$(PY) bash scripts/gpu-check.sh $(GPU_CHECK_OUT)

# wheels the check needs on a GPU machine without PyPI (the device tool's: Python 3.12, OpenCV without
# contrib): opencv-contrib for the DualTVL1 reference. 4.12 is the newest that fits its 64 MiB transfer.
GPU_WHEEL_PY ?= 3.12
gpu-check-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version $(GPU_WHEEL_PY) --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl opencv-contrib-python-headless==4.12.0.88

clean:
	rm -rf $(VENV) data runs outputs mlflow.db mlflow-server.log mlartifacts
