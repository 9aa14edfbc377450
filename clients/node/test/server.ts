// A krisp-ingest for the tests: the binary cargo built (KRISP_BIN), on a fresh local
// PostgreSQL of its own, on a free loopback port.
import { type ChildProcess, execFileSync, spawn } from "node:child_process";
import { chmodSync, mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";

const HERE = dirname(fileURLToPath(import.meta.url));
export const REPO = join(HERE, "..", "..", "..", "..");
const BINARY = process.env.KRISP_BIN ?? join(REPO, "target", "debug", "krisp-ingest");

export class Server {
  readonly env: NodeJS.ProcessEnv;
  address = "";
  private process: ChildProcess | null = null;

  constructor() {
    const root = mkdtempSync(join(tmpdir(), "krisp-node-"));
    chmodSync(root, 0o755); // as root, the cluster runs as `postgres`, which must reach it
    this.env = {
      ...process.env,
      KRISP_DATA_DIR: join(root, "pg"),
      KRISP_LISTEN: "127.0.0.1:0",
      KRISP_METRICS_LISTEN: "off",
    };
    delete this.env.DATABASE_URL;
  }

  /** Creates an API key in this server's database (before it starts). */
  createKey(name: string): string {
    const out = execFileSync(BINARY, ["keys", "create", "--name", name, "--scope", "ingest", "--scope", "read"], {
      env: this.env,
      stdio: ["ignore", "pipe", "ignore"],
    });
    return out.toString().trim();
  }

  async start(...args: string[]): Promise<this> {
    const child = spawn(BINARY, args, { env: this.env, stdio: ["ignore", "ignore", "pipe"] });
    this.process = child;
    this.address = await new Promise<string>((resolve, reject) => {
      const lines = createInterface({ input: child.stderr! });
      const timer = setTimeout(() => reject(new Error("krisp-ingest did not start")), 60000);
      lines.on("line", (line) => {
        const match = line.match(/listening on (\S+)/);
        if (match?.[1]) {
          clearTimeout(timer);
          resolve(match[1]);
        }
      });
      child.once("exit", (code) => reject(new Error(`krisp-ingest exited with ${code}`)));
    });
    return this;
  }

  async stop() {
    const child = this.process;
    if (!child || child.exitCode !== null) return;
    const exited = new Promise((resolve) => child.once("exit", resolve));
    child.kill("SIGTERM");
    await exited;
  }
}
