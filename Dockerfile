# One image for every Cube component: `cube serve <service>`, `cube serve gateway` or `cube up`.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p cube

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 cube
COPY --from=build /src/target/release/cube /usr/local/bin/cube
USER cube
ENTRYPOINT ["/usr/local/bin/cube"]
