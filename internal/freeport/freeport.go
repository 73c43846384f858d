// Package freeport finds free loopback TCP ports for test servers that must
// keep their port across a restart: a redis-server of redistest that is
// killed and started again, a faultproxy that stops and starts listening.
//
// A port the kernel hands out for "127.0.0.1:0" comes from the ephemeral
// range, the same range it takes the local ports of outgoing connections
// from. While a test server is down, any connection the machine opens (a
// Redis client of another test, the runner's own dials) may take its port,
// and the restart then fails with "address already in use". Ports below
// the ephemeral range are never given to outgoing connections, so this
// package picks from there, and only if it cannot tell the range, from the
// kernel.
package freeport

import (
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"strconv"
	"strings"
)

// lowest is the lowest port Loopback picks: above the registered ports
// that common services use.
const lowest = 10000

// rangeFile is where Linux keeps the ephemeral port range.
const rangeFile = "/proc/sys/net/ipv4/ip_local_port_range"

// Loopback returns n distinct ports that were free on 127.0.0.1 a moment
// ago, outside the ephemeral port range when that range is known and leaves
// room below it. Another process may still bind one before the caller does;
// callers that start a server retry on new ports.
func Loopback(n int) ([]int, error) {
	low, ok := ephemeralLow()
	ports := make([]int, 0, n)
	var held []net.Listener
	defer func() {
		for _, l := range held {
			_ = l.Close()
		}
	}()
	for range n {
		l, err := listen(low, ok)
		if err != nil {
			return nil, fmt.Errorf("finding a free port: %w", err)
		}
		held = append(held, l)
		addr, isTCP := l.Addr().(*net.TCPAddr)
		if !isTCP {
			return nil, fmt.Errorf("finding a free port: listener address is a %T", l.Addr())
		}
		ports = append(ports, addr.Port)
	}
	return ports, nil
}

// listen binds a free port below low, held until the caller closes it, or
// any port the kernel gives if low is unknown or every try failed.
func listen(low int, known bool) (net.Listener, error) {
	if known && low-lowest >= 1000 {
		for range 50 {
			port := lowest + rand.IntN(low-lowest)
			l, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
			if err == nil {
				return l, nil
			}
		}
	}
	return net.Listen("tcp", "127.0.0.1:0")
}

// ephemeralLow returns the lowest port of the ephemeral range.
func ephemeralLow() (int, bool) {
	b, err := os.ReadFile(rangeFile)
	if err != nil {
		return 0, false
	}
	fields := strings.Fields(string(b))
	if len(fields) != 2 {
		return 0, false
	}
	low, err := strconv.Atoi(fields[0])
	if err != nil || low <= 0 || low > 65535 {
		return 0, false
	}
	return low, true
}
