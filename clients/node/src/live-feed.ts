// A resuming live feed for krisp-ingest's LiveFeed RPC: keeps every item until the server
// acknowledges it; after a retryable error (a dropped connection, a replica gone, the
// database briefly away, ABORTED because another stream took the feed over) it opens the
// feed again and resends from the position the server reports, so each item is stored
// exactly once. Errors retrying cannot fix (INVALID_ARGUMENT, FAILED_PRECONDITION,
// NOT_FOUND, ALREADY_EXISTS, and the key's) are thrown.
//
//   const feed = new LiveFeed(client, randomUUID(), participation.id);
//   await feed.append([item, ...]); // resolves with the committed position, once committed
//   const closed = await feed.close();
import { create, type MessageInitShape } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";

import type { IngestClient } from "./client.js";
import {
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
]);

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

export class LiveFeed {
  /** The position the server has committed. */
  committed = 0n;
  /** Streams opened so far (1 + resumptions). */
  sessions = 0;
  private nextSeq: bigint | null = null;
  private pending: [bigint, FeedItem][] = [];
  private call: Call | null = null;

  constructor(
    private readonly client: IngestClient,
    readonly feedId: string,
    readonly participationId: string,
    private readonly options = { attempts: 8, backoffMs: 100 },
  ) {}

  /** Sends `items`; resolves with the committed position once they are committed. */
  async append(items: FeedItem[]): Promise<bigint> {
    await this.retrying(async () => undefined);
    for (const item of items) {
      this.pending.push([this.nextSeq as bigint, item]);
      this.nextSeq = (this.nextSeq as bigint) + 1n;
    }
    return this.retrying(() => this.flush());
  }

  /** Closes the feed once everything is acknowledged; resolves with its FeedClosed. */
  async close(): Promise<FeedClosed> {
    return this.retrying(async () => {
      await this.flush();
      const reply = await this.send({ case: "close", value: { finalSeq: this.committed } });
      if (reply.frame.case !== "closed") throw unexpected(reply);
      return reply.frame.value;
    });
  }

  /** Drops the current stream (as a broken connection would); the next call resumes. */
  cut() {
    this.call?.abort.abort();
    this.call?.outbox.end();
    this.call = null;
  }

  private async retrying<T>(work: () => Promise<T>): Promise<T> {
    for (let attempt = 0; ; attempt += 1) {
      try {
        if (!this.call) await this.open();
        return await work();
      } catch (error) {
        const code = ConnectError.from(error).code;
        if (FINAL.has(code) || attempt + 1 >= this.options.attempts) throw error;
        this.cut();
        await new Promise((resolve) => setTimeout(resolve, this.options.backoffMs * 2 ** attempt));
      }
    }
  }

  private async open() {
    const outbox = new Outbox();
    const abort = new AbortController();
    const replies = this.client.liveFeed(outbox, { signal: abort.signal })[Symbol.asyncIterator]();
    this.call = { outbox, replies, abort };
    const reply = await this.send({
      case: "open",
      value: { feedId: this.feedId, participationId: this.participationId },
    });
    if (reply.frame.case !== "opened") throw unexpected(reply);
    this.sessions += 1;
    const { committedSeq } = reply.frame.value;
    if (committedSeq < this.committed) throw new Error("acknowledged items went missing");
    this.acknowledged(committedSeq);
    this.nextSeq ??= this.committed + 1n;
  }

  private async flush(): Promise<bigint> {
    const first = this.pending[0];
    if (first) {
      const reply = await this.send({
        case: "append",
        value: { firstSeq: first[0], items: this.pending.map(([, item]) => item) },
      });
      if (reply.frame.case !== "ack") throw unexpected(reply);
      this.acknowledged(reply.frame.value.committedThrough);
    }
    return this.committed;
  }

  private async send(frame: Frame): Promise<LiveFeedResponse> {
    const call = this.call;
    if (!call) throw new ConnectError("the feed is not open", Code.Unavailable);
    call.outbox.push(create(LiveFeedRequestSchema, { frame }));
    const next = await call.replies.next();
    if (next.done) throw new ConnectError("the feed stream ended", Code.Unavailable);
    return next.value;
  }

  private acknowledged(through: bigint) {
    this.committed = through;
    this.pending = this.pending.filter(([seq]) => seq > through);
  }
}

function unexpected(reply: LiveFeedResponse): Error {
  return new ConnectError(`unexpected reply ${reply.frame.case}`, Code.Internal);
}
