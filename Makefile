# ledger: `make run` serves, `make test` tests. Both find PostgreSQL on their own:
# $DATABASE_URL (environment or .env) if it answers, else 127.0.0.1:5432, else a private
# throwaway cluster started from the installed server binaries (scripts/pg.sh).

SHELL := /bin/bash
CARGO ?= cargo
# Integration tests mostly wait on I/O; more threads than cores keeps CI short.
TEST_THREADS ?= 8
DATABASE_URL ?= $(shell sed -n 's/^DATABASE_URL=//p' .env 2>/dev/null | tail -n 1)
export DATABASE_URL

.PHONY: run test lint fmt db-up db-down migrate check-tools clean-test-dbs bench bench-smoke

## run: serve in release mode on $PORT (8080), after setting up the database and migrating
run: check-tools
	@admin=$$(scripts/pg.sh url) || exit 1; \
	if [ -n "$$DATABASE_URL" ] && [ "$$admin" = "$$DATABASE_URL" ]; then url=$$DATABASE_URL; \
	else scripts/pg.sh ensure-db "$$admin" ledger && url=$${admin%/*}/ledger; fi; \
	echo "make run: using database $$(echo "$$url" | sed -E 's#//([^:/@]+):[^@]*@#//\1:***@#')"; \
	DATABASE_URL=$$url $(CARGO) run --release --bin ledger

## test: lint-free build and the whole suite against real PostgreSQL, then a smoke run of
## the benchmark harness on the binary the suite built (its own private cluster, ~30 s)
test: check-tools
	@admin=$$(scripts/pg.sh url) || exit 1; \
	DATABASE_URL=$$admin $(CARGO) test --features test-routes,bench -- --test-threads $(TEST_THREADS)
	@scripts/bench.sh --smoke --bin target/debug/ledger

## bench: the benchmark (release build, its own PostgreSQL cluster, ~5 minutes of runs);
## writes BENCHMARKS.md and docs/bench-concurrency.svg
bench: check-tools
	@scripts/bench.sh

## bench-smoke: every benchmark step for a second at low load, checking the harness
bench-smoke: check-tools
	@scripts/bench.sh --smoke

## migrate: apply the migrations to the database `make run` uses
migrate: check-tools
	@admin=$$(scripts/pg.sh url) || exit 1; \
	if [ -n "$$DATABASE_URL" ] && [ "$$admin" = "$$DATABASE_URL" ]; then url=$$DATABASE_URL; \
	else scripts/pg.sh ensure-db "$$admin" ledger && url=$${admin%/*}/ledger; fi; \
	DATABASE_URL=$$url $(CARGO) run --release --bin ledger -- migrate

## lint: formatting check and clippy with warnings as errors
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets --features test-routes,bench -- -D warnings

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

check-tools:
	@command -v $(CARGO) >/dev/null || { echo "cargo not found: install Rust (https://rustup.rs)"; exit 1; }
