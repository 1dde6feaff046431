# tagstream-operator image: a release build on Debian, run on distroless as a non-root user.
#
#   docker buildx build -f deploy/docker/operator.Dockerfile \
#     --platform linux/amd64,linux/arm64 -t ghcr.io/tagstream/tagstream-operator:0.1.0 .
#
# Same shape as ingestor.Dockerfile: each platform builds natively (QEMU on a foreign
# host), no protoc needed (protox); `--build-arg BINARY_FROM=prebuilt` takes the binary
# from deploy/docker/prebuilt/ instead (scripts/images.sh).
ARG BINARY_FROM=build

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p tagstream-operator \
 && install -m 0755 target/release/tagstream-operator /tagstream-operator

FROM scratch AS prebuilt
COPY deploy/docker/prebuilt/tagstream-operator /tagstream-operator

FROM ${BINARY_FROM} AS binary

# glibc for the binary, nothing else: no shell, no package manager. The chart's pod
# security context runs it as UID 65532 with a read-only root filesystem; it writes
# nothing to disk (rustls with the ring provider: no OpenSSL, no CA bundle needed for
# the in-cluster API server, whose CA comes from the service account mount).
FROM gcr.io/distroless/cc-debian12:nonroot
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="tagstream-operator" \
      org.opencontainers.image.description="Kubernetes operator running one tagstream ingestor per Site" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/tagstream/tagstream"
COPY --from=binary /tagstream-operator /usr/local/bin/tagstream-operator
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/tagstream-operator"]
