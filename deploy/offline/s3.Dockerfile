# Stand-in for MinIO: moto's S3 server from the wheelhouse (the tests' S3 server).
# It keeps objects in memory: a restart of this container empties the store.
ARG BASE
FROM ${BASE}
ARG PIP_INDEX_URL
ARG PIP_TRUSTED_HOST
RUN python3 -m venv /opt/moto \
 && /opt/moto/bin/pip install --no-cache-dir --disable-pip-version-check "moto[server]>=5.0"
ENV PATH=/opt/moto/bin:$PATH
ENTRYPOINT ["moto_server"]
CMD ["-H", "0.0.0.0", "-p", "9000"]
