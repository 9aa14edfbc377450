// A live feed for the LiveFeed RPC that keeps up: appends are pipelined up to a window,
// every item is kept until acknowledged, and any retryable error (a dropped connection, a
// replica gone, the database briefly away, ABORTED because another stream took the feed
// over) reopens the feed and resends from the position the server reports, so each item
// is stored exactly once. Errors retrying cannot fix (INVALID_ARGUMENT,
// FAILED_PRECONDITION, NOT_FOUND, ALREADY_EXISTS, and the key's) are thrown.
//
//   const feed = new LiveFeed(client, randomUUID(), participation.id);
//   for await (const items of source) await feed.append(items); // waits only when the window is full
//   const closed = await feed.close(); // once everything is committed
import { create, type MessageInitShape } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";

import type { IngestClient } from "./client.js";
import {
  type FeedAppend,
  FeedAppendSchema,
  type FeedClosed,
  type FeedItem,
  type LiveFeedRequest,
  LiveFeedRequestSchema,
  type LiveFeedResponse,
} from "./gen/krisp/ingest/v1/ingest_service_pb.js";

type Frame = MessageInitShape<typeof LiveFeedRequestSchema>["frame"];

const FINAL = new Set([
  Code.InvalidArgument,
  Code.FailedPrecondition,
  Code.NotFound,
  Code.AlreadyExists,
  Code.PermissionDenied,
  Code.Unauthenticated,
  Code.Unimplemented,
  Code.OutOfRange,
]);

export interface LiveFeedOptions {
  /** The sequence number of the first item appended; by default the one after the
   * feed's committed position. A process that numbers items itself (and may resend after
   * a restart) gives it: a resend of items the server holds with other content is refused
   * with ALREADY_EXISTS naming the item. */
  firstSeq?: bigint;
  /** Items sent and not yet acknowledged at most (the server reads 1 MiB ahead). */
  windowItems?: number;
  /** Appends sent and not yet acknowledged at most. */
  windowAppends?: number;
  /** Attempts per step before an error is thrown, and the first backoff. */
  attempts?: number;
  backoffMs?: number;
}

/** The messages of one call, pushed as the feed goes. */
class Outbox implements AsyncIterable<LiveFeedRequest> {
  private readonly queued: LiveFeedRequest[] = [];
  private wake: (() => void) | null = null;
  private ended = false;

  push(message: LiveFeedRequest) {
    this.queued.push(message);
    this.wake?.();
  }

  end() {
    this.ended = true;
    this.wake?.();
  }

  async *[Symbol.asyncIterator]() {
    for (;;) {
      const message = this.queued.shift();
      if (message) {
        yield message;
      } else if (this.ended) {
        return;
      } else {
        await new Promise<void>((resolve) => (this.wake = resolve));
        this.wake = null;
      }
    }
  }
}

interface Call {
  outbox: Outbox;
  replies: AsyncIterator<LiveFeedResponse>;
  abort: AbortController;
}

/** A resuming, pipelined feed of one participation. Await each call before the next. */
export class LiveFeed {
  /** Streams opened so far (1 + resumptions). */
  sessions = 0;
  /** The appends sent and not yet acknowledged, in order. */
  readonly inFlight: FeedAppend[] = [];
  private committedSeq = 0n;
  private nextSeq: bigint | null;
  private items = 0;
  private call: Call | null = null;
  private readonly windowItems: number;
  private readonly windowAppends: number;
  private readonly attempts: number;
  private readonly backoffMs: number;

  constructor(
    private readonly client: IngestClient,
    readonly feedId: string,
    readonly participationId: string,
    options: LiveFeedOptions = {},
  ) {
    this.nextSeq = options.firstSeq ?? null;
    this.windowItems = options.windowItems ?? 4096;
    this.windowAppends = options.windowAppends ?? 32;
    this.attempts = options.attempts ?? 8;
    this.backoffMs = options.backoffMs ?? 100;
    if (this.windowItems < 1 || this.windowAppends < 1) {
      throw new RangeError("the window must hold at least one item and one append");
    }
  }

  /** The feed's position the server acknowledged last. */
  get committed(): bigint {
    return this.committedSeq;
  }

