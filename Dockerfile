# The backend alone; docker-compose.yml runs it next to Label Studio.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MODEL_DIR=/data \
    PROMPTS_DIR=/app/prompts \
    WORKERS=2

WORKDIR /app
RUN useradd --create-home --uid 1000 app \
    && mkdir -p /data \
    && chown 1000:1000 /data

# prompts last: editing a template does not reinstall the package
# dependencies from the lock (requirements/backend.txt is uv.lock exported by `make lock`), then the project alone
COPY requirements/backend.txt ./requirements/
RUN pip install --no-cache-dir --require-hashes -r requirements/backend.txt
COPY pyproject.toml README.md LICENSE ./
COPY backend ./backend
COPY model.py ./
RUN pip install --no-cache-dir --no-deps .
COPY prompts ./prompts

USER 1000
VOLUME ["/data"]
EXPOSE 9090

HEALTHCHECK --interval=30s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:9090/health', timeout=2).status != 200)"]

# shell form would lose SIGTERM; exec form with sh -c keeps WORKERS configurable and exec hands over PID 1
CMD ["sh", "-c", "exec llm-ner serve --host 0.0.0.0 --port 9090 --workers \"$WORKERS\""]
