# The two commands of the README: `make main` (the whole chain on the default model) and `make test`.
# Both create .venv, install the pinned package and fetch the real assets on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
export NM_DISABLE_ANALYTICS := 1

.PHONY: setup assets main test test-large lint image

$(BIN)/owl-deploy: pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "owl_deploy needs Python 3.11 (DeepSparse 1.8.0)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

setup: $(BIN)/owl-deploy

assets: setup
	$(BIN)/owl-deploy assets fetch

main: assets
	$(BIN)/owl-deploy run pipelines/smollm2-owl-wanda-70.yaml

# pytest's own exit status: collecting nothing (5) is a failure too
test: assets
	$(BIN)/ruff check .
	$(BIN)/pytest -q -ra --durations=15

# the Qwen2.5-Coder-1.5B tests (opt-in asset: 1.1 GB download, ≈9 GB RAM, a few minutes)
test-large: assets
	$(BIN)/owl-deploy assets fetch qwen2.5-coder-1.5b
	OWL_DEPLOY_LARGE=1 $(BIN)/pytest -q -ra -m large

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# the server image without torch, built with buildah from a Debian base made by mmdebstrap, then run: a real
# /v1/completions request over loopback, SIGTERM, and the image's size (docker/README.md; needs root)
image:
	docker/build.sh
