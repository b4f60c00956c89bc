# Two commands on a fresh machine (each sets up what it needs, idempotently):
#   make demo   the main job
#   make test   the test suite (what CI runs)
SHELL := /bin/bash
VENV ?= $(CURDIR)/.venv
PY := $(VENV)/bin/python
export VENV
# DDS traffic stays on this machine; tests pick their own ROS_DOMAIN_ID.
export ROS_AUTOMATIC_DISCOVERY_RANGE ?= LOCALHOST

.PHONY: setup test lint demo bench clean

setup:
	@bash scripts/setup_env.sh

test: setup
	$(PY) -m pytest -q

lint: setup
	$(PY) -m pytest -q -m linter

bench: setup
	$(PY) -m mmtta_ros.tools.sensor_core_benchmark

demo: setup
	bash scripts/demo.sh

clean:
	rm -rf $(VENV) build install log
