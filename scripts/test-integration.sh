#!/usr/bin/env bash
# The integration tier: the same pipeline tests, on a real Kafka-protocol broker (tansu), a real
# PostgreSQL and an S3-compatible server (s3s-fs), all started here in a temp folder and stopped
# on exit.
#   scripts/test-integration.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/tansu.sh install
scripts/postgres.sh install
scripts/s3.sh install

work=$(mktemp -d /tmp/payerx-it.XXXXXX)
chmod 755 "$work"
cleanup() {
    scripts/tansu.sh stop "$work" || true
    scripts/postgres.sh stop "$work" || true
    scripts/s3.sh stop "$work" || true
    rm -rf "$work"
}
trap cleanup EXIT

PAYERX_TEST_KAFKA_BROKERS=$(scripts/tansu.sh start "$work")
PAYERX_TEST_DATABASE_URL=$(scripts/postgres.sh start "$work")
PAYERX_TEST_S3_ENDPOINT=$(scripts/s3.sh start "$work")
export PAYERX_TEST_KAFKA_BROKERS PAYERX_TEST_DATABASE_URL PAYERX_TEST_S3_ENDPOINT
# The blob store's S3 client takes its credentials the usual AWS way; these match scripts/s3.sh.
export AWS_ACCESS_KEY_ID=payerx AWS_SECRET_ACCESS_KEY=payerx-secret AWS_REGION=us-east-1
echo "integration tier: Kafka protocol at $PAYERX_TEST_KAFKA_BROKERS (tansu), $PAYERX_TEST_DATABASE_URL, S3 at $PAYERX_TEST_S3_ENDPOINT (s3s-fs)" >&2

# Only the tests marked for the integration tier (they are #[ignore]d in the embedded tier).
python3 -c "import fastavro" 2>/dev/null || pip install --quiet fastavro
# The SMART launch in a real headless browser (tests/tests/browser.rs): Debian's Chromium and
# its WebDriver, installed only when missing.
if [[ ! -x /usr/bin/chromium || ! -x /usr/bin/chromedriver ]]; then
    echo "integration tier: installing chromium and chromium-driver" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
fi
cargo test --workspace "$@" -- --ignored --test-threads 4
