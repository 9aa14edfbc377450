// Records a session end to end and streams sentiments: node example.js [address] [apiKey]
'use strict';

const { randomUUID } = require('node:crypto');
const { connect, call, ts, streamSentiments, sentimentFrames } = require('./client');

async function run(address, apiKey, count = 1000) {
  const client = connect(address, apiKey);
  const start = new Date(Math.floor(Date.now() / 1000) * 1000 - 3600 * 1000);
  const { user } = await call(client, 'CreateUser', {
    external_id: `node-${randomUUID()}`,
    country: 'AM',
    request_id: randomUUID(),
  });
  await call(client, 'UpsertTimezone', { timezone: { code: 'UTC', utc_offset: { seconds: 0 } } });
  const { session } = await call(client, 'CreateSession', {
    session_type: 'SESSION_TYPE_CALL',
    started_at: ts(start),
  });
  const { participation } = await call(client, 'JoinSession', {
    user_id: user.id,
    session_id: session.id,
    timezone_code: 'UTC',
    connected_at: ts(start),
  });
  const receipt = await streamSentiments(
    client,
    sentimentFrames(randomUUID(), participation.id, start, count),
  );
  const left = await call(client, 'LeaveSession', {
    participation_id: participation.id,
    disconnected_at: ts(new Date(start.getTime() + 3600 * 1000)),
    talked_time: { seconds: 600 },
    microphone_used: true,
    speaker_used: true,
  });
  client.close();
  return { user, session, participation: left.participation, receipt };
}

if (require.main === module) {
  run(process.argv[2] || '127.0.0.1:50051', process.argv[3] || process.env.KRISP_API_KEY)
    .then(({ user, participation, receipt }) => {
      console.log(`user ${user.id} (${user.external_id})`);
      console.log(`participation ${participation.id}: talked ${participation.talked_time.seconds} s`);
      console.log(`stream ${receipt.stream_id}: ${receipt.items_stored} sentiments committed`);
    })
    .catch((error) => {
      console.error(`${error.code}: ${error.details || error.message}`);
      process.exit(1);
    });
}

module.exports = { run };
