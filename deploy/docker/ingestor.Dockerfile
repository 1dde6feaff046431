# tagstream-ingestor image: a release build on Debian, run on distroless as a non-root user.
#
#   docker buildx build -f deploy/docker/ingestor.Dockerfile \
#     --platform linux/amd64,linux/arm64 -t ghcr.io/tagstream/tagstream-ingestor:0.1.0 .
#
# Each platform builds natively (under QEMU on a foreign host): slow for arm64 on amd64,
# but no cross toolchain to keep in step. The proto files compile with protox, so no
# protoc is needed. Not built in this project's CI: its machines run no Docker engine.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p tagstream-ingestor \
 && install -m 0755 target/release/tagstream-ingestor /tagstream-ingestor

# glibc for the binary, nothing else: no shell, no package manager. UID 65532 is the
# image's "nonroot" user and what the operator's pod security context runs as.
FROM gcr.io/distroless/cc-debian12:nonroot
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="tagstream-ingestor" \
      org.opencontainers.image.description="Polls Modbus devices into NATS JetStream without losing a point" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/tagstream/tagstream"
COPY --from=build /tagstream-ingestor /usr/local/bin/tagstream-ingestor
USER 65532:65532
EXPOSE 9464
ENTRYPOINT ["/usr/local/bin/tagstream-ingestor"]
CMD ["--help"]
