package conformance_test

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/proto"

	conformancev1 "github.com/connectlimit/connectlimit/internal/conformance/gen/connectrpc/conformance/v1"
	"github.com/connectlimit/connectlimit/internal/conformance/gen/connectrpc/conformance/v1/conformancev1connect"
)

// TestConnectlimitInstalled checks what makes TestConformance's comparison
// meaningful: with -connectlimit every kind of procedure is limited (its
// responses carry connectlimit's RateLimit-Policy, naming the buckets of
// sut/connectlimit.yaml: fixed and estimated charges on unary and server
// streams, per-message charges on client and bidi streams), and without it
// none is.
func TestConnectlimitInstalled(t *testing.T) {
	for _, major := range []string{"v1", "v2"} {
		t.Run(major, func(t *testing.T) {
			server := filepath.Join(bin, "server"+major)
			t.Run("without", func(t *testing.T) {
				checkLimits(t, startServer(t, server), false)
			})
			t.Run("with", func(t *testing.T) {
				checkLimits(t, startServer(t, server, "-connectlimit"), true)
			})
		})
	}
}

// checkLimits calls each kind of procedure of the server at baseURL, over
// HTTP/2 with the Connect protocol, and checks that the buckets it names in
// RateLimit-Policy are those of sut/connectlimit.yaml if limited, and that
// there are none otherwise.
func checkLimits(t *testing.T, baseURL string, limited bool) {
	t.Helper()
	protocols := new(http.Protocols)
	protocols.SetUnencryptedHTTP2(true)
	httpClient := &http.Client{Transport: &http.Transport{Protocols: protocols}}
	t.Cleanup(httpClient.CloseIdleConnections)
	client := conformancev1connect.NewConformanceServiceClient(httpClient, baseURL)
	ctx := t.Context()
	data := [][]byte{[]byte("one"), []byte("two")}
	check := func(procedure string, header http.Header, want ...string) {
		t.Helper()
		policy := strings.Join(header.Values("RateLimit-Policy"), ", ")
		if !limited {
			want = nil
		}
		var got []string
		for item := range strings.SplitSeq(policy, ",") {
			if name, _, ok := strings.Cut(strings.TrimSpace(item), ";"); ok {
				got = append(got, strings.Trim(name, `"`))
			}
		}
		if strings.Join(got, " ") != strings.Join(want, " ") {
			t.Errorf("%s: RateLimit-Policy names buckets %q, want %q (header %q)", procedure, got, want, policy)
		}
	}

	unary, err := client.Unary(ctx, connect.NewRequest(&conformancev1.UnaryRequest{
		ResponseDefinition: &conformancev1.UnaryResponseDefinition{
			Response: &conformancev1.UnaryResponseDefinition_ResponseData{ResponseData: data[0]},
		},
	}))
	if err != nil {
		t.Fatalf("Unary: %v", err)
	}
	check("Unary", unary.Header(), "calls", "bytes")

	serverStream, err := client.ServerStream(ctx, connect.NewRequest(&conformancev1.ServerStreamRequest{
		ResponseDefinition: &conformancev1.StreamResponseDefinition{ResponseData: data},
	}))
	if err != nil {
		t.Fatalf("ServerStream: %v", err)
	}
	var received int
	for serverStream.Receive() {
		received++
	}
	if err := serverStream.Err(); err != nil || received != len(data) {
		t.Fatalf("ServerStream: %d messages, %v; want %d", received, err, len(data))
	}
	check("ServerStream", serverStream.ResponseHeader(), "calls", "bytes")
	_ = serverStream.Close()

	clientStream := client.ClientStream(ctx)
	for i, d := range data {
		msg := &conformancev1.ClientStreamRequest{RequestData: d}
		if i == 0 {
			msg.ResponseDefinition = &conformancev1.UnaryResponseDefinition{}
		}
		if err := clientStream.Send(msg); err != nil {
			t.Fatalf("ClientStream: Send: %v", err)
		}
	}
	clientRes, err := clientStream.CloseAndReceive()
	if err != nil {
		t.Fatalf("ClientStream: %v", err)
	}
	check("ClientStream", clientRes.Header(), "messages", "bytes")

	bidi := client.BidiStream(ctx)
	if err := bidi.Send(&conformancev1.BidiStreamRequest{
		ResponseDefinition: &conformancev1.StreamResponseDefinition{ResponseData: data[:1]},
		FullDuplex:         true,
	}); err != nil {
		t.Fatalf("BidiStream: Send: %v", err)
	}
	if _, err := bidi.Receive(); err != nil {
		t.Fatalf("BidiStream: Receive: %v", err)
	}
	if err := bidi.CloseRequest(); err != nil {
		t.Fatalf("BidiStream: CloseRequest: %v", err)
	}
	if _, err := bidi.Receive(); !errors.Is(err, io.EOF) {
		t.Fatalf("BidiStream: Receive after the last response: %v, want EOF", err)
	}
	check("BidiStream", bidi.ResponseHeader(), "messages")
	_ = bidi.CloseResponse()
}

// startServer starts a server under test as connectconformance does: a
// ServerCompatRequest (Connect over HTTP/2, without TLS) on its stdin, the
// address from the ServerCompatResponse on its stdout. The server is stopped
// with SIGTERM when the test ends. It returns the server's base URL.
func startServer(t *testing.T, server string, args ...string) string {
	t.Helper()
	cmd := exec.Command(server, args...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	waiting := false // whether a goroutine waits for cmd
	t.Cleanup(func() {
		if !waiting {
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
			return
		}
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("%s: %v\n%s", server, err, stderr.String())
			}
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
			t.Errorf("%s did not stop on SIGTERM", server)
		}
	})
	req, err := proto.Marshal(&conformancev1.ServerCompatRequest{
		Protocol:    conformancev1.Protocol_PROTOCOL_CONNECT,
		HttpVersion: conformancev1.HTTPVersion_HTTP_VERSION_2,
	})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := stdin.Write(binary.BigEndian.AppendUint32(nil, uint32(len(req)))); err != nil {
		t.Fatal(err)
	}
	if _, err := stdin.Write(req); err != nil {
		t.Fatal(err)
	}
	if err := stdin.Close(); err != nil {
		t.Fatal(err)
	}
	var size [4]byte
	if _, err := io.ReadFull(stdout, size[:]); err != nil {
		t.Fatalf("%s: reading its ServerCompatResponse: %v\n%s", server, err, stderr.String())
	}
	data := make([]byte, binary.BigEndian.Uint32(size[:]))
	if _, err := io.ReadFull(stdout, data); err != nil {
		t.Fatal(err)
	}
	waiting = true
	go func() { done <- cmd.Wait() }()
	var resp conformancev1.ServerCompatResponse
	if err := proto.Unmarshal(data, &resp); err != nil {
		t.Fatal(err)
	}
	if len(resp.GetPemCert()) != 0 {
		t.Fatalf("%s sent a certificate for a request without TLS", server)
	}
	return fmt.Sprintf("http://%s:%d", resp.GetHost(), resp.GetPort())
}
