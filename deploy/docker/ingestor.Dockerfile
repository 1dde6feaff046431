# tagstream-ingestor image: a release build on Debian, run on distroless as a non-root user.
#
#   docker buildx build -f deploy/docker/ingestor.Dockerfile \
#     --platform linux/amd64,linux/arm64 -t ghcr.io/tagstream/tagstream-ingestor:0.1.0 .
#
# Each platform builds natively (under QEMU on a foreign host): slow for arm64 on amd64,
# but no cross toolchain to keep in step. The proto files compile with protox, so no
# protoc is needed.
#
# `--build-arg BINARY_FROM=prebuilt` takes the binary from deploy/docker/prebuilt/
# instead of compiling it (BuildKit skips the Rust stage then): the project's CI builds
# the release binaries once, and its machines cannot pull the Rust image
# (scripts/images.sh).
ARG BINARY_FROM=build

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p tagstream-ingestor \
 && install -m 0755 target/release/tagstream-ingestor /tagstream-ingestor

FROM scratch AS prebuilt
COPY deploy/docker/prebuilt/tagstream-ingestor /tagstream-ingestor

FROM ${BINARY_FROM} AS binary

# glibc for the binary, nothing else: no shell, no package manager. UID 65532 is the
# image's "nonroot" user and what the operator's pod security context runs as.
FROM gcr.io/distroless/cc-debian12:nonroot
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="tagstream-ingestor" \
      org.opencontainers.image.description="Polls Modbus devices into NATS JetStream without losing a point" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/tagstream/tagstream"
COPY --from=binary /tagstream-ingestor /usr/local/bin/tagstream-ingestor
USER 65532:65532
EXPOSE 9464
ENTRYPOINT ["/usr/local/bin/tagstream-ingestor"]
CMD ["--help"]
