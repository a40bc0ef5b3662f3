#!/usr/bin/env bash
# Shows that the fault suite catches a broken build: copies the checkout (a detached git worktree
# with the files as they are on disk), breaks one guarantee with a small patch, builds, runs the
# short fault suite over NATS and reports whether the checker failed (it must). Not part of CI.
#
# Usage: tests/e2e/faults/prove-broken.sh [repeat-non-idempotent|ack-before-commit]
#   repeat-non-idempotent (default)  engine/src/run/attempt.rs: a non-idempotent task whose worker
#                                    was lost is retried instead of ending outcome-unknown.
#   ack-before-commit                src/runtime/ingest.rs: worker messages are acknowledged on
#                                    receipt, before their batch is committed, and the partition
#                                    no longer acks them after the commit.
# Environment: CAPSTAN_FAULTS_SEED replays a schedule. The build shares this checkout's target/
# (only the workspace crates are rebuilt, under another version) unless CARGO_TARGET_DIR says
# otherwise. Do not run the checkout's own e2e tests meanwhile: target/debug/capstan is shared.
set -euo pipefail
root="$(cd "$(dirname "$0")/../../.." && pwd)"
variant="${1:-repeat-non-idempotent}"
work="$(mktemp -d /tmp/capstan-broken.XXXXXX)"
cleanup() {
  git -C "$root" worktree remove --force "$work/checkout" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

git -C "$root" worktree add --detach "$work/checkout" HEAD >/dev/null
# The checkout's files as they are on disk (uncommitted and new files too), so that what is
# proven is what is there.
(cd "$root" && git ls-files -z -co --exclude-standard | tar --null --ignore-failed-read -T - -cf - 2>/dev/null) |
  tar -xf - -C "$work/checkout"
cd "$work/checkout"

case "$variant" in
  repeat-non-idempotent)
    file=engine/src/run/attempt.rs
    grep -q 'let may_repeat = spec.idempotent || !t.ever_started;' "$file"
    sed -i 's/let may_repeat = spec.idempotent || !t.ever_started;/let may_repeat = spec.idempotent || !t.ever_started || attempt > 0;/' "$file"
    ;;
  ack-before-commit)
    file=src/runtime/ingest.rs
    # Ack each worker message as it arrives (before routing it to its partition) and hand the
    # partition no delivery to ack after the commit.
    python3 - "$file" <<'PY'
import sys
p = sys.argv[1]
s = open(p).read()
old = """        let env = Envelope {
            run_id: decoded.run_id,
            input_id: Some(delivery.message.event.id.clone()),
            project: Some(decoded.project),
            input: decoded.input,
            consumed_timer: None,
            reply: Reply::Delivery(Box::new(delivery)),
        };"""
new = """        let input_id = Some(delivery.message.event.id.clone());
        let _ = delivery.ack().await;
        let env = Envelope {
            run_id: decoded.run_id,
            input_id,
            project: Some(decoded.project),
            input: decoded.input,
            consumed_timer: None,
            reply: Reply::None,
        };"""
assert old in s, "ingest.rs changed; update the patch"
open(p, "w").write(s.replace(old, new))
PY
    ;;
  *)
    echo "unknown variant $variant" >&2
    exit 2
    ;;
esac
echo "== broken build ($variant):"
git diff -- "$file"

# Sharing target/ saves building every dependency again, but cargo names a workspace crate's
# artifacts by its path relative to the workspace, so this copy's crates would take the slots of
# the checkout's own (and one build's artifacts would pass for the other's). Another version
# gives the copy's crates slots of their own.
sed -i '0,/^version = "0.1.0"$/s//version = "0.1.0-broken"/' Cargo.toml
grep -q '^version = "0.1.0-broken"$' Cargo.toml
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target}"
# target/debug/capstan (the binary the e2e tests start) is shared all the same: put the
# checkout's own back at the end.
restore_binary() { (cd "$root" && cargo build --all-features --bin capstan >/dev/null 2>&1) || true; }
trap 'restore_binary; cleanup' EXIT
cargo build --all-features --tests --test e2e 2>&1 | tail -2
echo "== running the short fault suite over NATS on the broken build"
set +e
cargo test --all-features --test e2e -- faults::recorded_exactly_once_under_faults --exact --nocapture 2>&1 |
  grep -vE '^\s+[0-9]+: |^\s+at ' | tee "$work/suite.log" | grep -vE '^$'
status=${PIPESTATUS[0]}
set -e
if [ "$status" -ne 0 ] && grep -qE 'violations|never ended' "$work/suite.log"; then
  echo "== as it must: the checker FAILED the broken build ($variant)"
  exit 0
fi
echo "== the checker did NOT catch the broken build ($variant) (exit status $status)" >&2
exit 1
