# fedota OTA update server: FastAPI + SQLAlchemy + TUF repository. No torch at run time:
# the server imports only server/ota, delta_packager and protocol (enforced by
# import-linter), so the image installs the project without its ML dependencies.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /opt/fedota

COPY docker/ota-requirements.txt /tmp/ota-requirements.txt
RUN pip install -r /tmp/ota-requirements.txt

COPY pyproject.toml README.md ./
COPY fedota ./fedota
COPY server ./server
COPY client ./client
COPY delta_packager ./delta_packager
COPY protocol ./protocol
COPY simulation ./simulation
RUN pip install --no-deps .

RUN useradd --system --uid 10001 fedota && mkdir -p /data/blobs && chown -R fedota /data
USER fedota
EXPOSE 8080
VOLUME ["/data"]

HEALTHCHECK --interval=10s --timeout=3s --retries=5 \
  CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz').status == 200 else 1)"

# Secrets come from the environment (FEDOTA_OTA_ADMIN_KEY, ..._OPERATOR_KEY,
# ..._PUBLISHER_KEY, ..._ENROLLMENT_SECRET); there are no defaults outside --dev.
ENTRYPOINT ["fedota", "serve"]
CMD ["--database-url", "sqlite:////data/ota.db", "--storage", "/data/blobs", \
     "--trusted-root", "/keys/root.json", "--snapshot-key", "/keys/private/snapshot.pem", \
     "--timestamp-key", "/keys/private/timestamp.pem", "--host", "0.0.0.0", "--port", "8080", \
     "--migrate"]
