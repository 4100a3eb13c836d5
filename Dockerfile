# syntax=docker/dockerfile:1
#
# Multi-stage build: compile in the Rust image, run the single static-ish binary (glibc only;
# rustls, no libpq, no OpenSSL) in distroless as a non-root user. Migrations are embedded.
#   docker build -t ledger:0.1.0 .
#   docker run -e DATABASE_URL=postgres://... -p 8080:8080 ledger:0.1.0

FROM rust:1.89-slim-bookworm AS build
WORKDIR /src
COPY . .
# Cache mounts keep the registry and the target directory between builds; the binary is
# copied out because the cache mount is not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin ledger \
    && cp target/release/ledger /usr/local/bin/ledger

# cc: glibc and libgcc, which the binary links; ca-certificates for sslmode=verify-* against
# a public CA. The nonroot variant runs as uid/gid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /usr/local/bin/ledger /usr/local/bin/ledger
ENV HOST=0.0.0.0 \
    PORT=8080 \
    RUST_LOG=info
EXPOSE 8080
USER 65532:65532
# SIGTERM starts the drain (readiness fails, requests still served), then a graceful stop.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/ledger"]
CMD ["serve"]
