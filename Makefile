# The two commands of the README. Each does its own set-up first (scripts/setup.sh).
.PHONY: setup demo test lint serve

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/dicomai demo

# Two pytest-xdist workers (CI has 2 cores): much of the suite waits on daemons, peers and
# timers rather than computing. Each test file runs on one worker, the long files handed out
# first (tests/conftest.py orders them). TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
test: setup lint
	.venv/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# Lint, format and type checks of the daemon and dicomai-tools: zero findings, or the test run
# stops here.
lint: setup
	.venv/bin/ruff check dicomai tools
	.venv/bin/ruff format --check dicomai tools
	.venv/bin/mypy dicomai
	.venv/bin/mypy tools/dicomai_tools

serve: setup
	.venv/bin/dicomai serve
