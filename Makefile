# The two commands of the README. Both install what they need first.
VENV := $(shell echo $${KUBETUNE_VENV:-$$HOME/.cache/kubetune/venv})
PYTEST_ARGS ?=

.PHONY: setup dev test test-unit test-reliability test-load bench bench-gpu bench-operator

setup:
	@hack/setup.sh >/dev/null

# Runs kubetune's main job on an embedded local control plane.
dev: setup
	$(VENV)/bin/kubetune dev $(DEV_ARGS)

# The whole test suite: unit, integration (real control plane) and e2e.
test: setup
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# Only the tests that need no control plane.
test-unit: setup
	$(VENV)/bin/pytest -m "not integration and not e2e" $(PYTEST_ARGS)

# Fault injection, hostile input and load (also part of `make test`): SIGKILLed operator,
# killed trainer, restarted API server, cut watch connections, 520 generated specs, bad data,
# forged reports, secrets, 100 jobs across 20 namespaces. About 15 minutes on 2 cores.
test-reliability: setup
	$(VENV)/bin/pytest tests/reliability -s $(PYTEST_ARGS)

# The 500-job load figure (about 10 minutes): time for all to start, operator peak memory.
test-load: setup
	KUBETUNE_LOAD_JOBS=500 $(VENV)/bin/pytest tests/reliability/test_load_many_jobs.py -s $(PYTEST_ARGS)

# Benchmarks (figures and ratios against a baseline measured in the same run; see bench/README.md).
bench: setup
	$(VENV)/bin/python bench/trainer_throughput.py --rounds 3
	$(VENV)/bin/python bench/trainer_overhead.py

# On a GPU machine: MFU, LoRA vs TRL, scaling, vLLM; results in bench/results/ (see bench/README.md).
bench-gpu: setup
	PYTHON=$(VENV)/bin/python bench/gpu_suite.sh

bench-operator: setup
	$(VENV)/bin/python bench/operator_scale.py --jobs 1000 --rate 10