  /** Sends `items` numbered on from the last append; waits (reading acks) while the
   * window is full. Resolves with the committed position known so far. */
  async append(items: FeedItem[]): Promise<bigint> {
    if (items.length === 0) throw new RangeError("an append carries one item at least");
    await this.retrying(async () => undefined); // numbering goes on from the feed's position
    const append = create(FeedAppendSchema, { firstSeq: this.nextSeq as bigint, items });
    this.nextSeq = (this.nextSeq as bigint) + BigInt(items.length);
    this.inFlight.push(append);
    this.items += items.length;
    this.call?.outbox.push(create(LiveFeedRequestSchema, { frame: { case: "append", value: append } }));
    await this.retrying(async () => {
      while (this.items >= this.windowItems || this.inFlight.length >= this.windowAppends) {
        await this.receive("ack");
      }
    });
    return this.committedSeq;
  }

  /** Waits until every item appended is committed; resolves with the position. */
  async flush(): Promise<bigint> {
    await this.retrying(() => this.untilEmpty());
    return this.committedSeq;
  }

  /** Closes the feed once everything is committed; resolves with its receipt. */
  async close(): Promise<FeedClosed> {
    const closed = await this.retrying(async () => {
      await this.untilEmpty();
      this.send({ case: "close", value: { finalSeq: this.committedSeq } });
      const reply = await this.receive("closed");
      if (reply.frame.case !== "closed") throw unexpected(reply);
      return reply.frame.value;
    });
    this.cut();
    return closed;
  }

  /** Drops the current stream (as a broken connection would); the next call resumes. */
  cut() {
    this.call?.abort.abort();
    this.call?.outbox.end();
    this.call = null;
  }

  private async untilEmpty() {
    while (this.inFlight.length > 0) await this.receive("ack");
  }

  private async retrying<T>(work: () => Promise<T>): Promise<T> {
    for (let attempt = 0; ; attempt += 1) {
      try {
        if (!this.call) await this.open();
        return await work();
      } catch (error) {
        const code = ConnectError.from(error).code;
        if (FINAL.has(code) || attempt + 1 >= this.attempts) throw error;
        this.cut();
        await new Promise((resolve) => setTimeout(resolve, this.backoffMs * 2 ** attempt));
      }
    }
  }

  private async open() {
    const outbox = new Outbox();
    const abort = new AbortController();
    const replies = this.client.liveFeed(outbox, { signal: abort.signal })[Symbol.asyncIterator]();
    this.call = { outbox, replies, abort };
    this.send({ case: "open", value: { feedId: this.feedId, participationId: this.participationId } });
    const reply = await this.receive("opened");
    if (reply.frame.case !== "opened") throw unexpected(reply);
    this.sessions += 1;
    const { committedSeq } = reply.frame.value;
    if (committedSeq < this.committedSeq) {
      throw new Error(`the server reports position ${committedSeq}, below the ${this.committedSeq} it acknowledged`);
    }
    this.acknowledged(committedSeq);
    this.nextSeq ??= committedSeq + 1n;
    for (const append of this.inFlight) this.send({ case: "append", value: append });
  }

  private send(frame: Frame) {
    if (!this.call) throw new ConnectError("the feed is not open", Code.Unavailable);
    this.call.outbox.push(create(LiveFeedRequestSchema, { frame }));
  }

  private async receive(expected: LiveFeedResponse["frame"]["case"]): Promise<LiveFeedResponse> {
    if (!this.call) throw new ConnectError("the feed is not open", Code.Unavailable);
    const next = await this.call.replies.next();
    if (next.done) throw new ConnectError("the feed stream ended", Code.Unavailable);
    const reply = next.value;
    if (reply.frame.case !== expected) throw unexpected(reply);
    if (reply.frame.case === "ack") this.acknowledged(reply.frame.value.committedThrough);
    return reply;
  }

  /** Every item up to `through` is committed: drops the appends it covers. */
  private acknowledged(through: bigint) {
    if (through > this.committedSeq) this.committedSeq = through;
    while (this.inFlight.length > 0) {
      const first = this.inFlight[0] as FeedAppend;
      const last = first.firstSeq + BigInt(first.items.length) - 1n;
      if (last <= through) {
        this.inFlight.shift();
        this.items -= first.items.length;
      } else {
        if (first.firstSeq <= through) {
          // Only an ack of an append sent differently covers part of one.
          const kept = first.items.slice(Number(through - first.firstSeq + 1n));
          this.items -= first.items.length - kept.length;
          this.inFlight[0] = create(FeedAppendSchema, { firstSeq: through + 1n, items: kept });
        }
        break;
      }
    }
  }
}

function unexpected(reply: LiveFeedResponse): Error {
  return new ConnectError(`unexpected reply ${reply.frame.case ?? "(none)"}`, Code.Internal);
}
