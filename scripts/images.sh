#!/usr/bin/env bash
# Builds the ingestor and operator images with the real Dockerfiles' runtime stage from
# this checkout's release binaries, then runs them the way the operator's pod spec does
# (e2e/tests/images.rs): UID 65532, read-only root filesystem, the queue on a mounted
# volume, the config mounted read-only, against a nats-server container.
#
# Usage: scripts/images.sh   (root, or a user of the docker group with an engine running)
#
# Needs a Docker engine: as root it installs Debian's docker.io and starts dockerd when
# none answers. Base images cannot be pulled on the project's machines, so when
# gcr.io/distroless/cc-debian12:nonroot is not present a stand-in is made under that tag
# from this machine's Debian packages (libc6, libgcc-s1, ca-certificates, netbase) with
# distroless's users (root, nobody, nonroot 65532) and no shell. The Dockerfiles stay
# the ones users build with the public bases.
set -euo pipefail
cd "$(dirname "$0")/.."

base=gcr.io/distroless/cc-debian12:nonroot
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
ingestor_image=ghcr.io/tagstream/tagstream-ingestor:$version
operator_image=ghcr.io/tagstream/tagstream-operator:$version
nats_image=tagstream-ci/nats-server:local

# The engine's own client from Debian's docker.io: it speaks the engine's API version and
# builds with the engine's BuildKit, with no buildx plugin needed.
docker=docker
[ -x /usr/bin/docker ] && docker=/usr/bin/docker

start_engine() {
  if $docker info >/dev/null 2>&1; then
    return
  fi
  if [ "$(id -u)" != 0 ]; then
    echo "no Docker engine answers and this is not root: start one (or run as root) first" >&2
    exit 1
  fi
  if ! command -v dockerd >/dev/null 2>&1; then
    echo "==> installing Debian's docker.io"
    apt-get update -qq && apt-get install -y -qq docker.io >/dev/null
    docker=/usr/bin/docker
  fi
  echo "==> starting dockerd (log: /tmp/tagstream-dockerd.log)"
  nohup dockerd >/tmp/tagstream-dockerd.log 2>&1 &
  for _ in $(seq 60); do
    $docker info >/dev/null 2>&1 && return
    sleep 1
  done
  echo "dockerd did not answer within 60 s; its log:" >&2
  tail -20 /tmp/tagstream-dockerd.log >&2
  exit 1
}

# Copies what dpkg says the packages installed into $1, below /usr as this merged-/usr
# system keeps it, and adds distroless's top-level links, users and directories.
stand_in_rootfs() {
  local root=$1 path real
  mkdir -p "$root/usr/bin" "$root/usr/lib" "$root/usr/lib64" "$root/usr/sbin" "$root/etc/ssl/certs" \
    "$root/tmp" "$root/home/nonroot" "$root/root"
  for link in bin lib lib64 sbin; do ln -s "usr/$link" "$root/$link"; done
  dpkg -L libc6 libgcc-s1 ca-certificates netbase | while read -r path; do
    if [ -d "$path" ] && [ ! -L "$path" ]; then continue; fi
    if [ ! -e "$path" ] && [ ! -L "$path" ]; then continue; fi
    real="$(readlink -f "$(dirname "$path")")/$(basename "$path")"
    mkdir -p "$root$(dirname "$real")"
    cp -a "$path" "$root$real"
  done
  # Made by update-ca-certificates, so in no package's file list.
  cp -L /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/"
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' \
    >"$root/etc/passwd"
  printf 'root:x:0:\nnobody:x:65534:\nnonroot:x:65532:\n' >"$root/etc/group"
  chmod 1777 "$root/tmp"
  chown 65532:65532 "$root/home/nonroot"
  rm -f "$root/bin/sh" "$root/usr/bin/sh"
}

make_base_stand_in() {
  if $docker image inspect "$base" >/dev/null 2>&1; then
    echo "==> $base is present"
    return
  fi
  echo "==> making a stand-in for $base from this machine's Debian packages"
  local root
  root=$(mktemp -d)
  stand_in_rootfs "$root"
  tar -C "$root" -c . | $docker import \
    --change 'USER 65532:65532' --change 'WORKDIR /home/nonroot' \
    --change 'LABEL org.tagstream.stand-in=debian-packages' - "$base" >/dev/null
  rm -rf "$root"
}

build_images() {
  echo "==> release binaries"
  cargo build --release --locked -p tagstream-ingestor -p tagstream-operator
  mkdir -p deploy/docker/prebuilt
  install -m 0755 target/release/tagstream-ingestor target/release/tagstream-operator deploy/docker/prebuilt/
  for component in ingestor operator; do
    echo "==> ghcr.io/tagstream/tagstream-$component:$version (deploy/docker/$component.Dockerfile, prebuilt binary)"
    DOCKER_BUILDKIT=1 $docker build -q --build-arg BINARY_FROM=prebuilt --build-arg "VERSION=$version" \
      -f "deploy/docker/$component.Dockerfile" -t "ghcr.io/tagstream/tagstream-$component:$version" . >/dev/null
  done
  echo "==> $nats_image (Debian's nats-server on the same base)"
  local context
  context=$(mktemp -d)
  cp "$(command -v nats-server)" "$context/nats-server"
  printf 'FROM %s\nCOPY nats-server /usr/local/bin/nats-server\nUSER 65532:65532\nENTRYPOINT ["/usr/local/bin/nats-server"]\n' "$base" \
    >"$context/Dockerfile"
  DOCKER_BUILDKIT=1 $docker build -q -t "$nats_image" "$context" >/dev/null
  rm -rf "$context"
}

if ! command -v nats-server >/dev/null 2>&1; then
  echo "nats-server is needed for the broker container: apt-get install -y nats-server" >&2
  exit 1
fi
start_engine
make_base_stand_in
build_images
$docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E "tagstream" || true

echo "==> running the images (e2e/tests/images.rs)"
TAGSTREAM_IMAGES_DOCKER=$docker TAGSTREAM_INGESTOR_IMAGE=$ingestor_image TAGSTREAM_OPERATOR_IMAGE=$operator_image \
  TAGSTREAM_NATS_IMAGE=$nats_image cargo test -q --locked -p tagstream-e2e --test images -- --nocapture --test-threads 1
