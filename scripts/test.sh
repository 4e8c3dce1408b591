#!/usr/bin/env bash
# Runs the whole test suite against real Postgres and Redis.
#
# Uses DATABASE_URL / REDIS_URL when given. Otherwise it uses the local servers on their
# default ports: it starts them when they are installed but stopped, and installs them with
# apt-get when they are missing and this runs as root. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

# No psql connection waits for ever on a host that drops packets.
export PGCONNECT_TIMEOUT=${PGCONNECT_TIMEOUT:-10}
# A locale every system has: Debian's postgresql package creates its cluster in the caller's
# locale, and fails to (apt-get still succeeding) when that one is not installed, as an ssh
# client's LANG often is not.
# Not `locale -a | grep -q`: grep stops at the first match, and with `pipefail` the SIGPIPE
# `locale` then gets fails the test on a machine with many locales.
if grep -qixE 'c\.utf-?8' < <(locale -a 2>/dev/null); then
    export LC_ALL=C.UTF-8
else
    export LC_ALL=C
fi
# Where a run as root keeps the password it gave the local postgres role.
PG_PASSWORD_FILE=${XDG_STATE_HOME:-${HOME:-/root}/.local/state}/cqrs-test/postgres-password

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
        # `Lock::Timeout` does not cover the package lists' lock, which a first boot's own
        # `apt-get update` holds: try again for up to 10 minutes.
        # Bounded by the clock, not by a count of tries: one failing try (a network that does
        # not answer) may itself take minutes.
        local since=$SECONDS
        until DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 update -qq </dev/null; do
            ((SECONDS - since < 600)) || die "apt-get update kept failing for 10 minutes (its error is above)"
            log "apt-get update failed (another apt may hold its lock); trying again in 10 s"
            sleep 10
        done
        APT_UPDATED=1
    fi
    # Never a prompt (a changed config file of an upgraded dependency would otherwise stop
    # the run until the stage's timeout): keep the local version.
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
        install -y -qq "$@" >/dev/null </dev/null
}

pg_up() { pg_isready -q -h 127.0.0.1 -p 5432; }

