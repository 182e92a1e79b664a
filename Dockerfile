# syntax=docker/dockerfile:1
# ssegate container image: a static (musl) binary on an empty base.
#
#   docker build -t ssegate .
#   docker run --rm -p 8080:8080 -p 50051:50051 -p 9090:9090 ssegate --help
#
# Ports: 8080 public SSE (HTTP), 50051 internal gRPC (publishers), 9090 admin (/metrics,
# /healthz, /readyz). Configure with the SSEGATE_* environment variables (one per flag of
# `ssegate serve`); the Helm chart in helm/ssegate does that through a ConfigMap.

# ---- builder: the official Rust image, target x86_64-unknown-linux-musl ------------------------
# rust-version in Cargo.toml is 1.89 and the crate is edition 2024; any newer stable works.
FROM rust:1-bookworm AS builder
# musl-tools: a musl C compiler for `ring` (rustls' crypto). No protoc is needed: build.rs
# compiles the .proto files with protox (pure Rust).
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/* \
 && rustup target add x86_64-unknown-linux-musl
WORKDIR /src
COPY . .
# --locked: exactly the versions of Cargo.lock. The cache mounts keep the registry and the
# target dir between builds; the binary is copied out of the cached target dir.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --target x86_64-unknown-linux-musl --bin ssegate \
 && cp target/x86_64-unknown-linux-musl/release/ssegate /ssegate \
 && mkdir -p /rootfs/etc/ssl/certs /rootfs/tmp \
 && cp /etc/ssl/certs/ca-certificates.crt /rootfs/etc/ssl/certs/ \
 && echo 'ssegate:x:10001:10001:ssegate:/nonexistent:/sbin/nologin' > /rootfs/etc/passwd \
 && echo 'ssegate:x:10001:' > /rootfs/etc/group

# ---- final: scratch, just the binary, CA certificates (NATS/OTLP over TLS) and a passwd entry --
FROM scratch
COPY --from=builder /rootfs/ /
COPY --from=builder /ssegate /usr/local/bin/ssegate
# Non-root (the chart also sets runAsUser 10001, readOnlyRootFilesystem and drops every
# capability: the server writes no file and binds only ports above 1024).
USER 10001:10001
EXPOSE 8080 50051 9090
ENTRYPOINT ["/usr/local/bin/ssegate"]
CMD ["serve"]
