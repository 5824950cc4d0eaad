# The documented interface: `make help` lists every target. Set-up is implicit: each target that runs
# code depends on `setup`, which builds .venv once and again only when pyproject.toml changes.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
RECIPE ?= tiny_lora_dpo
ARGS ?=
PYTEST_ARGS ?=
WORKERS ?= auto
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# VERBOSE=1: every warning and the trainer's raw log dicts, as the libraries print them
ifdef VERBOSE
export DPO_RECIPES_VERBOSE := $(VERBOSE)
endif

.DEFAULT_GOAL := help
HARDWARE ?=
NPROC ?=
NNODES ?= 1
NODE_RANK ?= 0
MAIN_ADDR ?= 127.0.0.1
MAIN_PORT ?= 29500
RUN ?=
RESUME ?=
ROUNDS ?=
SWEEP ?=
SWEEP_DIR ?=
LAUNCHER ?=
DIR ?=
ONLY ?=
N ?= 16
# ARGS as typed: make would expand `${oc.env:HOME}` (a Hydra interpolation) to nothing, and the shell
# would then try it; each `$` reaches the shell escaped, so Hydra gets the override intact.
ARGV = $(subst $$,\$$,$(value ARGS))
# One launch time for every process of a launch, so all ranks and jobs agree on the run dir.
export DPO_RUN_STAMP ?= $(shell date +%Y-%m-%d_%H-%M-%S)
FORMAT ?= alpaca
IN ?=
OUT ?=
.PHONY: help setup train sweep sweep-report iterate samples eval export validate prep test test-fast test-slow test-e2e bench bench-gpu lint format clean

help: ## List every target
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "} {printf "  %-13s %s\n", $$1, $$2}'

setup: $(STAMP) ## Create .venv and install: torch first (TORCH_SPEC), then the project with dev and sweep extras

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[dev,sweep,deepspeed]"
	@touch $@

# NPROC processes per node through accelerate, with the accelerate config the composed hardware option names.
LAUNCH = $(if $(NPROC),$(PY) -m dpo_recipes.launch --nproc $(NPROC) --nnodes $(NNODES) --node-rank $(NODE_RANK) \
	--main-addr $(MAIN_ADDR) --main-port $(MAIN_PORT),$(PY) -m dpo_recipes.train)
TRAIN_ARGS = recipes=$(RECIPE) $(if $(HARDWARE),hardware=$(HARDWARE)) $(if $(RUN),'run.name=$(RUN)') \
	$(if $(RESUME),run.resume=$(RESUME))

train: setup ## Train RECIPE; HARDWARE=zero3 NPROC=8 (NNODES, NODE_RANK, MAIN_ADDR, MAIN_PORT) via accelerate; RUN=name, RESUME=auto|never|<checkpoint>; VERBOSE=1 prints every warning and log dict; ARGS
	$(LAUNCH) $(TRAIN_ARGS) $(ARGV)

sweep: setup ## Multirun: SWEEP=beta_lr (a conf/sweep preset) and/or grids in ARGS="train.beta=0.05,0.1"; LAUNCHER=joblib|submitit_local|slurm; SWEEP_DIR=<an earlier sweep> resumes it
	$(PY) -m dpo_recipes.train -m $(TRAIN_ARGS) $(if $(SWEEP),+sweep=$(SWEEP)) $(if $(LAUNCHER),hydra/launcher=$(LAUNCHER)) \
		$(if $(SWEEP_DIR),'hydra.sweep.dir=$(SWEEP_DIR)') $(ARGV)

sweep-report: setup ## Rebuild the report of the sweep in DIR (e.g. after its jobs ran on a cluster), or compare the rounds dirs in DIR=outputs/<recipe>; ARGS="--metric eval_loss --lower"
	@test -n "$(DIR)" || { echo 'usage: make sweep-report DIR=multirun/<recipe>/<time>'; exit 2; }
	$(PY) -m dpo_recipes.after.sweep '$(DIR)' $(ARGV)

