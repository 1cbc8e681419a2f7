# Two commands for a new user: `make demo` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test fuzz bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned to the CPU build on local disk: nothing later may pull a CUDA build
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/nvcim demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

# the fuzz tests' long profile (>= 100,000 frames, >= 10,000 program/ONNX/image mutations): docs/reliability.md
fuzz: $(STAMP)
	NVCIM_FUZZ=long $(BIN)/python -m pytest -q -s -p no:cacheprovider tests/test_fuzz_frames.py \
		tests/test_fuzz_program.py tests/test_fuzz_onnx.py tests/test_fuzz_image.py

bench: $(STAMP)
	for b in bench/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) out .pytest_cache
