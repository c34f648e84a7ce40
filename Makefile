# Two user-facing targets; each sets everything up first (apt packages, .venv, Horovod built once).
#   make demo   LDC93S1: import -> shards -> horovodrun -np 2 training on CPU -> export -> transcript
#   make test   ruff (lint and format check), then the whole test suite
#   make image  the OCI images, CPU and GPU (tools/build_image.sh: podman, no registry, no daemon)
.PHONY: demo test image
SHELL := /bin/bash
# pytest-xdist workers for `make test`; 0: one test at a time, in one process. The suite is CPU-bound on two cores, and
# its time-bound tests (stop deadlines, training-time budgets) need the cores they were sized for: use workers only
# where cores are to spare (tests that share something, such as the image build, stay on one worker).
TEST_WORKERS ?= 0

demo:
	@tools/install.sh
	@launch/run_ldc93s1.sh

test:
	@tools/install.sh --test
	@.venv/bin/ruff check dstrain tests benchmarks && .venv/bin/ruff format --check dstrain tests benchmarks
	@.venv/bin/python -m pytest -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

image:
	@tools/build_image.sh all
