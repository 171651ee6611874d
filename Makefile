# Every target creates or reuses .venv and installs the project into it first.
# CPU machines get the local CPU wheel of torch; a GPU user installs their platform's torch into .venv
# before `make` and it is kept (see README).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_CPU_VERSION ?= 2.13.0
INSTALLED := $(VENV)/.installed
STUDY ?= studies/isoflop.yaml

.PHONY: install run test test-fast golden bench clean

install: $(INSTALLED)

$(INSTALLED): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==$(TORCH_CPU_VERSION)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m cluster.prebuild || echo "prebuild failed: trials will build what they need on first use"
	touch $(INSTALLED)

run: $(INSTALLED)
	$(VENV)/bin/peer-sweeps run $(STUDY) --out runs/$$(basename $(STUDY) .yaml)
	$(VENV)/bin/peer-sweeps report runs/$$(basename $(STUDY) .yaml)

test: $(INSTALLED)
	$(PY) -m pytest -q -ra --durations=15

test-fast: $(INSTALLED)
	$(PY) -m pytest -q -m "not slow"

# Regenerate tests/golden/ after a deliberate change of the computation (the tests only compare).
golden: $(INSTALLED)
	$(PY) tests/update_golden.py

bench: $(INSTALLED)
	$(PY) benchmarks/peer_layer.py

clean:
	rm -rf $(VENV) build *.egg-info
