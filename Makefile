# Everything runs from the repo-local virtual environment .venv/ (created on first use).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: demo test setup clean

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

setup: $(VENV)/.installed

# The lab's main job. Until the lab's own nano model lands, the command-line demo runs on a tiny
# random-weight checkpoint written by tests/make_checkpoint.py (so its answer is gibberish by design).
demo: setup
	$(PY) tests/make_checkpoint.py .cache/tiny-qwen2vl
	@echo "Asking a tiny RANDOM-WEIGHT Qwen2-VL about an image: the pipeline runs end to end, the words are gibberish."
	$(PY) -m qwen2vl_min --model .cache/tiny-qwen2vl --image .cache/tiny-qwen2vl/example.png \
		--prompt "Describe the image." --max-new-tokens 24

# The whole test suite. pytest's exit code 5 (no tests collected) is a failure, never a silent pass.
test: setup
	@$(PY) -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "ERROR: pytest collected no tests" >&2; exit 1; fi; exit $$rc

clean:
	rm -rf $(VENV) .cache
