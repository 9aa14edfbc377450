// The package as others get it: the tarball of `npm pack` (KRISP_NODE_PACKAGE, made by
// the test command; otherwise packed here from the build `npm test` just made) installed
// into a scratch project that imports it, compiles with `tsc --strict` (the package's
// declarations checked too: no skipLibCheck) and calls a live server.
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { after, before, test } from "node:test";
import { fileURLToPath } from "node:url";

import { Server } from "./server.js";

const PACKAGE = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
const TSC = join(PACKAGE, "node_modules", "typescript", "bin", "tsc");

const server = new Server();
before(async () => {
  await server.start();
});
after(async () => {
  await server.stop();
});

const APP = `import { randomUUID } from "node:crypto";
import { create } from "@bufbuild/protobuf";
import {
  Code, ConnectError, FeedItemSchema, type FeedClosed, LiveFeed, SentimentLabel, SessionType,
  connect, fieldViolations, ts,
} from "krisp-ingest-client";

const client = connect({ address: process.argv[2] ?? "" });
const start = new Date(Date.now() - 3600_000);
await client.upsertTimezone({ timezone: { code: "UTC", utcOffset: { seconds: 0n } } });
const { user } = await client.createUser({ externalId: \`scratch-\${randomUUID()}\` });
const { session } = await client.createSession({ sessionType: SessionType.CALL, startedAt: ts(start) });
const { participation } = await client.joinSession({
  userId: user?.id ?? "", sessionId: session?.id ?? "", timezoneCode: "UTC", connectedAt: ts(start),
});
const feed = new LiveFeed(client, randomUUID(), participation?.id ?? "");
const item = (seq: number) => create(FeedItemSchema, { item: { case: "sentiment", value: {
  startedAt: ts(new Date(start.getTime() + seq * 1000)),
  endedAt: ts(new Date(start.getTime() + (seq + 1) * 1000)),
  label: SentimentLabel.NEUTRAL,
} } });
await feed.append([item(1), item(2), item(3)]);
const closed: FeedClosed = await feed.close();
let violations: string[] = [];
try {
  await client.createUser({ externalId: "" });
} catch (error) {
  if (ConnectError.from(error).code === Code.InvalidArgument) {
    violations = fieldViolations(error).map((v) => v.field);
  }
}
console.log(JSON.stringify({ stored: Number(closed.itemsStored), violations }));
`;

test("the packed package installs, compiles with tsc --strict and calls the server", () => {
  const work = mkdtempSync(join(tmpdir(), "krisp-node-scratch-"));
  const tarball =
    process.env.KRISP_NODE_PACKAGE ??
    join(work, execFileSync("npm", ["pack", "--ignore-scripts", "--silent", "--pack-destination", work], {
      cwd: PACKAGE,
      encoding: "utf8",
    }).trim());
  const app = join(work, "app");
  execFileSync("mkdir", ["-p", app]);
  writeFileSync(
    join(app, "package.json"),
    JSON.stringify({
      name: "scratch",
      private: true,
      type: "module",
      dependencies: { "krisp-ingest-client": `file:${tarball}`, "@types/node": "20.19.9" },
    }),
  );
  writeFileSync(
    join(app, "tsconfig.json"),
    JSON.stringify({
      compilerOptions: {
        strict: true,
        target: "ES2022",
        module: "NodeNext",
        moduleResolution: "NodeNext",
        outDir: "dist",
        types: ["node"],
      },
      include: ["app.ts"],
    }),
  );
  writeFileSync(join(app, "app.ts"), APP);
  execFileSync("npm", ["install", "--no-audit", "--no-fund", "--prefer-offline", "--loglevel=error"], {
    cwd: app,
    stdio: "inherit",
  });
  execFileSync(process.execPath, [TSC, "-p", app], { cwd: app, stdio: "inherit" });
  const out = execFileSync(process.execPath, [join(app, "dist", "app.js"), server.address], {
    encoding: "utf8",
  });
  assert.deepEqual(JSON.parse(out), { stored: 3, violations: ["external_id"] });
});
