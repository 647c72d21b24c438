# Stand-in for python:3.11-slim-bookworm (deploy/Dockerfile's PYTHON_IMAGE) where no
# registry is reachable: Debian's own Python 3.11 from the debootstrap'd base.
ARG BASE
FROM ${BASE}
CMD ["python"]
