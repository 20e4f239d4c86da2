# Everything runs from the repo-local virtual environment .venv/ (created on first use).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: app demo lab test setup clean

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

setup: $(VENV)/.installed

# The lab's main job: the app on the shipped nano model, http://127.0.0.1:7860 (Ctrl-C stops it).
app: setup
	$(PY) app.py

# The notebook chapters in JupyterLab, on the venv's own Python kernel: start with 01_quickstart.ipynb.
# (As root, e.g. in a container, JupyterLab wants --allow-root.)
lab: setup
	$(VENV)/bin/jupyter lab notebooks/ $(if $(filter 0,$(shell id -u)),--allow-root)

# The command-line demo: the nano model answers questions about a bundled picture and a short clip.
demo: setup
	$(PY) -m qwen2vl_min --image examples/scene.png --prompt "What color is the circle?" --max-new-tokens 16
	$(PY) -m qwen2vl_min --video examples/clip.mp4 --prompt "What color is the moving shape?" --max-new-tokens 16

# The whole test suite. pytest's exit code 5 (no tests collected) is a failure, never a silent pass.
test: setup
	@$(PY) -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "ERROR: pytest collected no tests" >&2; exit 1; fi; exit $$rc

clean:
	rm -rf $(VENV) .cache
