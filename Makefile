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
# circus.ini runs `python` and `gunicorn` from the venv.
export PATH := $(CURDIR)/$(BIN):$(PATH)

# `source .venv/bin/activate` sets the same defaults (unless already set), and the circusctl
# endpoint, so that `circusd circus.ini` and a plain `circusctl status` work from this checkout as
# under make; `deactivate` unsets them again. The checkout is found from the activate script's own
# path (bash), else it is this one.
define ACTIVATE_DEFAULTS
# >>> tickstack (written by `make install`: see the Makefile)
_tickstack_restore () {
    for _ts_v in TICKSTACK_HOME TICKSTACK_API_PORT TICKSTACK_CONSOLE_PORT CIRCUSCTL_ENDPOINT; do
        case " $${_TS_SET:-} " in *" $$_ts_v "*) unset "$$_ts_v" ;; esac
    done
    unset _ts_v _TS_SET
    [ "$${1:-}" = nondestructive ] || unset -f _tickstack_restore
}
_tickstack_default () {
    if eval "[ -z \"\$${$$1+x}\" ]"; then export "$$1=$$2"; _TS_SET="$${_TS_SET:-} $$1"; fi
}
_ts_root='$(CURDIR)'
if [ -n "$${BASH_SOURCE:-}" ]; then _ts_root=$$(cd "$$(dirname "$${BASH_SOURCE[0]}")/../.." && pwd); fi
_tickstack_default TICKSTACK_HOME "$$_ts_root/var"
_tickstack_default TICKSTACK_API_PORT 8000
_tickstack_default TICKSTACK_CONSOLE_PORT 8001
_tickstack_default CIRCUSCTL_ENDPOINT "ipc://$$TICKSTACK_HOME/run/circus.sock"
# circusd writes its log and pid file there before anything of ours runs: private folders, and
# its log made private (circus opens it under circusd's umask and appends).
(umask 077 && mkdir -p "$$TICKSTACK_HOME/run" "$$TICKSTACK_HOME/log" && : >> "$$TICKSTACK_HOME/log/circusd.log")
unset _ts_root
unset -f _tickstack_default
# <<< tickstack
endef
ACTIVATE_MARK := $(VENV)/.activate-defaults

.PHONY: install run test lint bench clean

# The checkout's own packages. `install` writes their bytecode ahead of time: where
# PYTHONDONTWRITEBYTECODE is set (this machine's environment) Python never writes it, and every
# process compiled them again as it started (about 0.1 s of each worker's start). A stale file is
# never used: Python checks it against its source's time and size.
PACKAGES := db supervision workers webapp bench testkit

install: $(STAMP) $(ACTIVATE_MARK)
	@$(BIN)/python -m compileall -q $(PACKAGES)

# Exported to this target's recipe (and to a prerequisite built for it: pip's step, when the mark
# alone is made; `make install` builds that step first, without it). Exported to all, it was in the
# environment of every process make runs, circusd and the whole stack included (the console listed
# it among a watcher's environment).
$(ACTIVATE_MARK): export ACTIVATE_DEFAULTS := $(ACTIVATE_DEFAULTS)
$(ACTIVATE_MARK): $(STAMP) Makefile
	sed -i '/^# >>> tickstack/,/^# <<< tickstack/d' $(BIN)/activate
	grep -q _tickstack_restore $(BIN)/activate || \
	  sed -i 's/^deactivate () {$$/&\n    _tickstack_restore "$${1:-}" 2>\/dev\/null || true/' $(BIN)/activate
	printf '%s\n' "$$ACTIVATE_DEFAULTS" >> $(BIN)/activate
	touch $@

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

# The suite runs twice, once per database, side by side (its tests mostly wait on real processes):
# SQLite's run prints as it goes; PostgreSQL's (a throwaway server from Debian's binaries, started
# by the tests) goes to test-output/pytest-postgresql.log, printed once both are done. Each run
# leaves out the other database's own tests (tests/conftest.py); together they are the whole suite.
# Each run spreads its files over TEST_WORKERS pytest-xdist workers: half of a run's time was waits
# on real processes (a watchdog's timeout, a stack starting), which another worker's tests fill.
# Both runs are in the background, so that Ctrl-C or a SIGTERM to make reaches the trap at once (a
# shell runs a trap only once its foreground command ends), which stops both (testkit.interrupts).
TEST_WORKERS ?= 2
test: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	@mkdir -p test-output
	@trap 'kill -TERM $$sqlite_pid $$pg_pid 2>/dev/null; wait $$sqlite_pid $$pg_pid; exit 130' INT TERM; \
	  $(BIN)/python -m pytest --database postgresql -n $(TEST_WORKERS) -p no:cacheprovider > test-output/pytest-postgresql.log 2>&1 & \
	  pg_pid=$$!; \
	  $(BIN)/python -m pytest --database sqlite -n $(TEST_WORKERS) & \
	  sqlite_pid=$$!; wait $$sqlite_pid; sqlite=$$?; \
	  wait $$pg_pid; pg=$$?; \
	  echo; echo "=== the suite on PostgreSQL (test-output/pytest-postgresql.log) ==="; \
	  cat test-output/pytest-postgresql.log; \
	  echo "=== make test: SQLite run exit $$sqlite, PostgreSQL run exit $$pg ==="; \
	  test $$sqlite -eq 0 && test $$pg -eq 0

bench: install
	$(BIN)/python -m bench contention
	$(BIN)/python -m bench api
	$(BIN)/python -m bench analysis

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
	find $(PACKAGES) -name __pycache__ -type d -prune -exec rm -rf {} +
