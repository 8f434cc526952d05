# claudemesh: common developer commands.
#
#   make run     start a broker in the foreground on the embedded SQLite store
#                (http://localhost:7900, loopback only); another port with
#                PORT=7901, extra broker options via ARGS=...
#   make install put the `claudemesh` command on your PATH: a link in
#                ~/.local/bin (BINDIR=...) to the one in the virtualenv
#   make test    run the whole trial suite
#   make lint    ruff
#   make bench   the benchmark (bench/, docs/performance.md); extra arguments
#                via BENCH=..., e.g. make bench BENCH="--quick burst"
#   make soak    the long fault and flood runs (soak/, issue 8): crash, store
#                outage, slow consumer, floods; extra arguments via SOAK=...
#   make fuzz    the hostile-input suite (tests/test_fuzz.py) with many examples
#                (FUZZ_EXAMPLES=N, default 2000)
#   make clean   remove build and test leftovers (keeps the virtualenv)
#   make distclean   ... and the virtualenv
#
# The virtualenv is created on first use. Installs are remembered by stamp
# files inside it, redone only when setup.cfg or pyproject.toml change.

VENV ?= .venv
PYTHON ?= python3
ARGS ?=
PORT ?= 7900
BINDIR ?= $(HOME)/.local/bin
BENCH ?=
SOAK ?=
FUZZ_EXAMPLES ?= 2000

VENV_PYTHON := $(VENV)/bin/python
RUN_STAMP := $(VENV)/.claudemesh-installed
TEST_STAMP := $(VENV)/.claudemesh-installed-test
BENCH_STAMP := $(VENV)/.claudemesh-installed-bench

.PHONY: run install test lint bench soak fuzz clean distclean

# The pip that venv bundles (Python >= 3.11) installs editable projects fine.
$(VENV_PYTHON):
	$(PYTHON) -m venv $(VENV)

$(RUN_STAMP): setup.cfg pyproject.toml | $(VENV_PYTHON)
	$(VENV_PYTHON) -m pip install -q -e .
	touch $@

$(TEST_STAMP): setup.cfg pyproject.toml | $(VENV_PYTHON)
	$(VENV_PYTHON) -m pip install -q -e '.[test]'
	touch $@ $(RUN_STAMP)

# --pidfile= : twistd writes ./twistd.pid even in the foreground otherwise,
# and a stale one stops the next `make run`. Loopback only: a development
# broker, where mesh creation needs no admin token (docs/membership.md).
# PORT changes the port and keeps loopback; a --port in ARGS would replace
# the whole endpoint (twistd keeps the last one), so it is refused here.
run: $(RUN_STAMP)
	@case ' $(ARGS) ' in *' --port'*) echo "make run: use PORT=$(PORT) for the port (it stays loopback-only); --port in ARGS would listen on every interface" >&2; exit 2;; esac
	$(VENV)/bin/twistd -n --pidfile= claudemesh-broker --port tcp:$(PORT):interface=127.0.0.1 $(ARGS)

# A symbolic link, so the command follows this checkout (and its .venv).
install: $(RUN_STAMP)
	mkdir -p $(BINDIR)
	ln -sf $(abspath $(VENV))/bin/claudemesh $(BINDIR)/claudemesh
	@echo "claudemesh -> $(BINDIR)/claudemesh"
	@case ":$$PATH:" in *":$(BINDIR):"*) ;; *) echo "note: $(BINDIR) is not on your PATH; add it, e.g. export PATH=\"$(BINDIR):\$$PATH\"";; esac

test: $(TEST_STAMP)
	$(VENV_PYTHON) -m twisted.trial tests

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check .

$(BENCH_STAMP): setup.cfg pyproject.toml | $(VENV_PYTHON)
	$(VENV_PYTHON) -m pip install -q -e '.[bench]'
	touch $@ $(RUN_STAMP)

# SQLite by default; DATABASE_URL=postgresql://... benchmarks Postgres (a
# fresh schema per scenario, dropped afterwards).
bench: $(BENCH_STAMP)
	$(VENV_PYTHON) -m bench $(BENCH)

# A few minutes; prints its figures and exits 1 if a check failed.
soak: $(TEST_STAMP)
	$(VENV_PYTHON) -m soak $(SOAK)

fuzz: $(TEST_STAMP)
	$(VENV_PYTHON) -m soak --only fuzz --fuzz-examples $(FUZZ_EXAMPLES)

clean:
	rm -rf _trial_temp _trial_temp.lock build dist *.egg-info .hypothesis .ruff_cache
	rm -f twisted/plugins/dropin.cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
	rm -f $(RUN_STAMP) $(TEST_STAMP) $(BENCH_STAMP)

distclean: clean
	rm -rf $(VENV)
