#!/usr/bin/env bash
# Every end-to-end benchmark of `tally bench`, the Kafka one included: starts
# a throw-away PostgreSQL and the pinned Tansu broker (as scripts/test.sh
# does), builds the release binary, runs `tally bench all` against them and
# stops them. Figures go to stdout; see docs/performance.md.
# Extra arguments go to `tally bench all` (e.g. --quick).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/services.sh
_broker_pid=""
cleanup() {
  [ -n "$_broker_pid" ] && kill "$_broker_pid" 2>/dev/null || true
  stop_services
}
trap cleanup EXIT

start_postgres
install_tansu
port="$(free_port)"
log "starting Tansu on 127.0.0.1:$port"
"$TALLY_TEST_TANSU_BIN" broker --storage-engine memory://tansu/ \
  --listener-url "tcp://127.0.0.1:$port" --advertised-listener-url "tcp://127.0.0.1:$port" \
  > "$TALLY_SERVICES_DIR/bench-broker.log" 2>&1 &
_broker_pid=$!
for _ in $(seq 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
  sleep 0.1
done
pg_port="${TALLY_TEST_POSTGRES_URL##*:}"
as_pg "$PG_BIN/createdb" -h 127.0.0.1 -p "${pg_port%%/*}" -U tally tally_bench
db="${TALLY_TEST_POSTGRES_ADMIN_URL%/postgres}/tally_bench"

log "building (release)"
cargo build --release --locked -p tally
target/release/tally bench all --kafka-brokers "127.0.0.1:$port" --database-url "$db" "$@"
