# Two environments (see docs/development.md):
#   .venv           newest torch (the CPU wheel PIP_FIND_LINKS points at, where set), Lightning,
#                   transformers, the distributed tests, ruff and mypy.
#   .venv-composer  Composer 0.32.1 with the torch it pins (<2.7.1) and the peer EMAs for the
#                   benchmark.
# Each is rebuilt only when its requirements file or pyproject.toml changes.

PYTHON ?= python3
FIND_LINKS := $(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS),)
UV := .venv/bin/uv
export UV_LINK_MODE ?= copy

.PHONY: all setup demo test test-main test-composer test-wheel lint format bench clean

all: test

setup: .venv/.installed .venv-composer/.installed

.venv/bin/uv:
	$(PYTHON) -m venv .venv
	.venv/bin/python -m pip install -q --disable-pip-version-check "uv>=0.4"

.venv/.installed: .venv/bin/uv requirements/main.txt pyproject.toml
	$(UV) pip install -q --python .venv/bin/python $(FIND_LINKS) -r requirements/main.txt -e .
	touch $@

.venv-composer/.installed: .venv/bin/uv requirements/composer.txt pyproject.toml
	test -x .venv-composer/bin/python || $(PYTHON) -m venv .venv-composer
	$(UV) pip install -q --python .venv-composer/bin/python -r requirements/composer.txt -e .
	touch $@

# The README's main job.
demo: .venv/.installed
	.venv/bin/python -m ema_callbacks demo

lint: .venv/.installed
	.venv/bin/ruff check ema_callbacks tests benchmarks
	.venv/bin/ruff format --check ema_callbacks tests benchmarks
	.venv/bin/mypy

format: .venv/.installed
	.venv/bin/ruff format ema_callbacks tests benchmarks
	.venv/bin/ruff check --fix ema_callbacks tests benchmarks

test-main: .venv/.installed
	.venv/bin/python -m pytest -p no:cacheprovider tests ema_callbacks docs README.md

test-composer: .venv-composer/.installed
	.venv-composer/bin/python -m pytest -p no:cacheprovider tests/composer tests/core ema_callbacks/composer.py ema_callbacks/examples ema_callbacks/run_config.py docs/composer.md tests/test_docs.py -m "not distributed"

# The package as users get it: the wheel (and sdist) built once, installed with no extras and
# with each extra alone into fresh environments outside the repository (kept under
# ~/.cache/ema-callbacks/wheel-envs and reused while the wheel's requirements are unchanged),
# where the README's quickstarts and command-line block run. See tests/wheel/check_wheel.py.
test-wheel: .venv/.installed
	.venv/bin/python tests/wheel/check_wheel.py --uv $(UV) $(FIND_LINKS)

# The README's test command: lint, types, both suites, then the wheel.
test: lint test-main test-composer test-wheel

bench: .venv-composer/.installed
	.venv-composer/bin/python benchmarks/bench_engine.py --write docs/performance.md

clean:
	rm -rf .venv .venv-composer .pytest_cache .mypy_cache .ruff_cache
