#!/usr/bin/env bash
# Runs the whole test suite against real Postgres and Redis.
#
# Uses DATABASE_URL / REDIS_URL when given. Otherwise it uses the local servers on their
# default ports: it starts them when they are installed but stopped, and installs them with
# apt-get when they are missing and this runs as root. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\033[1m[test.sh]\033[0m %s\n' "$*" >&2; }
# A URL with its password (user info) hidden, for the log.
redact() { sed -E 's#//[^@/]*@#//***@#' <<<"$1"; }
die() { log "error: $*"; exit 1; }

# Waits until a command succeeds, for at most $1 seconds.
wait_for() {
    local deadline=$((SECONDS + $1)); shift
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        sleep 0.5
    done
}

apt_install() {
    [[ $(id -u) == 0 ]] || die "$* is not installed; install it, or run as root so this script can apt-get it"
    command -v apt-get >/dev/null || die "$* is not installed and apt-get is not available"
    log "installing $* with apt-get"
    if [[ -z ${APT_UPDATED:-} ]]; then
        # A fresh VM's unattended upgrades may hold the dpkg lock for a while: wait for it.
        DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 update -qq
        APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq "$@" >/dev/null
}

pg_up() { pg_isready -q -h 127.0.0.1 -p 5432; }

ensure_postgres() {
    if [[ -n ${DATABASE_URL:-} ]]; then
        log "using DATABASE_URL from the environment"
        # Checked here, so a wrong URL is one clear line instead of every test failing.
        if command -v psql >/dev/null &&
            ! psql -w "$DATABASE_URL" -tAc "SELECT 1" >/dev/null 2>&1 </dev/null; then
            die "cannot connect to DATABASE_URL ($(redact "$DATABASE_URL")): check that the server runs, the database exists and the credentials are right"
        fi
        return
    fi
    export DATABASE_URL="postgres://postgres@127.0.0.1:5432/test"
    local fresh_install=""
    if ! { command -v pg_isready >/dev/null && pg_up; }; then
        if ! ls /etc/postgresql/*/main/postgresql.conf >/dev/null 2>&1; then
            apt_install postgresql
            fresh_install=1
        fi
        if ! pg_up; then
            local version cluster
            # The cluster that listens on 5432: with two versions installed, Debian gives the
            # second one 5433. (Columns: version, cluster, port, ...)
            read -r version cluster < <(pg_lsclusters -h 2>/dev/null | awk '$3 == 5432 { print $1, $2; exit }') || true
            if [[ -z ${version:-} ]]; then
                version=$(ls /etc/postgresql | sort -V | tail -n1)
                cluster=main
            fi
            log "starting PostgreSQL $version/$cluster"
            pg_ctlcluster --skip-systemctl-redirect "$version" "$cluster" start ||
                die "could not start PostgreSQL $version/$cluster"
            wait_for 60 pg_up || die "PostgreSQL did not accept connections within 60 s"
        fi
    fi
    if [[ -n $fresh_install ]] || ! psql -w "${DATABASE_URL%/test}/postgres" -tAc "SELECT 1" >/dev/null 2>&1 </dev/null; then
        # Debian's package asks for a password on TCP (also when it was installed before and
        # only stopped): give the postgres role one, as root.
        [[ $(id -u) == 0 ]] || die "cannot connect to PostgreSQL as postgres without a password; set DATABASE_URL"
        su postgres -c "psql -q -c \"ALTER USER postgres PASSWORD 'postgres'\"" >/dev/null
        export DATABASE_URL="postgres://postgres:postgres@127.0.0.1:5432/test"
    fi
    if ! psql "${DATABASE_URL%/test}/postgres" -tAc "SELECT 1 FROM pg_database WHERE datname = 'test'" | grep -q 1; then
        log "creating database test"
        psql "${DATABASE_URL%/test}/postgres" -q -c "CREATE DATABASE test" >/dev/null
    fi
}

redis_up() { redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; }

ensure_redis() {
    if [[ -n ${REDIS_URL:-} ]]; then
        log "using REDIS_URL from the environment"
        return
    fi
    export REDIS_URL="redis://127.0.0.1:6379"
    command -v redis-server >/dev/null || apt_install redis-server
    if ! redis_up; then
        if redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q NOAUTH; then
            die "the Redis on 127.0.0.1:6379 requires a password; set REDIS_URL (redis://:PASSWORD@127.0.0.1:6379)"
        fi
        log "starting Redis"
        # A daemonized Redis logs nowhere unless told: keep its log to show why it did not start.
        local redis_log
        redis_log=$(mktemp)
        redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
            --logfile "$redis_log" >/dev/null
        if ! wait_for 30 redis_up; then
            cat "$redis_log" >&2 || true
            die "Redis did not answer PING within 30 s (its log is above)"
        fi
    fi
}

ensure_postgres
ensure_redis
export CQRS_REQUIRE_SERVICES=1
log "DATABASE_URL=$(redact "$DATABASE_URL") REDIS_URL=$(redact "$REDIS_URL") CQRS_REQUIRE_SERVICES=1"

cargo test --workspace "$@"
# Benches compile and run once each in test mode; timings are never asserted.
cargo test --workspace --benches "$@"
# The helpdesk's HTTP and WebSocket contract once more, on Postgres + Redis (each test server in
# its own schema and Redis prefix).
HELPDESK_TEST_BACKEND=postgres cargo test -p helpdesk --test it "$@"
