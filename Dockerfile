# The Warden image: one image for every service (`warden run <service>`) and the CLI.
# Build: docker build -t warden:local .   (compose.yaml builds it for you)
FROM python:3.11-slim

# git: the applier's git effects and `warden agent exec` worktrees.
RUN apt-get update \
    && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
COPY schemas ./schemas
COPY ops ./ops
# Installed in place (editable): Warden finds ops/ (autonomy policy) and the dashboard's static
# files beside its sources. The otlp extra ships traces and metrics to the collector.
RUN pip install --no-cache-dir -e '.[otlp]'

RUN useradd --system --uid 10001 --home-dir /var/lib/warden --create-home warden
USER warden
ENV WARDEN_DATA_DIR=/var/lib/warden \
    PYTHONUNBUFFERED=1

CMD ["warden", "--help"]
