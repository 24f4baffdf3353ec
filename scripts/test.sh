#!/usr/bin/env bash
# The whole test suite, services included: starts a throw-away PostgreSQL,
# installs the pinned Kafka-protocol broker the Kafka tests start and the
# pinned LiteLLM proxy the gateway integration's tests start, the pinned
# Standard Webhooks library deliveries are verified with, and the
# chromium the console's browser test drives,
# builds everything, runs every test of the workspace, stops the services.
# Extra arguments go to `cargo test` (e.g. a test name filter).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/services.sh
trap stop_services EXIT

start_postgres
install_tansu
install_promtool
install_litellm
install_kafka_python
install_openapi_tools
install_standardwebhooks
install_chromium
# Tests that need a service fail instead of skipping when it is missing.
export TALLY_REQUIRE_SERVICES=1
# No core files: a test that deletes the usage topic under a running tally
# expects librdkafka to crash it on the pinned broker (see tests/tests/kafka.rs);
# each core would be a gigabyte in tests/.
ulimit -c 0

log "building"
cargo build --workspace --all-targets --locked
export TALLY_BIN="$(pwd)/target/debug/tally"
log "testing"
cargo test --workspace --locked "$@"
if [ $# -eq 0 ]; then
  log "benchmarks, once each in quick mode (figures: cargo bench)"
  cargo test --workspace --locked --benches
fi
