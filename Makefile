# Developer entry points. `make test` and `make demo` work from a fresh clone.
#
# GPU users: create .venv and install your own CUDA build of torch first; `make venv`
# installs torch only when the venv has none.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
# Test files run on this many processes (pytest-xdist, --dist loadfile; 0: in this one).
# The suite mostly waits on servers, restarts and backoffs (8 min of CPU in 11.5 on 2
# cores); on 3 workers it takes 4-5 min. Tests that share a port or rely on timing a
# loaded machine upsets break this: start servers on port 0 (metrics too) and wait on
# conditions, never on sleeps.
PYTEST_WORKERS ?= 3
FUZZ_SECONDS ?= 60

BIN := $(VENV)/bin
BUF := node_modules/.bin/buf
PROTOS := $(shell find proto -name '*.proto')
STUBS := src/weightserve/v1/weightserve_pb2.py

.PHONY: venv node proto demo test fuzz lint fmt clean docker

venv: $(VENV)/.installed

# torch goes in first and on its own: 2.13.0 CPU is on this machine's disk, while an
# unpinned torch pulled in as a dependency would download a multi-GB CUDA build.
# hatchling is the build backend; `make proto` runs hatch_build.py, which imports it.
$(VENV)/.installed: pyproject.toml hatch_build.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c 'import torch' 2>/dev/null || $(BIN)/pip install '$(TORCH_SPEC)'
	$(BIN)/pip install 'hatchling>=1.24'
	$(BIN)/pip install -e '.[dev]'
	touch $@

node: node_modules/.installed

# Not `npm ci`: the registry reached here lacks buf's binaries for other platforms, so
# the lock cannot list them and `npm ci` calls it out of sync. `npm install` still takes
# the locked versions; --no-save keeps it from rewriting package-lock.json.
node_modules/.installed: package.json package-lock.json
	npm install --no-audit --no-fund --no-save
	touch $@

# The editable install generates the stubs once; this keeps them in step with proto/.
$(STUBS): $(PROTOS) hatch_build.py | venv
	$(BIN)/python hatch_build.py

proto: venv
	$(BIN)/python hatch_build.py

demo: venv $(STUBS)
	$(BIN)/weightserve demo

test: venv node $(STUBS) test-deps
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# tests/observability runs a real Prometheus, tests/fleet a real redis-server and
# tests/benchmarks/test_peers.py the peers benchmark's nginx: each is
# installed here when missing, as root with
# apt-get; otherwise its tests skip and say why, and the build goes on. Under systemd each
# package starts and enables its service; it is stopped and disabled at once (the tests
# start their own on a free port), so nothing is left running.
.PHONY: test-deps
test-deps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		command -v prometheus >/dev/null || { \
			if DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus; then \
				if [ -d /run/systemd/system ]; then systemctl disable --now prometheus.service || true; fi; \
			else echo "prometheus not installed: its tests will skip"; fi; \
		}; \
		command -v kubectl >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends kubectl \
			|| echo "kubectl not installed: tests/deploy will skip"; \
		command -v redis-server >/dev/null || { \
			if DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server; then \
				if [ -d /run/systemd/system ]; then systemctl disable --now redis-server.service || true; fi; \
			else echo "redis-server not installed: the fleet coordination tests will skip"; fi; \
		}; \
		command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || { \
			if DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nginx; then \
				if [ -d /run/systemd/system ]; then systemctl disable --now nginx.service || true; fi; \
			else echo "nginx not installed: the peers benchmark's HTTP contender and its test will skip"; fi; \
		}; \
	fi

# Time-boxed hypothesis campaigns over the readers of untrusted files (fuzz/), FUZZ_SECONDS
# per target under a memory cap; the per-test timeout turns a hang into a failure with a traceback.
fuzz: venv
	FUZZ_SECONDS=$(FUZZ_SECONDS) $(BIN)/python -m pytest fuzz --timeout=$$(( $(FUZZ_SECONDS) * 2 + 120 )) $(PYTEST_ARGS)

# lint-imports: the import contracts in pyproject.toml ([tool.importlinter]); --no-cache
# keeps its cache folder out of the tree. buf breaking: proto/ against the last released
# contract (compat/README.md says when that copy changes).
lint: venv node $(STUBS)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache --no-logo
	$(BUF) lint
	$(BUF) breaking proto --against compat/released
	$(BIN)/hadolint Dockerfile
	if command -v promtool >/dev/null; then promtool check rules deploy/prometheus/rules.yaml && promtool test rules deploy/prometheus/rules_test.yaml; fi

# The server image, where a container engine is (docker, or ENGINE=podman, which needs
# --format docker to keep the HEALTHCHECK). docs/deployment.md: digests, arm64.
ENGINE ?= docker
IMAGE ?= weightserve
VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' src/weightserve/_version.py)
REVISION := $(shell git rev-parse --short HEAD 2>/dev/null || echo unknown)
docker:
	$(ENGINE) build $(if $(filter podman,$(ENGINE)),--format docker) \
		--build-arg VERSION=$(VERSION) --build-arg REVISION=$(REVISION) -t $(IMAGE):$(VERSION) .

fmt: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf build dist .pytest_cache .mypy_cache .ruff_cache .hypothesis src/weightserve/v1
	find . -path ./$(VENV) -prune -o -path ./node_modules -prune -o \
		\( -name __pycache__ -o -name '*.egg-info' \) -type d -print0 | xargs -0 rm -rf
