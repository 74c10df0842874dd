FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    MODEL_DIR=/data \
    PROMPTS_DIR=/app/prompts

WORKDIR /app
RUN useradd --create-home --uid 1000 app \
    && mkdir -p /data \
    && chown app:app /data

COPY pyproject.toml README.md ./
COPY backend ./backend
COPY model.py ./
COPY prompts ./prompts
RUN pip install --no-cache-dir .

USER app
VOLUME ["/data"]
EXPOSE 9090

HEALTHCHECK --interval=30s --timeout=3s --start-period=10s --retries=3 \
    CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9090/health', timeout=2).status == 200 else 1)"

CMD ["llm-ner", "serve", "--host", "0.0.0.0", "--port", "9090", "--workers", "2"]
