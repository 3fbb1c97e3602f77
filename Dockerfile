# Edge access-control gateway for model APIs.
#   docker build -t model-gateway .
#   docker run -p 8080:8080 -e UPSTREAM_API_KEY=... -e GATEWAY_ADMIN_TOKEN=... model-gateway
# Config is read from /etc/gateway (mount a ConfigMap / volume there to replace the example).
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin gateway
COPY --from=build /install /usr/local
COPY config/gateway.yaml config/policy.yaml /etc/gateway/
# The example config names ../geo/demo/*.mmdb relative to itself: the demo databases go there.
# Production configs name their own databases (e.g. /var/lib/GeoIP, kept fresh by geoipupdate).
COPY geo/demo/*.mmdb /etc/geo/demo/
ENV GATEWAY_CONFIG=/etc/gateway/gateway.yaml \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
EXPOSE 8080 9090
# /healthz is on the admin listener; the example binds it to 127.0.0.1, which the check reaches
# from inside the container.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9090/healthz', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["gateway"]
CMD ["run", "--config", "/etc/gateway/gateway.yaml"]
