# The two commands of the README. Both install what they need first.
VENV := $(shell echo $${KUBETUNE_VENV:-$$HOME/.cache/kubetune/venv})
PYTEST_ARGS ?=

.PHONY: setup dev test test-unit

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
