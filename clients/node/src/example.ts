// Records a session end to end, streams sentiments and feeds as many live:
//   npm run example -- [address] [apiKey]      (KRISP_CA_FILE etc. for TLS)
import { randomUUID } from "node:crypto";
import { pathToFileURL } from "node:url";

import { create } from "@bufbuild/protobuf";

import { type ConnectOptions, connect, sentiments, streamSentiments, ts } from "./client.js";
import { FeedItemSchema } from "./gen/krisp/ingest/v1/ingest_service_pb.js";
import { SessionType } from "./gen/krisp/ingest/v1/resources_pb.js";
import { LiveFeed } from "./live-feed.js";

export async function run(options: ConnectOptions, count = 1000) {
  const client = connect(options);
  const start = new Date(Math.floor(Date.now() / 1000) * 1000 - 3600 * 1000);
  const { user } = await client.createUser({
    externalId: `node-${randomUUID()}`,
    country: "AM",
    requestId: randomUUID(),
  });
  await client.upsertTimezone({ timezone: { code: "UTC", utcOffset: { seconds: 0n } } });
  const { session } = await client.createSession({
    sessionType: SessionType.CALL,
    startedAt: ts(start),
  });
  const { participation } = await client.joinSession({
    userId: user!.id,
    sessionId: session!.id,
    timezoneCode: "UTC",
    connectedAt: ts(start),
  });
  const receipt = await streamSentiments(
    client,
    randomUUID(),
    participation!.id,
    sentiments(start, count),
  );
  // The same count live, in appends of 100, pipelined.
  const feed = new LiveFeed(client, randomUUID(), participation!.id);
  const live = sentiments(new Date(start.getTime() + count * 1000), count);
  for (let first = 0; first < count; first += 100) {
    await feed.append(
      live.slice(first, first + 100).map((value) => create(FeedItemSchema, { item: { case: "sentiment", value } })),
    );
  }
  const closed = await feed.close();
  const left = await client.leaveSession({
    participationId: participation!.id,
    disconnectedAt: ts(new Date(start.getTime() + 3600 * 1000)),
    talkedTime: { seconds: 600n },
    microphoneUsed: true,
    speakerUsed: true,
  });
  return { user: user!, session: session!, participation: left.participation!, receipt, closed };
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  const env = process.env;
  run({
    address: process.argv[2] ?? "127.0.0.1:50051",
    apiKey: process.argv[3] ?? env.KRISP_API_KEY,
    caFile: env.KRISP_CA_FILE,
    certFile: env.KRISP_CERT_FILE,
    keyFile: env.KRISP_KEY_FILE,
  })
    .then(({ user, participation, receipt, closed }) => {
      console.log(`user ${user.id} (${user.externalId})`);
      console.log(`participation ${participation.id}: talked ${participation.talkedTime?.seconds} s`);
      console.log(`stream ${receipt.streamId}: ${receipt.itemsStored} sentiments committed`);
      console.log(`feed ${closed.feedId}: ${closed.itemsStored} sentiments committed`);
    })
    .catch((error: unknown) => {
      console.error(String(error));
      process.exit(1);
    });
}
