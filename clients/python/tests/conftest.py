"""Starts a real krisp-ingest (the binary cargo built) on a fresh local PostgreSQL for the
test session, and generates the stubs first."""

import os
import re
import subprocess
import sys
import tempfile
import threading

import pytest

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(os.path.dirname(HERE))

subprocess.run([os.path.join(HERE, "generate.sh")], check=True)
sys.path.insert(0, os.path.join(HERE, "gen"))
sys.path.insert(0, HERE)


BINARY = os.environ.get("KRISP_BIN", os.path.join(REPO, "target", "debug", "krisp-ingest"))


class Server:
    """A krisp-ingest on a fresh local PostgreSQL of its own, on a free loopback port,
    started with `args`; with `key_name`, an API key (`self.key`) is created first."""

    def __init__(self, args=(), key_name=None):
        if not os.path.exists(BINARY):
            subprocess.run(["cargo", "build", "--bin", "krisp-ingest"], cwd=REPO, check=True)
        root = tempfile.mkdtemp(prefix="krisp-py-")
        os.chmod(root, 0o755)  # as root, the cluster runs as `postgres`, which must reach it
        self.env = dict(os.environ, KRISP_DATA_DIR=os.path.join(root, "pg"),
                        KRISP_LISTEN="127.0.0.1:0", KRISP_METRICS_LISTEN="off", RUST_LOG="info")
        self.env.pop("DATABASE_URL", None)
        self.key = None
        if key_name:
            self.key = subprocess.run(
                [BINARY, "keys", "create", "--name", key_name, "--scope", "ingest", "--scope", "read"],
                env=self.env, capture_output=True, text=True, check=True).stdout.strip()
        self.process = subprocess.Popen([BINARY, *args], env=self.env, stderr=subprocess.PIPE,
                                        text=True)
        self.address = None
        seen = []
        for line in self.process.stderr:
            seen.append(line)
            match = re.search(r"listening on (\S+)", line)
            if match:
                self.address = match.group(1)
                break
        assert self.address, "krisp-ingest did not start:\n" + "".join(seen)
        # Keep draining its log so it never blocks on a full pipe.
        threading.Thread(target=lambda: [None for _ in self.process.stderr], daemon=True).start()

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=30)


@pytest.fixture(scope="session")
def server():
    running = Server()
    yield running.address
    running.stop()
