#!/usr/bin/env bash
# Runs the whole test suite against real Postgres and Redis.
#
# Uses DATABASE_URL / REDIS_URL when given. Otherwise it uses the local servers on their
# default ports: it starts them when they are installed but stopped, and installs them with
# apt-get when they are missing and this runs as root. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\033[1m[test.sh]\033[0m %s\n' "$*" >&2; }
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
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

pg_up() { pg_isready -q -h 127.0.0.1 -p 5432; }

ensure_postgres() {
    if [[ -n ${DATABASE_URL:-} ]]; then
        log "using DATABASE_URL from the environment"
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
            local version
            version=$(ls /etc/postgresql | sort -V | tail -n1)
            log "starting PostgreSQL $version"
            pg_ctlcluster --skip-systemctl-redirect "$version" main start ||
                die "could not start PostgreSQL $version"
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

redis_up() { redis-cli -h 127.0.0.1 -p 6379 ping | grep -q PONG; }

ensure_redis() {
    if [[ -n ${REDIS_URL:-} ]]; then
        log "using REDIS_URL from the environment"
        return
    fi
    export REDIS_URL="redis://127.0.0.1:6379"
    command -v redis-server >/dev/null || apt_install redis-server
    if ! redis_up; then
        log "starting Redis"
        redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null
        wait_for 30 redis_up || die "Redis did not answer PING within 30 s"
    fi
}

ensure_postgres
ensure_redis
export CQRS_REQUIRE_SERVICES=1
log "DATABASE_URL=$DATABASE_URL REDIS_URL=$REDIS_URL CQRS_REQUIRE_SERVICES=1"

cargo test --workspace "$@"
# Benches compile and run once each in test mode; timings are never asserted.
cargo test --workspace --benches "$@"
# The helpdesk's HTTP and WebSocket contract once more, on Postgres + Redis (each test server in
# its own schema and Redis prefix).
HELPDESK_TEST_BACKEND=postgres cargo test -p helpdesk --test it "$@"
