# A Flower node running fedota: the SuperNode image (the fedota ClientApp trains on the
# device's local data) and, with another command, the SuperLink. CPU build of torch,
# installed first and pinned, as on the project's machines.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /opt/fedota

RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY fedota ./fedota
COPY server ./server
COPY client ./client
COPY delta_packager ./delta_packager
COPY protocol ./protocol
COPY simulation ./simulation
# The train extra: torch, transformers, bitsandbytes, PEFT, Opacus and Flower (pyproject.toml).
RUN pip install '.[train]'

RUN useradd --system --uid 10001 fedota && mkdir -p /data && chown -R fedota /data
USER fedota
VOLUME ["/data"]

HEALTHCHECK --interval=15s --timeout=5s --retries=5 \
  CMD python -c "import flwr, client.client_app"

ENTRYPOINT ["flower-supernode"]
CMD ["--superlink", "superlink:9092", "--root-certificates", "/certs/ca.crt", \
     "--auth-supernode-private-key", "/keys/supernode"]
