package sut_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"fmt"
	"io"
	"net/http"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	conformancev1 "github.com/connectlimit/connectlimit/internal/conformance/gen/connectrpc/conformance/v1"
	"github.com/connectlimit/connectlimit/internal/conformance/sut"
)

// TestRun drives Run as connectconformance does and checks the server it
// starts: the HTTP versions it serves (HTTP/1.1 and HTTP/2, h2c in clear
// text), its certificate when TLS is asked for without the runner's
// credentials (self-signed for 127.0.0.1), and that it stops when ctx ends.
func TestRun(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name      string
		useTLS    bool
		wantProto []string // of requests over HTTP/1.1 and HTTP/2
	}{
		{name: "cleartext", wantProto: []string{"HTTP/1.1", "HTTP/2.0"}},
		{name: "tls", useTLS: true, wantProto: []string{"HTTP/1.1", "HTTP/2.0"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			ctx, cancel := context.WithCancel(t.Context())
			defer cancel()
			stdinR, stdinW := io.Pipe()
			stdoutR, stdoutW := io.Pipe()
			var gotReq *conformancev1.ServerCompatRequest
			handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				_, _ = io.WriteString(w, r.Proto)
			})
			done := make(chan error, 1)
			go func() {
				done <- sut.Run(ctx, stdinR, stdoutW, func(req *conformancev1.ServerCompatRequest) (http.Handler, error) {
					gotReq = req
					return handler, nil
				})
			}()
			req := &conformancev1.ServerCompatRequest{
				Protocol:            conformancev1.Protocol_PROTOCOL_GRPC,
				HttpVersion:         conformancev1.HTTPVersion_HTTP_VERSION_2,
				UseTls:              tc.useTLS,
				MessageReceiveLimit: 200 * 1024,
			}
			data, err := proto.Marshal(req)
			if err != nil {
				t.Fatal(err)
			}
			go func() {
				_, _ = stdinW.Write(append(binary.BigEndian.AppendUint32(nil, uint32(len(data))), data...))
				_ = stdinW.Close()
			}()
			var size [4]byte
			if _, err := io.ReadFull(stdoutR, size[:]); err != nil {
				t.Fatal(err)
			}
			data = make([]byte, binary.BigEndian.Uint32(size[:]))
			if _, err := io.ReadFull(stdoutR, data); err != nil {
				t.Fatal(err)
			}
			var resp conformancev1.ServerCompatResponse
			if err := proto.Unmarshal(data, &resp); err != nil {
				t.Fatal(err)
			}
			if !proto.Equal(gotReq, req) {
				t.Errorf("the handler was built for %v, want %v", gotReq, req)
			}
			if resp.GetHost() != "127.0.0.1" || resp.GetPort() == 0 {
				t.Fatalf("server at %s:%d, want 127.0.0.1 and a port", resp.GetHost(), resp.GetPort())
			}
			if got := len(resp.GetPemCert()) > 0; got != tc.useTLS {
				t.Fatalf("certificate sent: %v, want %v", got, tc.useTLS)
			}
			scheme := "http"
			var tlsConfig *tls.Config
			if tc.useTLS {
				scheme = "https"
				roots := x509.NewCertPool()
				if !roots.AppendCertsFromPEM(resp.GetPemCert()) {
					t.Fatal("pem_cert holds no certificate")
				}
				tlsConfig = &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12}
			}
			url := fmt.Sprintf("%s://%s:%d/", scheme, resp.GetHost(), resp.GetPort())
			for i, set := range []func(*http.Protocols){
				func(p *http.Protocols) { p.SetHTTP1(true) },
				func(p *http.Protocols) { p.SetHTTP2(true); p.SetUnencryptedHTTP2(true) },
			} {
				protocols := new(http.Protocols)
				set(protocols)
				client := &http.Client{Transport: &http.Transport{Protocols: protocols, TLSClientConfig: tlsConfig}}
				res, err := client.Get(url)
				if err != nil {
					t.Fatalf("GET %s: %v", url, err)
				}
				body, err := io.ReadAll(res.Body)
				_ = res.Body.Close()
				client.CloseIdleConnections()
				if err != nil || string(body) != tc.wantProto[i] {
					t.Errorf("GET %s over %s: served %q (%v)", url, tc.wantProto[i], body, err)
				}
			}
			cancel()
			select {
			case err := <-done:
				if err != nil {
					t.Errorf("Run: %v", err)
				}
			case <-time.After(5 * time.Second):
				t.Fatal("Run did not return after its context ended")
			}
		})
	}
}
