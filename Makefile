# hybrid-NAS: `make demo` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
NAS := $(VENV)/bin/nas
# CPU machines pin torch to the local CPU wheel; on a GPU box run `make install CONSTRAINTS=`.
CONSTRAINTS ?= constraints-cpu.txt
PIP_C := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# two pytest workers (pytest-xdist), a whole test file each, so a module still shares one Ray
# session: most of the suite's time is spent waiting on subprocesses, Ray and the browser, and two
# workers took the unloaded suite from 1,109 s to 620 s on a 2-core VM. PYTEST_PAR= runs it serially.
PYTEST_PAR ?= -n 2 --dist loadfile

.PHONY: install demo test test-loaded lint bench clean pg browser

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel

$(STAMP): pyproject.toml $(CONSTRAINTS) | $(PY)
	$(PY) -m pip install -q $(PIP_C) -e ".[dev]"
	$(PY) -c "from search_spaces.layers._native_scan import main; main()"
	@touch $(STAMP)

install: $(STAMP)

demo: install
	$(NAS) spaces
	$(NAS) sample --space hybrid_vit --seed 0 --n 3
	$(NAS) sample --space hybrid_vit --seed 7 --json > .demo_spec.json
	$(NAS) describe --space hybrid_vit --spec .demo_spec.json --img-size 32
	$(NAS) describe --space hybrid_vit --preset deit_tiny --img-size 224
	$(NAS) sample --space nb201 --seed 0 --n 3
	$(NAS) proxies --space hybrid_vit --spec .demo_spec.json --data digits --batch-size 32
	$(NAS) device --threads 1
	$(NAS) latency --space hybrid_vit --n 3 --seed 0 --batch-size 8 --threads 1 --repeats 20
	rm -rf .demo_supernet  # a fresh demo: an older run's checkpoint may hold another frame
	$(NAS) supernet train --frame tiny --data digits --epochs 6 --batch-size 64 --lr 3e-3 --no-augment --out .demo_supernet
	$(NAS) supernet eval --ckpt .demo_supernet --n 4
	$(NAS) search --space hybrid_vit --budget 3cpu-m --data digits --workers 2
	$(NAS) studies

# PostgreSQL server binaries for the store tests (tests/conftest.py starts a throw-away cluster)
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
pg:
	@if command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then :; else \
		echo "installing PostgreSQL (apt-get)"; \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql || \
		{ $(SUDO) apt-get update && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql; }; \
	fi

# Chromium for the dashboard's browser test (Playwright drives /usr/bin/chromium; never `playwright install`)
browser:
	@if [ -x /usr/bin/chromium ]; then :; else \
		echo "installing Chromium (apt-get)"; \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium || \
		{ $(SUDO) apt-get update && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; }; \
	fi

test: install pg browser
	$(PY) -m pytest $(PYTEST_PAR) $(PYTEST_ARGS)

# the suite on a busy machine: two busy-loop processes beside it, killed by their PIDs afterwards
# (tests assert invariants, never speed, so this must pass as `make test` does)
test-loaded: install pg browser
	@$(PY) -c 'while True: pass' & b1=$$!; $(PY) -c 'while True: pass' & b2=$$!; \
	trap 'kill $$b1 $$b2 2>/dev/null' EXIT; echo "busy loops: pids $$b1 $$b2"; \
	$(PY) -m pytest $(PYTEST_PAR) $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .

# everything `make demo` writes (the store and its SQLite side files, the studies' run folders,
# dashboard exports, the .demo_* inputs and checkpoints) and what install and the tests leave
clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info test-artifacts
	rm -rf .demo_* nas.db nas.db-wal nas.db-shm nas.db-journal nas_runs nas_exports
