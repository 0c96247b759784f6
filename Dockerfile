# syntax=docker/dockerfile:1
#
# The interceptor image. The build stage runs exactly what a workstation runs (`cargo xtask build
# --release`: nightly + rust-src for the eBPF crate, bpf-linker built against nightly's LLVM, the eBPF
# object, then the daemon that embeds it); the test suite runs that same command on every CI run.
#
#   docker build -t ghcr.io/interceptor-dev/interceptor:0.1.0 .

FROM docker.io/library/rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo xtask build --release \
 && install -D -m 0755 target/release/interceptor /out/usr/local/bin/interceptor \
 && install -D -m 0644 interceptor/default-policy.yaml /out/etc/interceptor/policy/policy.yaml \
 && install -d -m 0700 /out/var/lib/interceptor /out/etc/interceptor/ca

# glibc and libgcc only (rustls, no OpenSSL): the distroless "cc" base is enough. It has no shell and
# no package manager. The default user is non-root (tools such as `interceptor policy check` and
# `interceptor doctor` run as is); the DaemonSet runs the daemon as uid 0 with four capabilities.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/usr/local/bin/interceptor /usr/local/bin/interceptor
COPY --from=build /out/etc/interceptor/ /etc/interceptor/
# Writable by the image's default user (development CA, durable budgets); a hostPath in the DaemonSet.
COPY --from=build --chown=65532:65532 /out/var/lib/interceptor/ /var/lib/interceptor/
USER 65532:65532
EXPOSE 15001 9464
ENTRYPOINT ["/usr/local/bin/interceptor"]
CMD ["run", "--policy", "/etc/interceptor/policy/policy.yaml", "--dev-ca-dir", "/var/lib/interceptor/dev-ca"]
