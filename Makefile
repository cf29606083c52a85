# Two environments (see docs/development.md):
#   .venv           newest torch (the CPU wheel PIP_FIND_LINKS points at, where set), Lightning,
#                   transformers, the distributed tests, ruff and mypy.
#   .venv-composer  Composer 0.32.1 with the torch it pins (<2.7.1) and the peer EMAs for the
#                   benchmark.
#   .venv-oldest    the lower bounds pyproject.toml names: torch 2.7 (Composer's, so the same
#                   cached wheels), Lightning 2.5 (both import names), transformers 4.47.
#   .venv-newest    (make test-newest only) the newest torch, Lightning and transformers on the
#                   package index: a large download, so not part of make test.
# Each is rebuilt only when its requirements file or pyproject.toml changes.

PYTHON ?= python3
# The interpreter of .venv-oldest (e.g. OLDEST_PYTHON=python3.10 after rm -rf .venv-oldest).
OLDEST_PYTHON ?= $(PYTHON)
FIND_LINKS := $(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS),)
UV := .venv/bin/uv
export UV_LINK_MODE ?= copy

.PHONY: all setup demo test test-main test-composer test-oldest test-newest test-wheel lint format bench clean

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

.venv-oldest/.installed: .venv/bin/uv requirements/oldest.txt pyproject.toml
	test -x .venv-oldest/bin/python || $(OLDEST_PYTHON) -m venv .venv-oldest
	$(UV) pip install -q --python .venv-oldest/bin/python -r requirements/oldest.txt -e .
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
	.venv-composer/bin/python -m pytest -p no:cacheprovider tests/composer tests/core ema_callbacks/composer.py ema_callbacks/examples ema_callbacks/run_config.py docs/composer.md tests/test_docs.py tests/test_docs_commands.py -m "not distributed"

# The package as users get it: the wheel (and sdist) built once, installed with no extras and
# with each extra alone into fresh environments outside the repository (kept under
# ~/.cache/ema-callbacks/wheel-envs and reused while the wheel's requirements are unchanged),
# where the README's quickstarts and command-line block run. See tests/wheel/check_wheel.py.
test-wheel: .venv/.installed
	.venv/bin/python tests/wheel/check_wheel.py --uv $(UV) $(FIND_LINKS)


# The Lightning and transformers suites (resume, several EMAs, both Lightning import names) on
# the oldest supported versions; the distributed tests run in .venv only.
test-oldest: .venv-oldest/.installed
	.venv-oldest/bin/python -m pytest -p no:cacheprovider tests/lightning tests/transformers ema_callbacks/lightning.py ema_callbacks/transformers.py -m "not distributed"

# The whole .venv suite on the newest releases of everything, torch from the package index (no
# PIP_FIND_LINKS): re-resolved (--upgrade) on every run, "newest" is what the index holds today.
test-newest: .venv/bin/uv
	test -x .venv-newest/bin/python || $(PYTHON) -m venv .venv-newest
	$(UV) pip install -q --upgrade --python .venv-newest/bin/python -r requirements/newest.txt -e .
	.venv-newest/bin/python -m pytest -p no:cacheprovider tests ema_callbacks docs README.md

# The README's test command: lint, types, the three suites, then the wheel.
test: lint test-main test-composer test-oldest test-wheel

bench: .venv-composer/.installed
	.venv-composer/bin/python benchmarks/bench_engine.py --write docs/performance.md

clean:
	rm -rf .venv .venv-composer .venv-oldest .venv-newest .pytest_cache .mypy_cache .ruff_cache
