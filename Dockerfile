# tokenlb and llmsim in one small image: static binaries, non-root.
FROM golang:1.26 AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
RUN CGO_ENABLED=0 go build -trimpath -ldflags="-s -w" -o /out/ ./cmd/tokenlb ./cmd/llmsim

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/tokenlb /out/llmsim /
COPY deploy/tokenlb.yaml /etc/tokenlb/tokenlb.yaml
# Numeric, so that Kubernetes can check runAsNonRoot (distroless nonroot is 65532).
USER 65532:65532
EXPOSE 9002 9090
ENTRYPOINT ["/tokenlb"]
CMD ["--config", "/etc/tokenlb/tokenlb.yaml"]
