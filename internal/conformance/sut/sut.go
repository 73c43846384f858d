// Package sut runs a server under test for the Connect conformance suite
// (connectrpc.com/conformance, `connectconformance --mode server`): the part
// of the servers in cmd/serverv1 and cmd/serverv2 that does not depend on a
// connect-go major. It speaks the runner's stdin/stdout protocol (a
// size-delimited ServerCompatRequest in, a ServerCompatResponse with the
// address and certificate out), serves HTTP/1.1 and HTTP/2 (h2c, or h2 over
// TLS), builds the request info every ConformanceService response echoes,
// and holds the connectlimit configuration the servers install with
// -connectlimit.
package sut

import (
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"time"

	"google.golang.org/protobuf/proto"

	conformancev1 "github.com/connectlimit/connectlimit/internal/conformance/gen/connectrpc/conformance/v1"
)

// maxRequestSize bounds the ServerCompatRequest read from stdin: it carries
// at most a certificate, a key and a client certificate.
const maxRequestSize = 1 << 20

// shutdownGrace is how long [Run] lets calls in flight finish after the
// runner asks the server to stop (SIGTERM) before it closes their
// connections.
const shutdownGrace = 2 * time.Second

// NewHandler builds the HTTP handler that serves ConformanceService for a
// runner's request, which gives among other things the message size limit
// to enforce (MessageReceiveLimit; zero means none).
type NewHandler func(req *conformancev1.ServerCompatRequest) (http.Handler, error)

// Run reads the runner's ServerCompatRequest from stdin, starts a server on
// a free loopback port with the handler that newHandler builds, writes the
// ServerCompatResponse to stdout, and serves until ctx is done (the runner
// sends SIGTERM when its test cases have run). It then shuts the server down
// and returns nil; it returns an error only if the server could not start or
// stopped by itself.
//
// The server always accepts HTTP/1.1 and HTTP/2 (h2c without TLS, h2 by ALPN
// with it), whatever version the request names as the minimum: one server
// serves both, as a real deployment would. HTTP/3 is not supported.
func Run(ctx context.Context, stdin io.Reader, stdout io.Writer, newHandler NewHandler) error {
	req := &conformancev1.ServerCompatRequest{}
	if err := readDelimited(stdin, req); err != nil {
		return fmt.Errorf("reading ServerCompatRequest: %w", err)
	}
	if req.GetHttpVersion() == conformancev1.HTTPVersion_HTTP_VERSION_3 {
		return errors.New("HTTP/3 is not supported")
	}
	handler, err := newHandler(req)
	if err != nil {
		return err
	}
	protocols := new(http.Protocols)
	protocols.SetHTTP1(true)
	protocols.SetHTTP2(true)
	protocols.SetUnencryptedHTTP2(!req.GetUseTls())
	server := &http.Server{
		Handler:           handler,
		Protocols:         protocols,
		ReadHeaderTimeout: 10 * time.Second,
	}
	var pemCert []byte
	if req.GetUseTls() {
		var cfg *tls.Config
		cfg, pemCert, err = tlsConfig(req)
		if err != nil {
			return err
		}
		server.TLSConfig = cfg
	}
	listener, err := (&net.ListenConfig{}).Listen(ctx, "tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	addr, ok := listener.Addr().(*net.TCPAddr)
	if !ok {
		_ = listener.Close()
		return fmt.Errorf("listener address %v is not TCP", listener.Addr())
	}
	served := make(chan error, 1)
	go func() {
		if req.GetUseTls() {
			served <- server.ServeTLS(listener, "", "")
		} else {
			served <- server.Serve(listener)
		}
	}()
	resp := &conformancev1.ServerCompatResponse{
		Host:    addr.IP.String(),
		Port:    uint32(addr.Port), //nolint:gosec // a TCP port fits in 16 bits
		PemCert: pemCert,
	}
	if err := writeDelimited(stdout, resp); err != nil {
		_ = server.Close()
		return fmt.Errorf("writing ServerCompatResponse: %w", err)
	}
	select {
	case err := <-served:
		return fmt.Errorf("server stopped: %w", err)
	case <-ctx.Done():
	}
	shutdownCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), shutdownGrace)
	defer cancel()
	if err := server.Shutdown(shutdownCtx); err != nil {
		_ = server.Close()
	}
	return nil
}

// readDelimited reads a message preceded by its size, a big-endian uint32.
func readDelimited(r io.Reader, msg proto.Message) error {
	var prefix [4]byte
	if _, err := io.ReadFull(r, prefix[:]); err != nil {
		return err
	}
	size := binary.BigEndian.Uint32(prefix[:])
	if size > maxRequestSize {
		return fmt.Errorf("message of %d bytes is larger than %d", size, maxRequestSize)
	}
	data := make([]byte, size)
	if _, err := io.ReadFull(r, data); err != nil {
		return err
	}
	return proto.Unmarshal(data, msg)
}

// writeDelimited writes msg preceded by its size, a big-endian uint32.
func writeDelimited(w io.Writer, msg proto.Message) error {
	data, err := proto.Marshal(msg)
	if err != nil {
		return err
	}
	out := binary.BigEndian.AppendUint32(make([]byte, 0, 4+len(data)), uint32(len(data))) //nolint:gosec // a ServerCompatResponse is far below 4 GiB
	_, err = w.Write(append(out, data...))
	return err
}
