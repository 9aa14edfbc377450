// The Node client against a live server that the test starts: unary calls, a client
// stream, and the field violation of an invalid stream item read from the error details.
'use strict';

const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const { spawn } = require('node:child_process');
const { randomUUID } = require('node:crypto');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const readline = require('node:readline');

const { connect, call, ts, streamSentiments, sentimentFrames, fieldViolations, grpc } = require('../client');
const { run } = require('../example');

const binary =
  process.env.KRISP_BIN || path.join(__dirname, '..', '..', '..', 'target', 'debug', 'krisp-ingest');
let server;
let address;

before(async () => {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'krisp-node-'));
  fs.chmodSync(root, 0o755); // as root, the cluster runs as `postgres`, which must reach it
  const env = { ...process.env, KRISP_DATA_DIR: path.join(root, 'pg'), KRISP_LISTEN: '127.0.0.1:0', KRISP_METRICS_LISTEN: 'off' };
  delete env.DATABASE_URL;
  server = spawn(binary, [], { env, stdio: ['ignore', 'ignore', 'pipe'] });
  address = await new Promise((resolve, reject) => {
    const lines = readline.createInterface({ input: server.stderr });
    const timer = setTimeout(() => reject(new Error('krisp-ingest did not start')), 60000);
    lines.on('line', (line) => {
      const match = line.match(/listening on (\S+)/);
      if (match) {
        clearTimeout(timer);
        resolve(match[1]);
      }
    });
  });
});

after(async () => {
  const exited = new Promise((resolve) => server.once('exit', resolve));
  server.kill('SIGTERM');
  await exited;
});

test('the example records a session and streams sentiments', async () => {
  const { receipt, participation } = await run(address, undefined, 1000);
  assert.equal(Number(receipt.items_stored), 1000);
  assert.equal(receipt.replayed, false);
  assert.equal(Number(participation.talked_time.seconds), 600);
});

test('unary calls and their errors', async () => {
  const client = connect(address);
  const { user } = await call(client, 'CreateUser', { external_id: `u-${randomUUID()}`, country: 'US' });
  const fetched = await call(client, 'GetUser', { user_id: user.id });
  assert.equal(fetched.user.external_id, user.external_id);
  await assert.rejects(call(client, 'GetUser', { user_id: randomUUID() }), (error) => {
    assert.equal(error.code, grpc.status.NOT_FOUND);
    return true;
  });
  await assert.rejects(call(client, 'CreateUser', { external_id: '', country: 'usa' }), (error) => {
    assert.equal(error.code, grpc.status.INVALID_ARGUMENT);
    assert.deepEqual(fieldViolations(error).map((v) => v.field), ['external_id', 'country']);
    return true;
  });
  client.close();
});

test('an invalid stream item is reported by its index and nothing is stored', async () => {
  await run(address, undefined, 1); // the UTC timezone exists after this
  const client = connect(address);
  const start = new Date(Math.floor(Date.now() / 1000) * 1000 - 3600 * 1000);
  const { user } = await call(client, 'CreateUser', { external_id: `s-${randomUUID()}` });
  const { session } = await call(client, 'CreateSession', { session_type: 'SESSION_TYPE_MEETING', started_at: ts(start) });
  const { participation } = await call(client, 'JoinSession', {
    user_id: user.id, session_id: session.id, timezone_code: 'UTC', connected_at: ts(start),
  });
  const frames = sentimentFrames(randomUUID(), participation.id, start, 600, 200);
  frames[3].batch.sentiments[37].ended_at = ts(start); // item 437 ends before it starts
  await assert.rejects(streamSentiments(client, frames), (error) => {
    assert.equal(error.code, grpc.status.INVALID_ARGUMENT);
    assert.deepEqual(fieldViolations(error).map((v) => v.field), ['sentiments[437].ended_at']);
    return true;
  });
  const entries = await new Promise((resolve, reject) => {
    const seen = [];
    client.GetTimeline({ participation_id: participation.id })
      .on('data', (entry) => seen.push(entry))
      .on('error', reject)
      .on('end', () => resolve(seen));
  });
  assert.equal(entries.length, 0);
  client.close();
});

test('a cut live feed resumes and stores every item once', async () => {
  const { LiveFeed } = require('../live-feed');
  await run(address, undefined, 1); // the UTC timezone exists after this
  const client = connect(address);
  const start = new Date(Math.floor(Date.now() / 1000) * 1000 - 3600 * 1000);
  const { user } = await call(client, 'CreateUser', { external_id: `f-${randomUUID()}` });
  const { session } = await call(client, 'CreateSession', { session_type: 'SESSION_TYPE_CALL', started_at: ts(start) });
  const { participation } = await call(client, 'JoinSession', {
    user_id: user.id, session_id: session.id, timezone_code: 'UTC', connected_at: ts(start),
  });
  const item = (seq) => ({
    sentiment: {
      started_at: ts(new Date(start.getTime() + seq * 1000)),
      ended_at: ts(new Date(start.getTime() + (seq + 1) * 1000)),
      label: 'SENTIMENT_LABEL_POSITIVE',
      score: 0.5,
    },
  });
  const feed = new LiveFeed(client, randomUUID(), participation.id);
  assert.equal(Number(await feed.append([1, 2, 3, 4, 5].map(item))), 5);
  feed.cut(); // as a dropped connection would
  assert.equal(Number(await feed.append([6, 7, 8].map(item))), 8);
  assert.equal(feed.sessions, 2);
  const closed = await feed.close();
  assert.equal(Number(closed.items_stored), 8);
  const entries = await new Promise((resolve, reject) => {
    const seen = [];
    const timeline = client.GetTimeline({ participation_id: participation.id });
    timeline.on('data', (entry) => seen.push(entry));
    timeline.on('end', () => resolve(seen));
    timeline.on('error', reject);
  });
  assert.equal(entries.length, 8);
  client.close();
});
