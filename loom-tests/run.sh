#!/bin/sh
# Runs the loom models. Every model file is gated on `--cfg tai_loadbalancer_loom`; without
# the cfg the test binaries are empty (and prove nothing), so always run them through here.
set -eu
cd "$(dirname "$0")/.."
export RUSTFLAGS="${RUSTFLAGS:-} --cfg tai_loadbalancer_loom -C debug-assertions"
export LOOM_MAX_PREEMPTIONS="${LOOM_MAX_PREEMPTIONS:-2}"
export LOOM_MAX_BRANCHES="${LOOM_MAX_BRANCHES:-10000}"
CARGO_TARGET_DIR=target/loom exec cargo test -p tai-loadbalancer-loom-tests --release -- --nocapture "$@"
