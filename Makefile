# The two commands of the README. Each does its own set-up first (scripts/setup.sh).
.PHONY: setup demo test serve

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/dicomai demo

test: setup
	.venv/bin/python -m pytest -q

serve: setup
	.venv/bin/dicomai serve
