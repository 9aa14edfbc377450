// The typed client against a live server that the test starts: the example, unary calls
// and their errors, a client stream with an invalid item (named by its index, nothing
// stored), a live feed cut and resumed, and mutual TLS with an API key.
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { randomUUID } from "node:crypto";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";

import { create } from "@bufbuild/protobuf";

import { Code, ConnectError, connect, fieldViolations, sentiments, streamSentiments, ts } from "../src/client.js";
import { run } from "../src/example.js";
import { FeedItemSchema } from "../src/gen/krisp/ingest/v1/ingest_service_pb.js";
import { SentimentLabel, SessionType } from "../src/gen/krisp/ingest/v1/resources_pb.js";
import { LiveFeed } from "../src/live-feed.js";
import { REPO, Server } from "./server.js";

const server = new Server();
before(async () => {
  await server.start();
});
after(async () => {
  await server.stop();
});

const hourAgo = () => new Date(Math.floor(Date.now() / 1000) * 1000 - 3600 * 1000);

/** A user in a session an hour old; returns the participation id. */
async function participation(client: ReturnType<typeof connect>, start: Date): Promise<string> {
  await run({ address: server.address }, 1); // the UTC timezone exists after this
  const { user } = await client.createUser({ externalId: `t-${randomUUID()}` });
  const { session } = await client.createSession({ sessionType: SessionType.MEETING, startedAt: ts(start) });
  const { participation } = await client.joinSession({
    userId: user!.id,
    sessionId: session!.id,
    timezoneCode: "UTC",
    connectedAt: ts(start),
  });
  return participation!.id;
}

async function timeline(client: ReturnType<typeof connect>, participationId: string) {
  const entries = [];
  for await (const entry of client.getTimeline({ participationId })) entries.push(entry);
  return entries;
}

test("the example records a session and streams sentiments", async () => {
  const { receipt, participation } = await run({ address: server.address }, 1000);
  assert.equal(receipt.itemsStored, 1000n);
  assert.equal(receipt.replayed, false);
  assert.equal(participation.talkedTime?.seconds, 600n);
});

test("unary calls and their errors", async () => {
  const client = connect({ address: server.address });
  const { user } = await client.createUser({ externalId: `u-${randomUUID()}`, country: "US" });
  const fetched = await client.getUser({ userId: user!.id });
  assert.equal(fetched.user?.externalId, user!.externalId);
  await assert.rejects(client.getUser({ userId: randomUUID() }), (error) => {
    assert.equal(ConnectError.from(error).code, Code.NotFound);
    return true;
  });
  await assert.rejects(client.createUser({ externalId: "", country: "usa" }), (error) => {
    assert.equal(ConnectError.from(error).code, Code.InvalidArgument);
    assert.deepEqual(fieldViolations(error).map((v) => v.field), ["external_id", "country"]);
    return true;
  });
});

test("an invalid stream item is reported by its index and nothing is stored", async () => {
  const client = connect({ address: server.address });
  const start = hourAgo();
  const participationId = await participation(client, start);
  const items = sentiments(start, 600);
  items[437]!.endedAt = ts(start); // item 437 ends before it starts
  await assert.rejects(streamSentiments(client, randomUUID(), participationId, items, 200), (error) => {
    assert.equal(ConnectError.from(error).code, Code.InvalidArgument);
    assert.deepEqual(fieldViolations(error).map((v) => v.field), ["sentiments[437].ended_at"]);
    return true;
  });
  assert.equal((await timeline(client, participationId)).length, 0);
});

test("a cut live feed resumes and stores every item once", async () => {
  const client = connect({ address: server.address });
  const start = hourAgo();
  const participationId = await participation(client, start);
  const item = (seq: number) =>
    create(FeedItemSchema, {
      item: {
        case: "sentiment",
        value: {
          startedAt: ts(new Date(start.getTime() + seq * 1000)),
          endedAt: ts(new Date(start.getTime() + (seq + 1) * 1000)),
          label: SentimentLabel.POSITIVE,
          score: 0.5,
        },
      },
    });
  const feed = new LiveFeed(client, randomUUID(), participationId);
  assert.equal(await feed.append([1, 2, 3, 4, 5].map(item)), 5n);
  feed.cut(); // as a dropped connection would
  assert.equal(await feed.append([6, 7, 8].map(item)), 8n);
  assert.equal(feed.sessions, 2);
  const closed = await feed.close();
  assert.equal(closed.itemsStored, 8n);
  assert.equal((await timeline(client, participationId)).length, 8);
});

test("mutual TLS with an API key", async () => {
  const pki = mkdtempSync(join(tmpdir(), "krisp-node-pki-"));
  execFileSync(join(REPO, "scripts", "test-pki.sh"), [pki]);
  const tls = new Server();
  const apiKey = tls.createKey("node-client");
  await tls.start(
    "--tls-cert", join(pki, "server.pem"),
    "--tls-key", join(pki, "server.key"),
    "--tls-client-ca", join(pki, "ca.pem"),
  );
  try {
    const options = {
      address: tls.address,
      caFile: join(pki, "ca.pem"),
      certFile: join(pki, "client.pem"),
      keyFile: join(pki, "client.key"),
      apiKey,
    };
    const { receipt, user } = await run(options, 10);
    assert.equal(receipt.itemsStored, 10n);
    await assert.rejects(connect({ ...options, apiKey: undefined }).getUser({ userId: user.id }), (error) => {
      assert.equal(ConnectError.from(error).code, Code.Unauthenticated);
      return true;
    });
    await assert.rejects(
      connect({ ...options, certFile: undefined, keyFile: undefined }).getUser({ userId: user.id }),
      (error) => {
        // The server ends the handshake; Connect reports the broken HTTP/2 session as
        // INTERNAL or UNAVAILABLE depending on when it notices.
        const { code, message } = ConnectError.from(error);
        assert.ok([Code.Unavailable, Code.Internal].includes(code), `${code}: ${message}`);
        return true;
      },
    );
  } finally {
    await tls.stop();
  }
});
