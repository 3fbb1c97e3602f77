# Edge access-control gateway for model APIs. The image holds the gateway only: no config, no
# geo databases. Mount a directory with gateway.yaml (and the policy and geo files it names,
# relative to it) at /etc/gateway:
#   docker build -t model-gateway .
#   docker run -p 8080:8080 -v "$PWD/gateway-config:/etc/gateway:ro" \
#     -e UPSTREAM_API_KEY=... -e GATEWAY_ADMIN_TOKEN=... model-gateway
# The demo image adds the demo databases, the example config, the demo tool and its SDKs:
#   docker build --build-arg DEMO=1 -t model-gateway-demo . && docker run --rm model-gateway-demo
ARG DEMO=0

# --- build: a virtualenv at /opt/gateway ----------------------------------------------------
FROM python:3.11-slim AS build
ARG DEMO
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/gateway
# Dependencies first, hash-pinned from the lock (`make lock`): a change to the source reuses
# this layer and resolves nothing.
COPY requirements.lock requirements-demo.lock /tmp/lock/
RUN lock=/tmp/lock/requirements.lock; \
    if [ "$DEMO" = 1 ]; then lock=/tmp/lock/requirements-demo.lock; fi; \
    /opt/gateway/bin/pip install --require-hashes -r "$lock"
# Then the package alone: no dependency is resolved, and its build tools come from the lock.
COPY pyproject.toml README.md /src/
COPY gateway /src/gateway
RUN /opt/gateway/bin/pip install --no-deps --no-build-isolation /src

# --- the production image (default) -------------------------------------------------------
FROM python:3.11-slim AS image-0
RUN useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin gateway
COPY --from=build /opt/gateway /opt/gateway
ENV PATH=/opt/gateway/bin:$PATH \
    GATEWAY_CONFIG=/etc/gateway/gateway.yaml \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
EXPOSE 8080 9090
# /healthz is on the admin listener; a config that binds it to 127.0.0.1:9090 (the default) is
# reached from inside the container.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9090/healthz', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["gateway"]
# Without a mounted config this stops at once: "error: /etc/gateway/gateway.yaml: cannot read".
CMD ["run", "--config", "/etc/gateway/gateway.yaml"]

# --- the demo image (--build-arg DEMO=1): `make demo` against the stand-in upstream --------
FROM image-0 AS image-1
# The demo runs from a source-tree layout (its config names ../geo/demo/*.mmdb): the demo tool
# (tools/) and the tests' stand-in upstream it drives, neither of which is in the package; the
# gateway itself is the one installed above.
COPY --chown=10001:10001 config /opt/gateway-demo/config
COPY --chown=10001:10001 geo/demo /opt/gateway-demo/geo/demo
COPY --chown=10001:10001 tools /opt/gateway-demo/tools
COPY --chown=10001:10001 tests/__init__.py /opt/gateway-demo/tests/__init__.py
COPY --chown=10001:10001 tests/support/__init__.py tests/support/standin.py \
     /opt/gateway-demo/tests/support/
ENV PYTHONPATH=/opt/gateway-demo \
    GATEWAY_CONFIG=/opt/gateway-demo/config/gateway.yaml
WORKDIR /opt/gateway-demo
HEALTHCHECK NONE
ENTRYPOINT ["python", "-m", "tools"]
CMD ["demo"]

FROM image-${DEMO}
