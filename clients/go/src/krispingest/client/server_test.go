package client

import (
	"bufio"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"io/ioutil"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"
)

// binary is the krisp-ingest the tests start (KRISP_BIN, default: the debug build).
func binary(t *testing.T) string {
	if bin := os.Getenv("KRISP_BIN"); bin != "" {
		return bin
	}
	bin, err := filepath.Abs("../../../../../target/debug/krisp-ingest")
	if err != nil {
		t.Fatal(err)
	}
	return bin
}

// server is a krisp-ingest on a fresh local PostgreSQL of its own, on a free loopback port.
type server struct {
	address string
	env     []string
	process *exec.Cmd
}

// newEnv returns the environment of a server with its own data directory.
func newEnv(t *testing.T) []string {
	root, err := ioutil.TempDir("", "krisp-go-")
	if err != nil {
		t.Fatal(err)
	}
	// As root, the cluster runs as `postgres`, which must reach it.
	if err := os.Chmod(root, 0o755); err != nil {
		t.Fatal(err)
	}
	env := []string{}
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "DATABASE_URL=") {
			env = append(env, kv)
		}
	}
	return append(env, "KRISP_DATA_DIR="+filepath.Join(root, "pg"), "KRISP_LISTEN=127.0.0.1:0",
		"KRISP_METRICS_LISTEN=off", "RUST_LOG=info")
}

// start runs the server with `args`, in `env`, and waits for its address.
func start(t *testing.T, env []string, args ...string) *server {
	cmd := exec.Command(binary(t), args...)
	cmd.Env = env
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	listening := regexp.MustCompile(`listening on (\S+)`)
	lines := bufio.NewScanner(stderr)
	var seen []string
	for lines.Scan() {
		seen = append(seen, lines.Text())
		if m := listening.FindStringSubmatch(lines.Text()); m != nil {
			// Keep draining its log so it never blocks on a full pipe.
			go func() {
				for lines.Scan() {
				}
			}()
			s := &server{address: m[1], env: env, process: cmd}
			t.Cleanup(s.stop)
			return s
		}
	}
	_ = cmd.Process.Kill()
	t.Fatalf("krisp-ingest did not start:\n%s", strings.Join(seen, "\n"))
	return nil
}

func (s *server) stop() {
	_ = s.process.Process.Signal(syscall.SIGTERM)
	done := make(chan error, 1)
	go func() { done <- s.process.Wait() }()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		_ = s.process.Process.Kill()
	}
}

// createKey creates an API key in the database of `env` (before its server starts).
func createKey(t *testing.T, env []string) string {
	cmd := exec.Command(binary(t), "keys", "create", "--name", "go-client",
		"--scope", "ingest", "--scope", "read")
	cmd.Env = env
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("keys create: %v", err)
	}
	return strings.TrimSpace(string(out))
}

// pki writes a CA, a server certificate for 127.0.0.1 and a client certificate, all
// signed by the CA, into a new directory; returns its path.
func pki(t *testing.T) string {
	dir, err := ioutil.TempDir("", "krisp-go-pki-")
	if err != nil {
		t.Fatal(err)
	}
	caKey, ca := certificate(t, "krisp test CA", nil, nil, nil)
	write(t, filepath.Join(dir, "ca.pem"), "CERTIFICATE", ca.Raw)
	for _, name := range []string{"server", "client"} {
		key, cert := certificate(t, "krisp test "+name, ca, caKey, []net.IP{net.ParseIP("127.0.0.1")})
		write(t, filepath.Join(dir, name+".pem"), "CERTIFICATE", cert.Raw)
		der, err := x509.MarshalPKCS8PrivateKey(key)
		if err != nil {
			t.Fatal(err)
		}
		write(t, filepath.Join(dir, name+".key"), "PRIVATE KEY", der)
	}
	return dir
}

// certificate makes a key and a certificate signed by `parent` (self-signed CA when nil).
func certificate(t *testing.T, name string, parent *x509.Certificate, parentKey *ecdsa.PrivateKey,
	ips []net.IP) (*ecdsa.PrivateKey, *x509.Certificate) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	template := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: name},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		IPAddresses:  ips,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		KeyUsage:     x509.KeyUsageDigitalSignature,
	}
	if parent == nil {
		template.IsCA = true
		template.BasicConstraintsValid = true
		template.KeyUsage |= x509.KeyUsageCertSign
		parent, parentKey = template, key
	}
	der, err := x509.CreateCertificate(rand.Reader, template, parent, &key.PublicKey, parentKey)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return key, cert
}

func write(t *testing.T, path, kind string, der []byte) {
	data := pem.EncodeToMemory(&pem.Block{Type: kind, Bytes: der})
	if err := ioutil.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
}
