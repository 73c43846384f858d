package sut

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"math/big"
	"net"
	"time"

	conformancev1 "github.com/connectlimit/connectlimit/internal/conformance/gen/connectrpc/conformance/v1"
)

// tlsConfig returns the server's TLS configuration for req and the PEM
// certificate clients must trust. It uses the runner's certificate and key
// (ServerCreds) when the request carries them, and otherwise a self-signed
// certificate for 127.0.0.1 and localhost made for this run. When the request
// carries a client certificate, clients must present one that it signs.
func tlsConfig(req *conformancev1.ServerCompatRequest) (*tls.Config, []byte, error) {
	certPEM, keyPEM := req.GetServerCreds().GetCert(), req.GetServerCreds().GetKey()
	if len(certPEM) == 0 || len(keyPEM) == 0 {
		var err error
		if certPEM, keyPEM, err = selfSigned(time.Now()); err != nil {
			return nil, nil, err
		}
	}
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return nil, nil, err
	}
	cfg := &tls.Config{
		Certificates: []tls.Certificate{cert},
		MinVersion:   tls.VersionTLS12,
	}
	if clientCert := req.GetClientTlsCert(); len(clientCert) > 0 {
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(clientCert) {
			return nil, nil, errors.New("client_tls_cert holds no PEM certificate")
		}
		cfg.ClientCAs = pool
		cfg.ClientAuth = tls.RequireAndVerifyClientCert
	}
	return cfg, certPEM, nil
}

// selfSigned returns a new self-signed ECDSA certificate for 127.0.0.1 and
// localhost, valid for a day from now, and its key, both PEM-encoded.
func selfSigned(now time.Time) (certPEM, keyPEM []byte, err error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, nil, err
	}
	template := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "connectlimit conformance server"},
		NotBefore:             now.Add(-time.Minute),
		NotAfter:              now.Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
		IPAddresses:           []net.IP{net.IPv4(127, 0, 0, 1)},
		DNSNames:              []string{"localhost"},
	}
	der, err := x509.CreateCertificate(rand.Reader, template, template, &key.PublicKey, key)
	if err != nil {
		return nil, nil, err
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return nil, nil, err
	}
	certPEM = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	keyPEM = pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER})
	return certPEM, keyPEM, nil
}
