#!/usr/bin/env bash
# Runs every fuzz target for N seconds each (default 20), starting from the committed seed
# corpus in fuzz/corpus/<target>. New inputs go to fuzz/work/<target> (not committed); a crash
# is written to fuzz/artifacts/<target>/ and fails the script.
#
#   fuzz/run.sh            # 20 s per target
#   fuzz/run.sh 15         # CI budget
#   FUZZ_TARGETS="webhook config" fuzz/run.sh 60
#   FUZZ_SANITIZER=none fuzz/run.sh 15   # what CI runs: no AddressSanitizer build of
#                                        # wasmtime and SQLite (minutes instead of ~30)
#
# Only a stable toolchain is available: cargo-fuzz needs nightly flags (-Zsanitizer, sancov),
# so it runs with RUSTC_BOOTSTRAP=1.
set -euo pipefail
seconds="${1:-20}"
sanitizer="${FUZZ_SANITIZER:-address}"
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here"
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

targets="${FUZZ_TARGETS:-$(cargo fuzz list)}"
echo "fuzz: building targets (sanitizer: $sanitizer)"
cargo fuzz build -s "$sanitizer"
summary=()
for target in $targets; do
    mkdir -p "work/$target"
    echo "fuzz: $target for ${seconds}s"
    log="work/$target.log"
    if ! cargo fuzz run -s "$sanitizer" "$target" "work/$target" "corpus/$target" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        >"$log" 2>&1; then
        tail -n 60 "$log"
        echo "fuzz: $target FAILED; the input is in fuzz/artifacts/$target/ (reproduce: RUSTC_BOOTSTRAP=1 cargo fuzz run $target <file>)"
        exit 1
    fi
    runs="$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')"
    cov="$(grep -o 'cov: [0-9]*' "$log" | tail -n 1 || true)"
    summary+=("$target: ${runs} runs in ${seconds}s, ${cov:-cov: ?}, no crash")
done
echo "fuzz summary:"
printf '  %s\n' "${summary[@]}"
