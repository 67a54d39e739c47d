# Throwaway PostgreSQL server, shared by the commands that need one (source this file).
#
#   source scripts/postgres.sh
#   start_throwaway_postgres "$python"   # exports THROWAWAY_POSTGRES_URL (an admin URL)
#   ...                                  # the server stops, and its folder goes, at exit
#
# The same recipe as scripts/test: Debian's postgresql (installed with apt-get when
# missing), initdb into a temporary folder as the `postgres` user when running as root
# (initdb and postgres refuse root), a free port on 127.0.0.1, durability off (a
# throwaway cluster; THROWAWAY_PG_DURABLE=1 keeps it on), and an EXIT trap that stops it even when the caller fails.

_pg_as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

_pg_bindir() {
  local bindir=""
  if command -v pg_config >/dev/null 2>&1; then bindir=$(pg_config --bindir); fi
  if [ -z "$bindir" ] || [ ! -x "$bindir/initdb" ]; then
    bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
  fi
  if [ -z "$bindir" ] || [ ! -x "$bindir/initdb" ]; then
    _pg_as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive _pg_as_root apt-get install -y -qq postgresql >/dev/null
    bindir=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
  fi
  printf '%s' "$bindir"
}

# start_throwaway_postgres PYTHON: start the server; export THROWAWAY_POSTGRES_URL and
# THROWAWAY_PG_BINDIR, THROWAWAY_PG_DATA, THROWAWAY_PG_OPTIONS, THROWAWAY_PG_USER.
start_throwaway_postgres() {
  local python=${1:-python3}
  THROWAWAY_PG_BINDIR=$(_pg_bindir)
  _pg_dir=$(mktemp -d /tmp/hubline-pg.XXXXXX)
  local port user
  user=$(id -un)
  port=$("$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  _pg_run() { "$@"; }
  if [ "$(id -u)" = 0 ]; then
    user=postgres
    id postgres >/dev/null 2>&1 || useradd --system --home-dir /var/lib/postgresql --shell /bin/sh postgres
    chown postgres "$_pg_dir"
    _pg_run() { runuser -u postgres -- "$@"; }
  fi
  trap stop_throwaway_postgres EXIT
  _pg_run "$THROWAWAY_PG_BINDIR/initdb" -D "$_pg_dir/data" -U "$user" -A trust -E UTF8 --no-instructions >/dev/null
  local durability="-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
  # THROWAWAY_PG_DURABLE=1 (reliability/run): commits must survive an immediate stop.
  if [ "${THROWAWAY_PG_DURABLE:-0}" = 1 ]; then durability=""; fi
  THROWAWAY_PG_OPTIONS="-p $port -k $_pg_dir -c listen_addresses=127.0.0.1 -c max_connections=400 $durability"
  _pg_run "$THROWAWAY_PG_BINDIR/pg_ctl" -D "$_pg_dir/data" -l "$_pg_dir/server.log" -w -t 60 \
    -o "$THROWAWAY_PG_OPTIONS" start >/dev/null
  THROWAWAY_PG_DATA="$_pg_dir/data"
  # The user that runs the server's tools (tests that stop and restart it need it).
  THROWAWAY_PG_USER=$([ "$(id -u)" = 0 ] && echo postgres || true)
  export THROWAWAY_POSTGRES_URL="postgresql+asyncpg://$user@127.0.0.1:$port/postgres"
  export THROWAWAY_PG_BINDIR THROWAWAY_PG_DATA THROWAWAY_PG_OPTIONS THROWAWAY_PG_USER
  echo "PostgreSQL $("$THROWAWAY_PG_BINDIR/postgres" --version | awk '{print $3}') on port $port"
}

stop_throwaway_postgres() {
  if [ -n "${_pg_dir:-}" ] && [ -f "$_pg_dir/data/postmaster.pid" ]; then
    _pg_run "$THROWAWAY_PG_BINDIR/pg_ctl" -D "$_pg_dir/data" -m immediate -w stop >/dev/null 2>&1 || true
  fi
  if [ -n "${_pg_dir:-}" ]; then rm -rf "$_pg_dir"; fi
  _pg_dir=""
  return 0
}
