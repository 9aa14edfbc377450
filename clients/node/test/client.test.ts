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
  for await (const response of client.getTimeline({ participationId, chunked: true })) entries.push(...response.entries);
  return entries;
}

test("the example records a session, streams and feeds sentiments", async () => {
  const { receipt, participation, closed } = await run({ address: server.address }, 1000);
  assert.equal(receipt.itemsStored, 1000n);
  assert.equal(closed.itemsStored, 1000n);
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

/** Item `seq` of a feed from `start`: a one-second sentiment, scored `score`. */
function item(start: Date, seq: number, score = 0.5) {
  return create(FeedItemSchema, {
    item: {
      case: "sentiment",
      value: {
        startedAt: ts(new Date(start.getTime() + seq * 1000)),
        endedAt: ts(new Date(start.getTime() + (seq + 1) * 1000)),
        label: SentimentLabel.POSITIVE,
        score,
      },
    },
  });
}

const range = (first: number, last: number) => Array.from({ length: last - first + 1 }, (_, i) => first + i);

test("a pipelined live feed cut mid-way stores every item once", async () => {
  const client = connect({ address: server.address });
  const start = hourAgo();
  const participationId = await participation(client, start);
  const feed = new LiveFeed(client, randomUUID(), participationId, { windowAppends: 4 });
  for (let first = 1; first < 200; first += 10) {
    await feed.append(range(first, first + 9).map((seq) => item(start, seq)));
    assert.ok(feed.inFlight.length < 4, "never more than the window unacknowledged");
  }
  feed.cut(); // appends in flight are lost with the stream, and resent
  await feed.append(range(201, 210).map((seq) => item(start, seq)));
  assert.equal(await feed.flush(), 210n);
  assert.equal(feed.sessions, 2);
  const closed = await feed.close();
  assert.equal(closed.itemsStored, 210n);
  assert.equal((await timeline(client, participationId)).length, 210);
});

test("live-feed resends are acknowledged when identical and refused otherwise", async () => {
  const client = connect({ address: server.address });
  const start = hourAgo();
  const participationId = await participation(client, start);
  const feedId = randomUUID();
  const first = new LiveFeed(client, feedId, participationId);
  await first.append(range(1, 5).map((seq) => item(start, seq)));
  assert.equal(await first.flush(), 5n);
  first.cut();
  // A process that numbers its items itself resends 3..6 after a restart.
  const again = new LiveFeed(client, feedId, participationId, { firstSeq: 3n });
  await again.append(range(3, 6).map((seq) => item(start, seq)));
  assert.equal(await again.flush(), 6n);
  again.cut();
  const other = new LiveFeed(client, feedId, participationId, { firstSeq: 4n });
  await assert.rejects(
    (async () => {
      await other.append(range(4, 8).map((seq) => item(start, seq, 0.9)));
      await other.flush();
    })(),
    (error) => {
      const { code, rawMessage } = ConnectError.from(error);
      assert.equal(code, Code.AlreadyExists);
      assert.match(rawMessage, /item 4 /);
      return true;
    },
  );
  other.cut();
  const scores = (await timeline(client, participationId)).map((entry) =>
    entry.entry.case === "sentiment" ? entry.entry.value.score : undefined,
  );
  assert.deepEqual(scores, [0.5, 0.5, 0.5, 0.5, 0.5, 0.5]);
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
