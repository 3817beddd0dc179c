PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUNTIME_STAMP := $(VENV)/.runtime-installed
STAMP := $(VENV)/.installed

.PHONY: install constraints run test test-tools test-fast lint bench soak fuzz clean

# `make run` needs only the runtime dependencies; everything else also needs the test extras.
install: $(STAMP)

# constraints.txt: the exact versions the suite passed with; the Dockerfile installs the same.
$(RUNTIME_STAMP): pyproject.toml constraints.txt
	@echo "==> creating $(VENV) and installing the relay's runtime dependencies (first run only, ~30 s)"
	@$(PYTHON) -m venv $(VENV)
	@$(BIN)/pip install --quiet --upgrade pip
	@$(BIN)/pip install --quiet -c constraints.txt -e .
	@touch $(RUNTIME_STAMP)
	@echo "==> runtime dependencies installed"

$(STAMP): $(RUNTIME_STAMP)
	@echo "==> installing the test and lint tools into $(VENV) (pytest, mypy, ruff, ...)"
	@$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	@touch $(STAMP)
	@echo "==> test tools installed"

# Re-pin constraints.txt from .venv after an upgrade the suite passed with.
constraints: install
	{ head -3 constraints.txt; $(BIN)/pip freeze --exclude-editable | grep -v '^#'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

run: $(RUNTIME_STAMP)
	@echo "==> starting the relay (Ctrl-C stops it)"
	@$(BIN)/protege-relay run

# swaks and docker-compose: installed with apt-get when missing and possible, else one line
# says what to install (scripts/test-tools.sh).
test-tools:
	@sh scripts/test-tools.sh

TEST_WORKERS ?= 4

# The whole suite, in one process (about 7.5 min on an idle 2-core machine).
test: install test-tools
	$(BIN)/python -m pytest -q -p no:cacheprovider

# Everything but the system tier (tests/system: several processes at once, faults, multi-node),
# on TEST_WORKERS pytest-xdist workers: the tests mostly wait on sockets and processes, so more
# workers than cores pays. Since relay processes are forked warm (tests/support/launcher.py), 4 is
# the best on 2 cores (back to back: 2 workers 64 s, 3 45-52 s, 4 45-48 s, 5 54 s, 6 48-54 s, 8 55 s):
# each worker also collects the whole suite, and more of them only add contention.
# `make test` runs the whole suite in one process.
# PYTHONDONTWRITEBYTECODE is emptied (= unset for Python): with it set, each of the ~150 Python
# processes of a run (workers, services, CLI calls) compiled the relay's sources and pytest
# re-rewrote every test module: about 30% of the run's CPU time. The caches go to the ignored __pycache__/
test-fast: install test-tools
	PYTHONDONTWRITEBYTECODE= $(BIN)/python -m pytest -q -p no:cacheprovider -m "not system" -n $(TEST_WORKERS) --dist worksteal

lint: install
	$(BIN)/ruff check shared services protege_relay tests bench fuzz
	$(BIN)/ruff format --check shared services protege_relay tests bench fuzz
	$(BIN)/mypy

bench: install
	$(BIN)/python -m bench $(if $(QUICK),--quick,)

# The fault and multi-node tests with 10x the messages (10,000 per fault scenario); SOAK=<n> for n x.
soak: install
	RELAY_SOAK=$(or $(SOAK),1) $(BIN)/python -m pytest -q -s -p no:cacheprovider -o timeout=1800 \
		tests/system/test_faults.py tests/system/test_faults_backpressure.py tests/system/test_multinode.py

# atheris is installed here, not in the test extras: it may need a compiler where no wheel exists.
fuzz: install
	$(BIN)/pip install --quiet atheris
	$(BIN)/python fuzz/run.py

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
