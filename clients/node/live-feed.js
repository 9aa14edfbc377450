// A resuming live feed for krisp-ingest's LiveFeed RPC: keeps every item until the server
// acknowledges it; after a retryable error (a dropped connection, a replica gone, the
// database briefly away, ABORTED because another stream took the feed over) it opens the
// feed again and resends from the position the server reports, so each item is stored
// exactly once. Errors retrying cannot fix (INVALID_ARGUMENT, FAILED_PRECONDITION,
// NOT_FOUND, ALREADY_EXISTS) are thrown.
//
//   const feed = new LiveFeed(client, randomUUID(), participation.id);
//   await feed.append([{ sentiment: {...} }, { event: {...} }]); // resolves once committed
//   const receipt = await feed.close();
'use strict';

const { grpc } = require('./client');

const FINAL = new Set([
  grpc.status.INVALID_ARGUMENT,
  grpc.status.FAILED_PRECONDITION,
  grpc.status.NOT_FOUND,
  grpc.status.ALREADY_EXISTS,
  grpc.status.PERMISSION_DENIED,
  grpc.status.UNAUTHENTICATED,
]);

class LiveFeed {
  constructor(client, feedId, participationId, { attempts = 8, backoffMs = 100 } = {}) {
    Object.assign(this, { client, feedId, participationId, attempts, backoffMs });
    this.committed = 0;
    this.nextSeq = null;
    this.pending = []; // [seq, item], not yet acknowledged
    this.sessions = 0;
    this.call = null;
  }

  /** Sends `items` (FeedItem objects); resolves with the committed position once committed. */
  async append(items) {
    await this.retrying(async () => {});
    for (const item of items) this.pending.push([this.nextSeq++, item]);
    return this.retrying(() => this.flush());
  }

  /** Closes the feed once everything is acknowledged; resolves with its FeedClosed. */
  async close() {
    return this.retrying(async () => {
      await this.flush();
      const reply = await this.send({ close: { final_seq: this.committed } });
      return reply.closed;
    });
  }

  /** Drops the current stream (as a broken connection would); the next call resumes. */
  cut() {
    if (this.call) this.call.cancel();
    this.call = null;
  }

  async retrying(work) {
    for (let attempt = 0; ; attempt += 1) {
      try {
        if (!this.call) await this.open();
        return await work();
      } catch (error) {
        if (FINAL.has(error.code) || attempt + 1 >= this.attempts) throw error;
        this.cut();
        await new Promise((resolve) => setTimeout(resolve, this.backoffMs * 2 ** attempt));
      }
    }
  }

  async open() {
    const call = this.client.LiveFeed();
    const replies = [];
    const waiting = [];
    let failure = null;
    call.on('data', (reply) => (waiting.length ? waiting.shift().resolve(reply) : replies.push(reply)));
    call.on('error', (error) => {
      failure = error;
      for (const w of waiting.splice(0)) w.reject(error);
    });
    call.on('end', () => {
      failure = failure || Object.assign(new Error('the feed stream ended'), { code: grpc.status.UNAVAILABLE });
      for (const w of waiting.splice(0)) w.reject(failure);
    });
    this.next = () =>
      replies.length
        ? Promise.resolve(replies.shift())
        : failure
          ? Promise.reject(failure)
          : new Promise((resolve, reject) => waiting.push({ resolve, reject }));
    this.call = call;
    call.write({ open: { feed_id: this.feedId, participation_id: this.participationId } });
    const { opened } = await this.next();
    this.sessions += 1;
    if (opened.committed_seq < this.committed) throw new Error('acknowledged items went missing');
    this.acknowledged(opened.committed_seq);
    if (this.nextSeq === null) this.nextSeq = this.committed + 1;
  }

  async flush() {
    if (this.pending.length) {
      const reply = await this.send({
        append: { first_seq: this.pending[0][0], items: this.pending.map(([, item]) => item) },
      });
      this.acknowledged(reply.ack.committed_through);
    }
    return this.committed;
  }

  send(message) {
    this.call.write(message);
    return this.next();
  }

  acknowledged(through) {
    this.committed = through;
    this.pending = this.pending.filter(([seq]) => seq > through);
  }
}

module.exports = { LiveFeed };