iterate: setup ## On-policy rounds of RECIPE (e.g. tiny_rounds): sample, judge, pair best vs worst, train DPO again; ROUNDS=3; RUN=name resumes them; NPROC=N (MAIN_PORT) trains each round on N processes; HARDWARE, ARGS as for train
	$(PY) -m dpo_recipes.after.rounds recipes=$(RECIPE) $(if $(HARDWARE),hardware=$(HARDWARE)) $(if $(ROUNDS),rounds.count=$(ROUNDS)) \
		$(if $(RUN),--name '$(RUN)') $(if $(NPROC),--nproc $(NPROC) --main-port $(MAIN_PORT)) $(ARGV)

samples: setup ## Answers of the reference and the trained policy to N held-out prompts of RUN (a run dir), side by side; ARGS="--temperature 0.7"
	@test -n "$(RUN)" || { echo 'usage: make samples RUN=outputs/<recipe>/<time> [N=16]'; exit 2; }
	$(PY) -m dpo_recipes.after.samples '$(RUN)' --n $(N) $(ARGV)

eval: setup ## Did DPO make the answers better? RUN's policy vs its reference and vs the data's chosen answers on N (default 64) held-out prompts, by the run's judge: win rates with 95% intervals; ARGS="--judge PATH"
	@test -n "$(RUN)" || { echo 'usage: make eval RUN=outputs/<recipe>/<time> [N=64] [ARGS="--judge PATH"]'; exit 2; }
	$(PY) -m dpo_recipes.after.evaluate '$(RUN)' --n $(if $(filter command line environment,$(origin N)),$(N),64) $(ARGV)

export: setup ## RUN (a run dir) as a standalone model in <RUN>/export: LoRA merged, with a model card; ARGS="--push-to-hub user/name"
	@test -n "$(RUN)" || { echo 'usage: make export RUN=outputs/<recipe>/<time> [ARGS="--out DIR"]'; exit 2; }
	$(PY) -m dpo_recipes.after.export '$(RUN)' $(ARGV)

validate: setup ## Compose RECIPE and build every TRL object without loading weights
	$(PY) -m dpo_recipes.validate $(TRAIN_ARGS) $(ARGV)

prep: setup ## Convert IN (FORMAT=alpaca|ultrafeedback|sharegpt|trl) to TRL's form in OUT; options in ARGS
	@test -n "$(IN)" -a -n "$(OUT)" || { echo 'usage: make prep FORMAT=alpaca IN=data.json OUT=prefs.jsonl [ARGS="--strict"]'; exit 2; }
	$(PY) -m data_prep $(FORMAT) '$(IN)' '$(OUT)' $(ARGV)

# A pytest worker per core (WORKERS=0: one process), each test file on one worker, each worker on its own cores
PYTEST = $(PY) -m pytest -n $(WORKERS) --dist loadfile --no-loadscope-reorder

test: setup ## Run every tier of the test suite: default, slow and e2e (what CI runs); WORKERS, PYTEST_ARGS
	$(PYTEST) $(PYTEST_ARGS)

test-fast: setup ## The default tier: rules, converters, plans, reports; no model weights, under 2 minutes
	$(PYTEST) -m "not slow and not e2e" $(PYTEST_ARGS)

test-slow: setup ## Training in the test's own process: every recipe for 2 steps, the default run learns
	$(PYTEST) -m "slow and not e2e" $(PYTEST_ARGS)

test-e2e: setup ## Subprocesses and equality: resume, DDP/FSDP vs one process, launchers, samples, export
	$(PYTEST) -m e2e $(PYTEST_ARGS)

bench: setup ## Run every benchmark (or ONLY="data_prep memory"); writes benchmarks/results.json and BENCHMARKS.md
	$(PY) -m benchmarks $(ONLY)

bench-gpu: setup ## On a CUDA GPU: qwen7b_lora_dpo at Qwen2.5-7B's shape (random weights) vs plain TRL, predicted vs measured memory at Qwen2.5-1.5B's; rounds' sampling through vLLM (where installed) vs generate; writes the GPU sections of BENCHMARKS.md
	$(PY) -m benchmarks gpu gpu_memory gpu_rounds

lint: setup ## ruff check and format check
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

format: setup ## Format the code with ruff
	$(PY) -m ruff format . && $(PY) -m ruff check --fix .

clean: ## Remove .venv and caches (runs in outputs/ and multirun/ are kept)
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
