# syntax=docker/dockerfile:1
#
# clerkgate container image: a statically linked binary plus CA roots, nothing else (no shell,
# no package manager), running as UID/GID 65532.
#
#   docker build -t clerkgate .
#   docker run --rm -p 8080:8080 \
#     -e CLERK_SECRET_KEY=sk_live_... -e CLERK_PUBLISHABLE_KEY=pk_live_... \
#     -e CLERKGATE_PROXY__UPSTREAM=http://app:3000 clerkgate
#
# Build arguments (all optional):
#   RUST_IMAGE      the builder: a Debian-based Rust image (cargo, and gcc for aws-lc-sys)
#   RUNTIME_IMAGE   the base of the final image: distroless/static (default) or `scratch`; the
#                   CA bundle is copied from the builder either way
#   PREBUILT_IMAGE  only for `--target runtime-prebuilt`: an image holding a static binary at
#                   /out/clerkgate and a CA bundle at /out/etc/ssl/certs/ca-certificates.crt,
#                   used instead of compiling (.ci/container-test builds it so, because no base
#                   image can be pulled there)
#
# Targets: `runtime` (the default, last stage) compiles in `builder`; `runtime-prebuilt` takes
# the binary from PREBUILT_IMAGE. Both share every setting through `runtime-base` and differ only
# in the stage their two COPY lines name (.ci/container-test checks that).
#
# Podman keeps HEALTHCHECK only with `--format docker` (the OCI format has no such field).

ARG RUST_IMAGE=rust:1.88-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/static-debian12:nonroot
ARG PREBUILT_IMAGE=scratch

# ---------------------------------------------------------------------------------------------
# builder: a static-pie glibc binary (`+crt-static` needs `--target`, so that build scripts and
# proc-macros stay dynamically linked).
FROM ${RUST_IMAGE} AS builder
WORKDIR /src
# cargo auditable embeds the dependency list in the binary (ELF section .dep-v0), where image
# scanners (Trivy, Grype, Syft, `cargo audit bin`) find it. Its own layer: installed once.
RUN cargo install --locked cargo-auditable@0.7.7
ENV CARGO_TERM_COLOR=never \
    CARGO_INCREMENTAL=0 \
    RUSTFLAGS="-C target-feature=+crt-static"

# Dependency layer: only the manifests, with stub targets, so a source change does not rebuild
# every crate. The stubs cover every target Cargo.toml names (cargo checks their paths).
COPY Cargo.toml Cargo.lock ./
RUN set -eu; \
    target="$(uname -m)-unknown-linux-gnu"; \
    mkdir -p src benches tests/it; \
    echo 'fn main() {}' > src/main.rs; \
    : > src/lib.rs; \
    echo 'fn main() {}' > benches/verify.rs; \
    : > tests/it/main.rs; \
    cargo auditable build --release --locked --target "$target" --bin clerkgate; \
    rm -rf src

# The real sources (tests and benches keep their stubs: the binary does not need them, so editing
# a test does not invalidate this layer). `touch` makes the sources newer than the stub build
# whatever mtimes COPY kept.
COPY src ./src
COPY config ./config
RUN set -eu; \
    target="$(uname -m)-unknown-linux-gnu"; \
    find src -name '*.rs' -exec touch {} +; \
    cargo auditable build --release --locked --target "$target" --bin clerkgate; \
    mkdir -p /out/etc/ssl/certs; \
    cp "target/$target/release/clerkgate" /out/clerkgate; \
    cp /etc/ssl/certs/ca-certificates.crt /out/etc/ssl/certs/ca-certificates.crt; \
    /out/clerkgate --version

# ---------------------------------------------------------------------------------------------
# prebuilt: /out from PREBUILT_IMAGE (only `--target runtime-prebuilt` uses it).
FROM ${PREBUILT_IMAGE} AS prebuilt

# ---------------------------------------------------------------------------------------------
# runtime-base: everything about the final image except its two files.
FROM ${RUNTIME_IMAGE} AS runtime-base
ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    CLERKGATE_PROXY__LISTEN=0.0.0.0:8080 \
    CLERKGATE_ADMIN__LISTEN=0.0.0.0:9090
USER 65532:65532
# 8080: the proxy (public). 9090: /livez, /readyz, /metrics (keep it private).
EXPOSE 8080 9090
# clerkgate runs as PID 1: it handles SIGTERM/SIGINT itself (readiness 503, 5 s delay, up to
# 20 s drain, exit 0) and starts no child processes, so it needs no init.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=5s --start-period=15s --retries=3 \
    CMD ["/clerkgate", "healthcheck"]
ENTRYPOINT ["/clerkgate"]
CMD ["serve"]

# ---------------------------------------------------------------------------------------------
# runtime-prebuilt: the final image from a prebuilt binary.
FROM runtime-base AS runtime-prebuilt
COPY --from=prebuilt --chown=0:0 /out/clerkgate /clerkgate
COPY --from=prebuilt --chown=0:0 /out/etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt

# ---------------------------------------------------------------------------------------------
# runtime (default): the final image, compiled in `builder`.
FROM runtime-base AS runtime
COPY --from=builder --chown=0:0 /out/clerkgate /clerkgate
COPY --from=builder --chown=0:0 /out/etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
