# The seed system's workflow names, each one line over the CLI that does the job.
# Variables: MODEL (a model folder or, for eval-runner-openai, the endpoint's model name),
# IN (input data), OUT (output folder), REPORT (report folder), CONFIG (YAML), ENDPOINT
# (an OpenAI-compatible base URL), ARGS (extra flags for the CLI). `make help` lists the targets.
BIN ?= .venv/bin
MODEL ?= runs/pilot
IN ?= data/tools/test.jsonl
OUT ?= artifacts/$(notdir $(MODEL))
REPORT ?= $(OUT)/report
CONFIG ?= configs/pilot.yaml
ENDPOINT ?= http://127.0.0.1:8080/v1
ARGS ?=

.PHONY: help worker onnx-worker coreml-worker probes eval proc qat contextual-gen \
	contextual-extract contextual-verify contextual-pipeline gen-scale-1k gen-scale-10k \
	verify-scale-1k verify-scale-10k eval-runner-openai eval-runner-local caws-eval \
	judge_data judge_train judge_eval judge_coreml

help:  ## list the targets
	@grep -E '^[a-z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-22s %s\n", $$1, $$2}'

worker: CONFIG = configs/worker_9b.yaml
worker: IN = data/kd
worker: OUT = runs/worker
worker:  ## train the worker (CONFIG, default configs/worker_9b.yaml) on IN=data folder into OUT
	$(BIN)/mlx_student.train --config $(CONFIG) --data $(IN) --out $(OUT) $(ARGS)

onnx-worker:  ## export MODEL to ONNX (prefill + decode with explicit KV) beside its CoreML package in OUT
	$(BIN)/mlx_student.export --model $(MODEL) --config configs/export.yaml --out $(OUT) --onnx $(ARGS)

coreml-worker:  ## export MODEL to one multifunction CoreML package (int8) + manifest in OUT
	$(BIN)/mlx_student.export --model $(MODEL) --config configs/export.yaml --out $(OUT) $(ARGS)

probes:  ## parity probe MLX / PyTorch mirror / OUT/model.mlpackage, report in REPORT
	$(BIN)/mlx_student.probe --model $(MODEL) --package $(OUT)/model.mlpackage --out $(REPORT) $(ARGS)

eval:  ## bench MODEL (TTFT, tok/s, memory) and its tool-use eval over IN, into REPORT
	$(BIN)/mlx_student.bench --model $(MODEL) --out $(REPORT)/bench && $(BIN)/mlx_student.tooleval --model $(MODEL) --data $(IN) --out $(REPORT)/tooleval $(ARGS)

proc: IN = data/tools
proc: OUT = $(MODEL)-proc
proc:  ## process-supervised training of CONFIG from MODEL on tool traces IN into OUT
	$(BIN)/mlx_student.train --config $(CONFIG) --init-from $(MODEL) --data $(IN) --out $(OUT) --process-weights tool_name=2,arguments=2,integration=1.5 $(ARGS)

qat: IN = data/stdlib
qat: OUT = $(MODEL)-qat8
qat:  ## int8 QAT of MODEL self-distilled (forward KL to itself) on IN into OUT
	$(BIN)/mlx_student.train --config $(CONFIG) --init-from $(MODEL) --teacher $(MODEL) --loss forward_kl=1 --qat bits=8,scales=lsq,start_step=0 --data $(IN) --out $(OUT) $(ARGS)

contextual-gen contextual-extract contextual-verify contextual-pipeline: OUT = data/contextual
contextual-verify contextual-pipeline: IN = $(OUT)
contextual-gen:  ## 60 gold tool traces with process spans (seed 42) into OUT
	$(BIN)/mlx_student.toolgen --n 60 --seed 42 --out $(OUT) $(ARGS)

contextual-extract:  ## the same 60 items with teacher traces from ENDPOINT, spans extracted, into OUT
	$(BIN)/mlx_student.toolgen --n 60 --seed 42 --out $(OUT) --teacher-url $(ENDPOINT) --teacher-limit 60 $(ARGS)

contextual-verify:  ## verify the traces in IN (schemas, replay, spans, grounding) with gates, into REPORT
	$(BIN)/mlx_student.toolverify $(IN) --out $(REPORT) $(ARGS)

contextual-pipeline: contextual-gen contextual-verify  ## contextual-gen, then contextual-verify on its output (OUT)

gen-scale-1k:  ## 1,000 traces into data/tools_1k
	$(BIN)/mlx_student.toolgen --n 1000 --seed 42 --out data/tools_1k $(ARGS)

gen-scale-10k:  ## 10,000 traces in 10 shards, merged into data/tools_10k
	for k in 0 1 2 3 4 5 6 7 8 9; do $(BIN)/mlx_student.toolgen --n 10000 --seed 42 --num-shards 10 --shard $$k --out data/tools_10k.shards/$$k $(ARGS) || exit 1; done && $(BIN)/mlx_student.toolgen --merge data/tools_10k.shards/* --out data/tools_10k

verify-scale-1k:  ## verify data/tools_1k into data/reports/verify_scale_1k
	$(BIN)/mlx_student.toolverify data/tools_1k --out data/reports/verify_scale_1k $(ARGS)

verify-scale-10k:  ## verify data/tools_10k into data/reports/verify_scale_10k
	$(BIN)/mlx_student.toolverify data/tools_10k --out data/reports/verify_scale_10k $(ARGS)

eval-runner-openai:  ## tool-use eval of the model named MODEL at ENDPOINT over IN, into OUT
	$(BIN)/mlx_student.tooleval --endpoint $(ENDPOINT) --model-name $(MODEL) --data $(IN) --out $(OUT) $(ARGS)

eval-runner-local:  ## tool-use eval of the MLX model folder MODEL over IN, into OUT
	$(BIN)/mlx_student.tooleval --model $(MODEL) --data $(IN) --out $(OUT) $(ARGS)

caws-eval: CONFIG = configs/caws/arbiter_gate.yaml
caws-eval: IN = change.diff
caws-eval: OUT = runs/caws
caws-eval:  ## CAWS verdict of the diff IN (git diff) against the working spec CONFIG into OUT; reports via ARGS (--junit --lint --coverage)
	$(BIN)/mlx_student.caws_eval --spec $(CONFIG) --diff $(IN) --out $(OUT)/verdict.json $(ARGS)

judge_data: OUT = data/judge_pairs
judge_data:  ## CAWS adjudication pairs (real stdlib edits, gate-engine labels) + KD corruptions into OUT
	$(BIN)/mlx_student.judge_data --config configs/judge_data.yaml --out $(OUT) $(ARGS)

judge_train: CONFIG = configs/judge_smollm2.yaml
judge_train: IN = data/judge_pairs
judge_train: OUT = runs/judge
judge_train:  ## train the pairwise judge of CONFIG on the pairs IN into OUT (resumable: ARGS=--resume)
	$(BIN)/mlx_student.judge_train --config $(CONFIG) --data $(IN) --out $(OUT) $(ARGS)

judge_eval: MODEL = runs/judge
judge_eval: IN = data/judge_pairs
judge_eval:  ## the judge MODEL on the test pairs of IN against baselines, into REPORT
	$(BIN)/mlx_student.judge_eval --judge $(MODEL) --data $(IN) --out $(REPORT) $(ARGS)

judge_coreml: MODEL = runs/judge
judge_coreml:  ## the judge MODEL as one int8 CoreML package (a score function per length) in OUT
	$(BIN)/mlx_student.judge_export --judge $(MODEL) --out $(OUT) $(ARGS)
