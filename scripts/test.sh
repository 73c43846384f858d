#!/usr/bin/env bash
# Runs the whole connectlimit test suite: formatting, vet, protobuf lint and
# generation checks, and the Go tests (which start their own redis-server
# processes on free loopback ports). Needs Go; installs redis-server with
# apt-get when it is missing and this user may do so.
#
#   bash scripts/test.sh
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

section() { printf '\n==> %s\n' "$*"; }
fail() {
	printf 'FAIL: %s\n' "$*" >&2
	exit 1
}
run() {
	printf '+ %s\n' "$*"
	"$@"
}

command -v go >/dev/null 2>&1 || fail "go is not on PATH; install Go (see go.mod for the version) first"

section "redis-server"
# The tests start and stop their own redis-server processes; a system Redis,
# running or not, is never used or touched.
if command -v redis-server >/dev/null 2>&1; then
	echo "found $(command -v redis-server) ($(redis-server --version | head -n 1))"
else
	sudo=()
	if [[ $(id -u) -ne 0 ]] && command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
		sudo=(sudo -n)
	fi
	if ! command -v apt-get >/dev/null 2>&1 || { [[ $(id -u) -ne 0 ]] && [[ ${#sudo[@]} -eq 0 ]]; }; then
		fail "redis-server is not on PATH and cannot be installed automatically (needs apt-get as root or passwordless sudo).
Install it yourself, e.g. 'sudo apt-get install -y redis-server' on Debian/Ubuntu or 'brew install redis' on macOS, then rerun."
	fi
	echo "redis-server is not on PATH; installing Debian's redis-server package"
	run "${sudo[@]}" apt-get update
	run "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y redis-server
	command -v redis-server >/dev/null 2>&1 || fail "redis-server is still not on PATH after installing it"
fi

section "gofmt"
unformatted=$(find . -name '*.go' -not -path './.git/*' -not -path '*/node_modules/*' -print0 | xargs -0 -r gofmt -l)
if [[ -n $unformatted ]]; then
	printf '%s\n' "$unformatted"
	fail "the files above are not gofmt'd; run: gofmt -w <file>"
fi
echo "ok"

section "go vet"
run go vet ./...

section "buf lint / format / generate"
buf=(go tool -modfile=tools/go.mod buf)
generated=(proto examples/aiservice/gen)
run "${buf[@]}" lint
run "${buf[@]}" format -d --exit-code
# Regenerate over a snapshot and compare: in a clean checkout this is "git
# status stays empty", and with local edits it still tells whether the
# generated code matches the .proto files.
snapshot=$(mktemp -d)
trap 'rm -rf "$snapshot"' EXIT
cp -R --parents "${generated[@]}" "$snapshot"
run "${buf[@]}" generate
for dir in "${generated[@]}"; do
	diff -ruN "$snapshot/$dir" "$dir" || fail "buf generate changed $dir (diff above); commit the regenerated files"
done
echo "ok"

section "go test"
run go test -race -cover -count=1 -timeout 10m ./...

section "fuzz"
# go test above replays every fuzz target's committed corpus
# (testdata/fuzz/<target>/); here each target also mutates its inputs for a
# few seconds, so that new crashers surface. A crasher is written to that
# directory: fix the bug, then commit it as a seed. FUZZTIME=1m runs longer.
# Minimizing each new interesting input is capped at 1s so that it does not
# eat a short run.
fuzztime=${FUZZTIME:-4s}
fuzz() { run go test -run '^$' -fuzz "^$1\$" -fuzztime "$fuzztime" -fuzzminimizetime 1s "$2"; }
fuzz FuzzDecide ./bucket
fuzz FuzzKey ./bucket/redisstore
fuzz FuzzParseConfig ./costmap
fuzz FuzzEstimate ./costmap
fuzz FuzzSubject ./interceptor

section "all checks passed"
