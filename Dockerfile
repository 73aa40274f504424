# lstm-serve: the gRPC server with the default model, configured through LSTM_SERVE_* variables.
#   docker build -t lstm-serve .    (docker compose up builds it too; see docs/deploy.md)
FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/lstm-serve \
    PATH=/opt/lstm-serve/bin:$PATH
RUN python -m venv /opt/lstm-serve

# The project as wheels (the client distribution, clients/python, and the server) and the server's
# dependency list less the client, with the loadtest and tracing extras, made where the source is; only these go on.
FROM base AS wheel
WORKDIR /src
COPY . .
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(d for d in p['dependencies'] + p['optional-dependencies']['loadtest'] \
+ p['optional-dependencies']['tracing'] if not d.startswith('lstm-stream-client')))" > /requirements.txt \
 && pip wheel --no-cache-dir --no-deps --wheel-dir /wheels ./clients/python .

FROM base
# Dependencies first, in their own layer, keyed on the dependency list alone: a change to the source,
# or to anything else in pyproject.toml, reuses it. (All come as wheels: no compiler, no headers, no
# pip cache left in the image.)
COPY --from=wheel /requirements.txt /tmp/requirements.txt
RUN pip install --no-cache-dir --requirement /tmp/requirements.txt && rm /tmp/requirements.txt
# Then the project itself, client and server (the default model is package data inside the server).
# COPY, not RUN --mount: a COPY's cache key is the wheel's content on every builder (buildah reuses a
# RUN --mount layer after the mounted wheel changed); the wheels left in that layer are about 1.6 MB.
COPY --from=wheel /wheels /tmp/wheels
RUN pip install --no-cache-dir --no-deps /tmp/wheels/*.whl && rm -rf /tmp/wheels

RUN groupadd --system --gid 10001 lstm \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/lstm --create-home --shell /usr/sbin/nologin lstm
USER 10001:10001
WORKDIR /home/lstm
# TensorFlow imports matplotlib when it is installed (it is: lstm-loadtest's plots): build its font
# cache once here rather than at every container start.
RUN python -c "import matplotlib.font_manager"

ENV KERAS_BACKEND=tensorflow \
    TF_CPP_MIN_LOG_LEVEL=2 \
    LSTM_SERVE_HOST=0.0.0.0 \
    LSTM_SERVE_PORT=50051 \
    LSTM_SERVE_METRICS_PORT=9464 \
    LSTM_SERVE_HTTP_PORT=8000 \
    LSTM_SERVE_REDIS_URL=redis://redis:6379/0 \
    LSTM_SERVE_REDIS_AUTOSTART=false
# gRPC (native, Triton / KServe v2, health, reflection), HTTP/REST (KServe v2, native JSON) and Prometheus metrics.
EXPOSE 50051 8000 9464
# Start-up loads TensorFlow and warms the model up (tens of seconds on a small machine): only then is
# the health check expected to pass. It asks the server's own grpc.health.v1 service.
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-m", "server.healthcheck"]
# Arguments after the image name are lstm-serve flags; the empty CMD drops the base image's `python3`.
ENTRYPOINT ["lstm-serve"]
CMD []
