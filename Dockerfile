# The lesionlab prediction service on CPU: ONNX Runtime inference behind FastAPI + uvicorn.
#   docker build -t lesionlab .
#   docker run -p 8000:8000 lesionlab                                   # the bundled default model
#   docker run -p 8000:8000 -v $PWD/runs/my-run:/model:ro -e LESIONLAB_MODEL=/model lesionlab
# Auth: -e LESIONLAB_API_TOKENS=token1,token2 (or mount a file and set LESIONLAB_API_TOKENS_FILE).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app

COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install . && useradd --create-home --uid 10001 lesionlab

USER lesionlab
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=3s --start-period=60s \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health/ready', timeout=2)" || exit 1
CMD ["lesionlab", "serve", "--host", "0.0.0.0", "--port", "8000", "--workers", "1"]
