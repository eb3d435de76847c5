# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum < requirements.lock | cut -d' ' -f1)
# The runtime folder (database, sockets, logs, spool, backups) and the ports
# the API and the console listen on (127.0.0.1 only).
export TICKSTACK_HOME ?= $(CURDIR)/var
export TICKSTACK_API_PORT ?= 8000
export TICKSTACK_CONSOLE_PORT ?= 8001
# circus.ini runs `python`, `gunicorn` and `circusd-stats` from the venv.
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: install run test lint bench clean

install: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
	# The checkout on the venv's path, so circusd can import our hooks.
	$(BIN)/python -c 'import site; print("$(CURDIR)")' > "$$($(BIN)/python -c 'import site; print(site.getsitepackages()[0])')/tickstack.pth"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

run: install
	$(BIN)/python -m db prepare
	exec $(BIN)/circusd circus.ini

test: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest

bench: install
	$(BIN)/python -m bench contention
	$(BIN)/python -m bench api

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
