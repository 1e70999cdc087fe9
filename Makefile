# Two commands do all set-up on a fresh machine:
#   make demo   installs into .venv and runs `python kaggle_2gpu_train.py` (the synthetic demo without a data set)
#   make test   installs into .venv and runs the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=

.PHONY: demo test lint install clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

demo: install
	$(BIN)/python kaggle_2gpu_train.py $(ARGS)

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest $(ARGS)

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
