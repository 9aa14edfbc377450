# Multi-stage build: compile with the Rust toolchain, ship only the binary on a slim base.
# No protoc is needed: build.rs compiles the protos with a pure-Rust compiler.
FROM rust:1.89-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
COPY migrations migrations
COPY src src
# A workspace member: cargo needs its manifest even to build only the service.
COPY bench bench
RUN cargo build --release --locked -p krisp-ingest --bin krisp-ingest \
    && strip target/release/krisp-ingest

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home krisp
COPY --from=build /src/target/release/krisp-ingest /usr/local/bin/krisp-ingest
USER krisp
# In a container the service must listen beyond loopback to be reachable.
ENV KRISP_LISTEN=0.0.0.0:50051
EXPOSE 50051
ENTRYPOINT ["krisp-ingest"]
CMD ["serve"]
