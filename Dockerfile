# syntax=docker/dockerfile:1
# The xlb image: the `xlb` binary (agent and CLI, its eBPF object embedded) on Debian 12 slim,
# with bpftool to read the pinned maps. deploy/daemonset.yaml runs it.
#
#   docker build -t registry.example.com/xlb:0.1.0 .
#   docker push registry.example.com/xlb:0.1.0
#   (cd deploy && kustomize edit set image xlb=registry.example.com/xlb:0.1.0)
#
# The build stage uses the toolchains the project builds with (README, Toolchain): stable Rust
# for the userspace crates, the nightly of 2026-05-20 (rustc 1.97.0-nightly e50aa6fba, LLVM 22)
# with rust-src for the eBPF crate, and bpf-linker built against that nightly's LLVM, all
# installed by `cargo xtask setup --build-only`. Both stages are Debian 12, so the binary finds
# the glibc it was linked against.

ARG RUST_VERSION=1.95.0

FROM docker.io/library/rust:${RUST_VERSION}-slim-bookworm AS build
ENV XLB_NIGHTLY=nightly-2026-05-20
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo xtask setup --build-only \
 && cargo build --release --locked -p lb-userspace --bin xlb \
 && install -D -m 0755 target/release/xlb /out/xlb

FROM docker.io/library/debian:bookworm-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends bpftool \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/xlb /usr/local/bin/xlb
LABEL org.opencontainers.image.title="xlb" \
      org.opencontainers.image.description="Kubernetes Service load balancing in eBPF (XDP and TC), a kube-proxy replacement" \
      org.opencontainers.image.licenses="Apache-2.0"
ENTRYPOINT ["/usr/local/bin/xlb"]
CMD ["--help"]