# Whether something accepts TCP connections on 127.0.0.1:$1 within 3 s (bash alone: the
# clients may be missing).
port_open() { timeout 3 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1"' _ "$1" 2>/dev/null; }

# Whether psql connects to $1 and answers a query, without ever prompting for a password.
psql_ok() { psql -w "$1" -tAc "SELECT 1" >/dev/null 2>&1 </dev/null; }

ensure_postgres() {
    if [[ -n ${DATABASE_URL:-} ]]; then
        log "using DATABASE_URL from the environment"
        # Checked here, so a wrong URL is one clear line instead of every test failing.
        # Tried without its query too: cqrs-postgres takes parameters libpq refuses
        # (`statement-cache-capacity`), which psql would fail on.
        if command -v psql >/dev/null && ! psql_ok "$DATABASE_URL" && ! psql_ok "${DATABASE_URL%%\?*}"; then
            die "cannot connect to DATABASE_URL ($(redact "$DATABASE_URL")): check that the server runs, the database exists and the credentials are right"
        fi
        return
    fi
    export DATABASE_URL="postgres://postgres@127.0.0.1:5432/test"
    # libpq (psql) and sqlx take defaults from PG* variables; inherited, they would send this
    # script's checks elsewhere or ask the local server for TLS or GSSAPI it does not have.
    # The password is kept: it may be the local server's.
    local variable
    for variable in $(compgen -e PG); do
        [[ $variable == PGCONNECT_TIMEOUT || $variable == PGPASSWORD ]] || unset "$variable"
    done
    local local_cluster=""
    ls /etc/postgresql/*/main/postgresql.conf >/dev/null 2>&1 && local_cluster=1
    if port_open 5432; then
        # A server already listens (a local cluster, or one in a container): only the client
        # is needed, and the server may still be starting.
        command -v psql >/dev/null || apt_install postgresql-client
        wait_for 60 pg_up || die "something listens on 127.0.0.1:5432, but PostgreSQL did not accept connections within 60 s"
    else
        if [[ -z $local_cluster ]]; then
            apt_install postgresql
            local_cluster=1
        fi
        if ! pg_up; then
            local version cluster
            # The cluster that listens on 5432: with two versions installed, Debian gives the
            # second one 5433. (Columns: version, cluster, port, ...)
            read -r version cluster < <(pg_lsclusters -h 2>/dev/null | awk '$3 == 5432 { print $1, $2; exit }') || true
            if [[ -z ${version:-} ]]; then
                # Clusters on other ports only: starting one would not serve 5432.
                local others
                others=$(pg_lsclusters -h 2>/dev/null | awk '{ printf "%s/%s on port %s (%s); ", $1, $2, $3, $4 }') || true
                [[ -z $others ]] || die "no PostgreSQL cluster is set to port 5432 (found: ${others%; }); start one and set DATABASE_URL to its port, or move one to 5432"
                version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n1) || true
                [[ -n $version ]] || die "PostgreSQL is installed but has no cluster (/etc/postgresql is empty); create one (pg_createcluster --start VERSION main) or set DATABASE_URL"
                cluster=main
            fi
            log "starting PostgreSQL $version/$cluster"
            # A cluster that is starting already (at boot) is refused as "already running",
            # and is then waited for like one this script started.
            pg_ctlcluster --skip-systemctl-redirect "$version" "$cluster" start ||
                pg_lsclusters -h 2>/dev/null | awk -v v="$version" -v c="$cluster" '$1 == v && $2 == c && $4 ~ /^online/ { found = 1 } END { exit !found }' ||
                die "could not start PostgreSQL $version/$cluster$([[ $(id -u) == 0 ]] || echo " (starting a cluster takes root: run this as root, or start it with sudo pg_ctlcluster $version $cluster start)")"
            wait_for 60 pg_up || die "PostgreSQL did not accept connections within 60 s"
        fi
    fi
    local admin="postgres://postgres@127.0.0.1:5432/postgres"
    if ! psql_ok "$admin"; then
        # Debian's package asks for a password on TCP. A run as root gives the postgres role a
        # random password, kept in a file only root can read ($PG_PASSWORD_FILE); later runs
        # as root use it. (A known password would make every local user a superuser.)
        # Passwords go to psql in PGPASSWORD, never in its arguments (which `ps` shows to
        # every user).
        local password=""
        if [[ -r $PG_PASSWORD_FILE ]] &&
            PGPASSWORD=$(<"$PG_PASSWORD_FILE") psql_ok "$admin"; then
            password=$(<"$PG_PASSWORD_FILE")
        elif PGPASSWORD=postgres psql_ok "$admin"; then
            password=postgres
            log "warning: the postgres role's password is \`postgres\` (an earlier version of this script set it): any local user can log in as a superuser; change it (ALTER USER postgres PASSWORD ...) and set DATABASE_URL"
        elif [[ $(id -u) == 0 && -n $local_cluster ]]; then
            password=$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')
            (umask 077 && mkdir -p "$(dirname "$PG_PASSWORD_FILE")" &&
                printf '%s' "$password" >"$PG_PASSWORD_FILE") ||
                die "cannot write $PG_PASSWORD_FILE"
            log "giving the postgres role a random password (kept in $PG_PASSWORD_FILE)"
            # Over the local cluster's socket: the server on 5432 may be another one (in a
            # container), and this cluster stopped. `-w`, and the statement on stdin (not in
            # the arguments): a password prompt here would stop the run, not fail it.
            printf "ALTER USER postgres PASSWORD '%s';\n" "$password" |
                su postgres -c "psql -w -q" >/dev/null ||
                die "cannot connect to PostgreSQL on 127.0.0.1:5432 as postgres without a password, nor set one through the local cluster; set DATABASE_URL (postgres://USER:PASSWORD@127.0.0.1:5432/test)"
        else
            die "cannot connect to PostgreSQL on 127.0.0.1:5432 as postgres without a password; set DATABASE_URL (postgres://USER:PASSWORD@127.0.0.1:5432/test)"
        fi
        export PGPASSWORD=$password
        # The tests' URL carries it (their environment is their own user's to read).
        export DATABASE_URL="postgres://postgres:$password@127.0.0.1:5432/test"
        psql_ok "$admin" || die "cannot connect to PostgreSQL on 127.0.0.1:5432 as postgres; set DATABASE_URL"
    fi
    local exists
    exists=$(psql -w "$admin" -tAc "SELECT 1 FROM pg_database WHERE datname = 'test'" </dev/null)
    if [[ $exists != 1 ]]; then
        log "creating database test"
        # Another run may create it meanwhile (Postgres then says "already exists", or, when
        # the two overlap, a duplicate key): that is as good.
        local created
        # UTF-8 whatever the cluster's default (one created without a locale is SQL_ASCII).
        if ! created=$(psql -w "$admin" -q -c "CREATE DATABASE test TEMPLATE template0 ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C'" 2>&1 </dev/null) &&
            [[ $(psql -w "$admin" -tAc "SELECT 1 FROM pg_database WHERE datname = 'test'" </dev/null) != 1 ]]; then
            die "could not create database test: $created"
        fi
    fi
}

# One RESP command to 127.0.0.1:6379 (bash alone: redis-cli may be missing); prints the
# reply's lines (a bulk reply: until its announced length is read), or nothing when no server
# answers within 3 s.
redis_ask() {
    timeout 3 bash -c '
        exec 3<>/dev/tcp/127.0.0.1/6379 || exit 0
        printf "%s\r\n" "$1" >&3
        IFS= read -r line <&3 || exit 0
        line=${line%$'"'"'\r'"'"'}
        printf "%s\n" "$line"
        [[ $line == \$* ]] || exit 0
        left=${line#\$}
        while ((left > 0)) && IFS= read -r line <&3; do
            left=$((left - ${#line} - 1))
            printf "%s\n" "${line%$'"'"'\r'"'"'}"
        done
    ' _ "$1" 2>/dev/null || true
}

redis_up() { [[ $(redis_ask PING) == +PONG* ]]; }

# Installs packages without starting their services: a server may already listen on their
# port (in a container, say), and the service would fail to bind it.
install_without_service() {
    local policy=/usr/sbin/policy-rc.d created=""
    if [[ ! -e $policy ]]; then
        # Debian's way of telling a package's scripts not to start its service.
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod +x "$policy"
        created=1
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    apt_install "$@"
    if [[ -n $created ]]; then
        rm -f "$policy"
        trap - EXIT
    fi
}

# The redis-server binary (four Redis tests and one helpdesk test run servers of their own).
install_redis_server() {
    [[ $(id -u) == 0 ]] || die "redis-server is not on PATH, and four Redis tests and one helpdesk test run servers of their own: install it (apt-get install redis-server), or run as root so this script can"
    install_without_service redis-server
}

# The redis-server on PATH runs the tests' own servers, which cqrs-redis refuses below 7.0:
# said here, not as four tests failing late (a REDIS_URL to a Redis 7 beside a distribution's
# 6.x package).
check_redis_server_binary() {
    local version
    version=$(redis-server --version 2>/dev/null | sed -n 's/.* v=\([0-9.]*\).*/\1/p') || true
    [[ -n $version ]] || die "could not read the version of $(command -v redis-server) (redis-server --version gave none)"
    if ((${version%%.*} < 7)); then
        die "$(command -v redis-server) is $version; four Redis tests and one helpdesk test run servers of their own, and cqrs-redis needs 7.0 or later: install Redis 7 (Debian 12's package, or packages.redis.io) and put it first on PATH"
    fi
}

ensure_redis() {
    # Every Redis test needs the server; four also run redis-servers of their own (to stop
    # and restart one, to fill one, to demote one), and so does one helpdesk test (to take
    # Redis away), so the binary must be on PATH even with REDIS_URL.
    if [[ -n ${REDIS_URL:-} ]]; then
        log "using REDIS_URL from the environment"
        command -v redis-server >/dev/null || install_redis_server
        check_redis_server_binary
        return
    fi
    export REDIS_URL="redis://127.0.0.1:6379"
    command -v redis-server >/dev/null || install_redis_server
    check_redis_server_binary
    if ! redis_up; then
        if [[ $(redis_ask PING) == -NOAUTH* ]]; then
            die "the Redis on 127.0.0.1:6379 requires a password; set REDIS_URL (redis://:PASSWORD@127.0.0.1:6379)"
        fi
        log "starting Redis"
        # A daemonized Redis logs nowhere unless told: keep its log to show why it did not start.
        local redis_log
        redis_log=$(mktemp)
        # `--dir`: nothing it might write (a SAVE) lands in the checkout.
        redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
            --dir "${TMPDIR:-/tmp}" --logfile "$redis_log" >/dev/null
        if ! wait_for 30 redis_up; then
            cat "$redis_log" >&2 || true
            die "Redis did not answer PING within 30 s (its log is above)"
        fi
    fi
    # cqrs-redis needs Redis 7.0 (older distributions ship 6.x).
    # It answered PING; on a loaded machine INFO may still miss `redis_ask`'s 3 s: a few tries,
    # and no version at all fails the run rather than skip the check.
    local version="" _
    for _ in 1 2 3; do
        version=$(redis_ask "INFO server" | sed -n 's/^redis_version:\([0-9.]*\).*/\1/p') || true
        [[ -n $version ]] && break
        sleep 1
    done
    [[ -n $version ]] || die "could not read the version of the Redis on 127.0.0.1:6379 (INFO server gave none)"
    if ((${version%%.*} < 7)); then
        die "the Redis on 127.0.0.1:6379 is $version; cqrs-redis needs 7.0 or later: install Redis 7 (Debian 12's package, or packages.redis.io), or set REDIS_URL to one"
    fi
}

ensure_postgres
ensure_redis
export CQRS_REQUIRE_SERVICES=1
log "DATABASE_URL=$(redact "$DATABASE_URL") REDIS_URL=$(redact "$REDIS_URL") CQRS_REQUIRE_SERVICES=1"

# A package named among the arguments (`-p cqrs-redis`): its tests alone, once, against the
# services above (with `--workspace`, cargo would ignore the `-p`), with the package's own
# features: the adapters' TLS tests need `--features tls`, which the workspace run has on.
for argument in "$@"; do
    [[ $argument == -- ]] && break
    if [[ $argument == -p || $argument == -p?* || $argument == --package || $argument == --package=* ]]; then
        exec cargo test "$@"
    fi
done
cargo test --workspace "$@"
# The criterion benches compile and run once each in test mode; timings are never asserted.
# `--bench '*'`, not `--benches`: that also picks every library and binary (`bench = true` by
# default) and would run all their unit tests a second time. Criterion's command line takes
# none of libtest's flags (`--test-threads`, `--skip`): after `--`, only filters go on to it.
bench_args=()
after_dashes="" skip_value=""
for argument in "$@"; do
    if [[ -z $after_dashes ]]; then
        bench_args+=("$argument")
        [[ $argument == -- ]] && after_dashes=1
    elif [[ -n $skip_value ]]; then
        skip_value=""
    elif [[ $argument == --skip || $argument == --test-threads || $argument == --format || $argument == --color || $argument == --logfile || $argument == -Z ]]; then
        skip_value=1
    elif [[ $argument != -* ]]; then
        bench_args+=("$argument")
    fi
done
cargo test --workspace --bench '*' ${bench_args[@]+"${bench_args[@]}"}
# The helpdesk's HTTP and WebSocket contract once more, on Postgres + Redis (each test server in
# its own schema and Redis prefix). Without arguments (CI), the test binary the first run built
# is run again as it is: `cargo test -p helpdesk` would resolve features for that package alone
# and rebuild half the tree (two minutes on two cores). With arguments (a filter, flags), cargo
# runs it, so they mean what they meant above.
helpdesk_it=""
if (($# == 0)); then
    helpdesk_it=$(cargo test --workspace --no-run --message-format=json 2>/dev/null |
        grep '"manifest_path":"[^"]*/examples/helpdesk/Cargo.toml"' | grep '"name":"it"' |
        sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | head -n1) || true
fi
if [[ -n $helpdesk_it ]]; then
    log "the helpdesk's tests on Postgres + Redis: $helpdesk_it"
    (cd examples/helpdesk && HELPDESK_TEST_BACKEND=postgres "$helpdesk_it")
else
    if (($# == 0)); then
        log "warning: the helpdesk's test binary was not found in cargo's output; building it by itself (about two minutes)"
    fi
    HELPDESK_TEST_BACKEND=postgres cargo test -p helpdesk --test it "$@"
fi
