// Package client dials krisp-ingest from Go: plaintext, or TLS with a CA file (and a client
// certificate for mutual TLS), an API key sent with every call, and the field violations
// of an INVALID_ARGUMENT status decoded from its details (google.rpc.BadRequest).
package client

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io/ioutil"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"

	ingest "krispingest/ingestv1"
)

// Options say how to reach the server.
type Options struct {
	// Address is host:port.
	Address string
	// CAFile is the PEM file of the CA that signed the server's certificate; empty means
	// plaintext (loopback development only).
	CAFile string
	// CertFile and KeyFile are the client certificate and key, for mutual TLS.
	CertFile, KeyFile string
	// APIKey, when set, goes with every call as "authorization: Bearer <key>".
	APIKey string
}

// Dial connects (lazily, as grpc-go does) and returns the connection and a client.
func Dial(opts Options) (*grpc.ClientConn, ingest.IngestServiceClient, error) {
	dial := []grpc.DialOption{}
	if opts.CAFile == "" {
		dial = append(dial, grpc.WithInsecure())
	} else {
		config, err := tlsConfig(opts)
		if err != nil {
			return nil, nil, err
		}
		dial = append(dial, grpc.WithTransportCredentials(credentials.NewTLS(config)))
	}
	if opts.APIKey != "" {
		dial = append(dial, grpc.WithPerRPCCredentials(apiKey{key: opts.APIKey, tls: opts.CAFile != ""}))
	}
	conn, err := grpc.Dial(opts.Address, dial...)
	if err != nil {
		return nil, nil, err
	}
	return conn, ingest.NewIngestServiceClient(conn), nil
}

func tlsConfig(opts Options) (*tls.Config, error) {
	pem, err := ioutil.ReadFile(opts.CAFile)
	if err != nil {
		return nil, fmt.Errorf("reading the CA file: %w", err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("%s holds no PEM certificate", opts.CAFile)
	}
	config := &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12}
	if opts.CertFile != "" || opts.KeyFile != "" {
		pair, err := tls.LoadX509KeyPair(opts.CertFile, opts.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("reading the client certificate: %w", err)
		}
		config.Certificates = []tls.Certificate{pair}
	}
	return config, nil
}

// apiKey sends the key with every call.
type apiKey struct {
	key string
	tls bool
}

func (k apiKey) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + k.key}, nil
}

// RequireTransportSecurity: a key may travel in plaintext only where the connection is
// plaintext on purpose (loopback development).
func (k apiKey) RequireTransportSecurity() bool { return k.tls }

// FieldViolation is one field of a request the server refused, and why.
type FieldViolation struct {
	Field, Description string
}

// Violations returns the field violations carried by err's status (INVALID_ARGUMENT),
// or nil.
func Violations(err error) []FieldViolation {
	st, ok := status.FromError(err)
	if !ok {
		return nil
	}
	var found []FieldViolation
	for _, detail := range st.Details() {
		if bad, ok := detail.(*errdetails.BadRequest); ok {
			for _, v := range bad.GetFieldViolations() {
				found = append(found, FieldViolation{Field: v.GetField(), Description: v.GetDescription()})
			}
		}
	}
	return found
}
