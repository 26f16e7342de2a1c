# Two commands do everything on a fresh machine: `make demo` and `make test` (`make test-fast` skips the slow tests).
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
OUT     ?= out/demo

.PHONY: demo test test-fast setup clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/duetgen demo --out $(OUT)

# -X faulthandler: a crash in native code, also at interpreter exit, prints every thread's Python stack (session
# 14: one fresh-clone run segfaulted at exit after all tests passed, with nothing to go on)
test: $(STAMP)
	$(BIN)/python -X faulthandler -m pytest

# the same without the tests marked slow (killed subprocesses, torchrun ranks, Ray, Chromium): while working
test-fast: $(STAMP)
	$(BIN)/python -X faulthandler -m pytest -m "not slow"

clean:
	rm -rf $(VENV) out
