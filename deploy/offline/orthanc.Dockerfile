# Stand-in for jodogne/orthanc: Debian bookworm's orthanc package (1.10.1), the
# version the tests and the local stack run. Same entry as the official image:
# the compose file passes the config path as the command.
ARG BASE
FROM ${BASE}
RUN install -d /var/lib/orthanc/db
ENTRYPOINT ["/usr/sbin/Orthanc"]
CMD ["/etc/orthanc/orthanc.json"]
