// The TypeScript driver of `krisp-bench helpers`: one live feed through the client
// package's helper, `window` appends in flight at most. Prints `<items> <seconds>`: the
// time from the first append to the close, the items built beforehand.
//
// Usage: node feed_helper.mjs <package index.js> <host:port> <participation id> <items>
//                             <per append> <window appends> <base unix seconds>
import { randomUUID } from "node:crypto";
import { createRequire } from "node:module";
import { pathToFileURL } from "node:url";

const [index, address, participationId, ...numbers] = process.argv.slice(2);
const [items, perAppend, window, base] = numbers.map(Number);
const { FeedItemSchema, LiveFeed, SentimentLabel, connect } = await import(pathToFileURL(index).href);
// @bufbuild/protobuf as the package resolves it (from its own node_modules).
const { create } = createRequire(index)("@bufbuild/protobuf");

const labels = [SentimentLabel.POSITIVE, SentimentLabel.NEUTRAL, SentimentLabel.NEGATIVE];
const stamp = (ms) => ({ seconds: BigInt(Math.floor(ms / 1000)), nanos: (ms % 1000) * 1_000_000 });
const item = (i) => {
  const start = base * 1000 + i * 100;
  return create(FeedItemSchema, {
    item: {
      case: "sentiment",
      value: { startedAt: stamp(start), endedAt: stamp(start + 100), label: labels[i % 3], score: (i % 200) / 100 - 1 },
    },
  });
};
const batches = [];
for (let first = 0; first < items; first += perAppend) {
  batches.push(Array.from({ length: Math.min(perAppend, items - first) }, (_, k) => item(first + k)));
}

const feed = new LiveFeed(connect({ address }), randomUUID(), participationId, { windowAppends: window });
const started = performance.now();
for (const batch of batches) await feed.append(batch);
const closed = await feed.close();
console.log(`${closed.itemsStored} ${(performance.now() - started) / 1000}`);
