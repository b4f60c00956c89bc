# Two commands on a fresh machine (each sets up what it needs, idempotently):
#   make demo   the main job
#   make test   the test suite (what CI runs)
SHELL := /bin/bash
VENV ?= $(CURDIR)/.venv
PY := $(VENV)/bin/python
export VENV
# DDS traffic stays on this machine; tests pick their own ROS_DOMAIN_ID.
export ROS_AUTOMATIC_DISCOVERY_RANGE ?= LOCALHOST

.PHONY: setup test test-fast lint demo bench bench-gpu benchmark clean
# The pure core alone: no DDS, no processes, no linters, no timing (about a minute).
FAST := not e2e and not dds and not slow and not linter and not timing

setup:
	@bash scripts/setup_env.sh

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "$(FAST)"

lint: setup
	$(PY) -m pytest -q -m linter

bench: setup
	$(PY) -m mmtta_ros.tools.sensor_core_benchmark
	$(PY) -m mmtta_ros.eval.sync_latency

bench-gpu: setup
	bash scripts/bench_gpu.sh

benchmark: setup
	$(PY) -m mmtta_ros.tools.benchmark

demo: setup
	bash scripts/demo.sh

clean:
	rm -rf $(VENV) build install log
