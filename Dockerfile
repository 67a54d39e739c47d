# Hubline: web app and worker in one image. Run the web app with the default command;
# run workers with `docker run --no-healthcheck --entrypoint hubline hubline worker` (a
# worker serves no HTTP for the health check to ask). Each web container runs `hubline
# migrate` as it starts; any number may at once (they take turns on PostgreSQL), and
# each waits up to a minute for a database started alongside it to come up.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --system hubline && useradd --system --gid hubline --home-dir /srv/hubline hubline

WORKDIR /srv/hubline
COPY pyproject.toml README.md ./
COPY app ./app
COPY migrations ./migrations
# Installed as a wheel is: templates and migrations ship inside the package. The sources
# go once installed, so nothing imports them from the working directory by mistake.
RUN pip install . && rm -rf app migrations build *.egg-info pyproject.toml README.md \
    && chown -R hubline:hubline /srv/hubline

USER hubline
# The port the web app listens on: set PORT (not --port), so the health check asks there too.
ENV PORT=8000
EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD python -c "import os,sys,urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ['PORT'], timeout=4).status == 200 else 1)"

ENTRYPOINT ["/bin/sh", "-c", "hubline migrate --wait 60 && exec hubline serve --host 0.0.0.0 --port \"$PORT\" \"$@\"", "--"]
