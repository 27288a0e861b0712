# syntax=docker/dockerfile:1
# ppml: the `ppml` command in a small Debian image, run as a non-root user.
#
#   docker build -t ppml:0.1.0 .
#   docker run --rm ppml:0.1.0 --help
#
# Used by deploy/helm/ppml and deploy/k8s (docs/deploy.md). Nothing secret is baked in: app
# credentials, root keys and TLS material come from Kubernetes Secrets at run time. This image
# runs ppml outside SGX; for an SGX enclave build with deploy/gramine instead. Not built in
# this repository's CI (no Docker engine there).

ARG RUST_VERSION=1.94
ARG DEBIAN_RELEASE=trixie

FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS builder
WORKDIR /src
# The manifests and the lock file first, so that the dependency download is a cached layer.
COPY Cargo.toml Cargo.lock ./
COPY crates ./crates
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release -p ppml-cli --locked \
    && install -D -m 0755 target/release/ppml /out/ppml

FROM debian:${DEBIAN_RELEASE}-slim
# ca-certificates: a PCCS or Intel's collateral API, and KMS certificates signed by public CAs.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 ppml \
    && useradd --uid 10001 --gid 10001 --home-dir /var/lib/ppml --create-home \
        --shell /usr/sbin/nologin ppml
COPY --from=builder /out/ppml /usr/local/bin/ppml
USER 10001:10001
WORKDIR /var/lib/ppml
ENV PPML_HOME=/var/lib/ppml/home
# Scheduler gRPC, executor Flight (shuffle), KMS, metrics (scheduler, executor).
EXPOSE 50050 50051 9000 50150 50151
ENTRYPOINT ["ppml"]
CMD ["--help"]
