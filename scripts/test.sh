#!/usr/bin/env bash
# Runs the whole connectlimit test suite: formatting, vet, protobuf lint and
# generation checks (Go and TypeScript), the Go tests (which start their own
# redis-server processes on free loopback ports) and the TypeScript client
# kit's tests, and end-to-end tests of the example's browser demo in headless
# Chromium. Needs Go, and Node 20+ with npm; installs redis-server and
# chromium with apt-get when they are missing and this user may do so.
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
# apt_install installs Debian packages as root or with passwordless sudo, or
# fails with $2, which says how to install them by hand.
apt_install() {
	local sudo=()
	if [[ $(id -u) -ne 0 ]] && command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
		sudo=(sudo -n)
	fi
	if ! command -v apt-get >/dev/null 2>&1 || { [[ $(id -u) -ne 0 ]] && [[ ${#sudo[@]} -eq 0 ]]; }; then
		fail "$2"
	fi
	run "${sudo[@]}" apt-get update
	run "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y "$1"
}

command -v go >/dev/null 2>&1 || fail "go is not on PATH; install Go (see go.mod for the version) first"
command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 ||
	fail "node and npm are not on PATH; install Node.js 20 or later with npm (clients/ts, and protoc-gen-es for buf generate, need them)"
node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 20 ? 0 : 1)' ||
	fail "node $(node --version) is too old; clients/ts needs Node.js 20 or later"

section "redis-server"
# The tests start and stop their own redis-server processes; a system Redis,
# running or not, is never used or touched.
if command -v redis-server >/dev/null 2>&1; then
	echo "found $(command -v redis-server) ($(redis-server --version | head -n 1))"
else
	echo "redis-server is not on PATH; installing Debian's redis-server package"
	apt_install redis-server "redis-server is not on PATH and cannot be installed automatically (needs apt-get as root or passwordless sudo).
Install it yourself, e.g. 'sudo apt-get install -y redis-server' on Debian/Ubuntu or 'brew install redis' on macOS, then rerun."
	command -v redis-server >/dev/null 2>&1 || fail "redis-server is still not on PATH after installing it"
fi

section "chromium"
# The browser demo's tests drive Debian's Chromium with playwright-core (which
# never downloads a browser of its own). CHROMIUM names another Chrome or
# Chromium binary.
export CHROMIUM=${CHROMIUM:-/usr/bin/chromium}
if [[ -x $CHROMIUM ]]; then
	echo "found $CHROMIUM ($("$CHROMIUM" --version 2>/dev/null | head -n 1))"
elif [[ $CHROMIUM != /usr/bin/chromium ]]; then
	fail "CHROMIUM=$CHROMIUM is not an executable file"
else
	echo "$CHROMIUM is missing; installing Debian's chromium package (about 80 s)"
	apt_install chromium "$CHROMIUM is missing and cannot be installed automatically (needs apt-get as root or passwordless sudo).
Install it yourself ('sudo apt-get install -y chromium' on Debian), or set CHROMIUM to a Chrome or Chromium binary (on macOS, e.g.
CHROMIUM='/Applications/Google Chrome.app/Contents/MacOS/Google Chrome'), then rerun."
	[[ -x $CHROMIUM ]] || fail "$CHROMIUM is still missing after installing chromium"
fi

section "gofmt"
unformatted=$(find . -name '*.go' -not -path './.git/*' -not -path '*/node_modules/*' -print0 | xargs -0 -r gofmt -l)
if [[ -n $unformatted ]]; then
	printf '%s\n' "$unformatted"
	fail "the files above are not gofmt'd; run: gofmt -w <file>"
fi
echo "ok"

# The nested Go modules: connect-go v2 lives only in these, never in the
# root module (interceptor/v2 and client/v2 are the v2 adapters, the v2
# example, the conformance harness that runs the official Connect suite
# against servers of both majors, and bench, the benchmark program whose
# test runs it briefly). Each replaces the root module with this working
# tree.
modules=(interceptor/v2 client/v2 examples/aiservice/v2 internal/conformance bench)

section "go vet"
run go vet ./...
for mod in "${modules[@]}"; do
	(cd "$mod" && run go vet ./...)
done

section "go mod tidy"
# A go.mod or go.sum that needs tidying fails here, with the diff.
run go mod tidy -diff
for mod in "${modules[@]}"; do
	(cd "$mod" && run go mod tidy -diff)
done

section "npm ci (clients/ts)"
# Installs exactly clients/ts/package-lock.json: buf generate runs
# protoc-gen-es from its node_modules, and the TypeScript tests need the rest.
(cd clients/ts && run npm ci --no-audit --no-fund)

section "buf lint / format / generate"
buf=(go tool -modfile=tools/go.mod buf)
generated=(proto examples/aiservice/gen clients/ts/src/gen interceptor/v2/gen examples/aiservice/v2/gen internal/conformance/gen)
run "${buf[@]}" lint
run "${buf[@]}" format -d --exit-code
# Regenerate over a snapshot and compare: in a clean checkout this is "git
# status stays empty", and with local edits it still tells whether the
# generated code matches the .proto files.
snapshot=$(mktemp -d)
trap 'rm -rf "$snapshot"' EXIT
cp -R --parents "${generated[@]}" "$snapshot"
run "${buf[@]}" generate
run "${buf[@]}" generate --template internal/conformance/buf.gen.yaml
for dir in "${generated[@]}"; do
	diff -ruN "$snapshot/$dir" "$dir" || fail "buf generate changed $dir (diff above); commit the regenerated files"
done
echo "ok"

section "go test"
run go test -race -cover -count=1 -timeout 10m ./...
# internal/conformance runs the Connect conformance suite (3,640 cases, the
# full matrix of its README) four times: servers on connect-go v1 and v2,
# each without and with connectlimit; about 70 s.
for mod in "${modules[@]}"; do
	(cd "$mod" && run go test -race -count=1 -timeout 10m ./...)
done

section "TypeScript (clients/ts)"
# Type checks (the tests, the source without Node's types, as browsers get it,
# and the browser demo's source), checks that the demo's committed bundle
# (examples/aiservice/web/static/app.js) is what its sources build, then unit
# tests, integration tests that build examples/aiservice and run it on free
# loopback ports, and the demo's tests in headless Chromium (same-origin and
# cross-origin; screenshots in examples/aiservice/web/screenshots/).
(cd clients/ts && run npm run --silent typecheck && run npm run --silent build:demo -- --check &&
	run npm test && run npm run --silent test:browser)

section "fuzz"
# go test above replays every fuzz target's committed corpus
# (testdata/fuzz/<target>/); here each target also mutates its inputs, so
# that new crashers surface. A crasher is written to that directory: fix the
# bug, then commit it as a seed. Each budget is a number of executions
# (about 4 s on this project's 2-core CI machine), not a duration: Go 1.26's
# fuzz coordinator can fail a duration-bound run with "context deadline
# exceeded" and no crasher when the machine is busy (go.dev/issue/75804).
# FUZZSCALE=10 runs ten times longer. Minimizing a new interesting input is
# capped at 1s so that it does not eat a short run.
scale=${FUZZSCALE:-1}
fuzz() { run go test -run '^$' -fuzz "^$1\$" -fuzztime "$(($3 * scale))x" -fuzzminimizetime 1s "$2"; }
fuzz FuzzDecide ./bucket 40000
fuzz FuzzKey ./bucket/redisstore 60000
fuzz FuzzParseConfig ./costmap 15000
fuzz FuzzEstimate ./costmap 20000
fuzz FuzzSubject ./interceptor 30000
fuzz FuzzParseField ./client/quota 40000
fuzz FuzzParseLines ./client/quota 40000

section "all checks passed"
