// A krisp-ingest client for Node, loading the contract from ../../proto at run time.
'use strict';

const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const PROTO_ROOT = path.join(__dirname, '..', '..', 'proto');

const definition = protoLoader.loadSync('krisp/ingest/v1/ingest_service.proto', {
  includeDirs: [PROTO_ROOT],
  keepCase: true,
  longs: Number,
  enums: String,
  defaults: true,
  oneofs: true,
});
const { IngestService } = grpc.loadPackageDefinition(definition).krisp.ingest.v1;

/** A client for the server at `address` ("127.0.0.1:50051"), sending `apiKey` if given. */
function connect(address, apiKey) {
  const options = {};
  if (apiKey) {
    options.interceptors = [
      (opts, next) =>
        new grpc.InterceptingCall(next(opts), {
          start(metadata, listener, proceed) {
            metadata.set('authorization', `Bearer ${apiKey}`);
            proceed(metadata, listener);
          },
        }),
    ];
  }
  return new IngestService(address, grpc.credentials.createInsecure(), options);
}

/** A google.protobuf.Timestamp for a Date. */
function ts(date) {
  const millis = date.getTime();
  return { seconds: Math.floor(millis / 1000), nanos: (millis % 1000) * 1e6 };
}

/** Calls a unary method and resolves with its response. */
function call(client, method, request) {
  return new Promise((resolve, reject) =>
    client[method](request, (error, response) => (error ? reject(error) : resolve(response))),
  );
}

/** Sends a whole client stream (header, batches, trailer) and resolves with the receipt. */
function streamSentiments(client, frames) {
  return new Promise((resolve, reject) => {
    const stream = client.StreamSentiments((error, response) =>
      error ? reject(error) : resolve(response.receipt),
    );
    for (const frame of frames) stream.write(frame);
    stream.end();
  });
}

/** The frames of a stream of `count` one-second sentiments from `start`. */
function sentimentFrames(streamId, participationId, start, count, batch = 250) {
  const frames = [{ header: { stream_id: streamId, participation_id: participationId } }];
  for (let first = 0; first < count; first += batch) {
    const sentiments = [];
    for (let i = first; i < Math.min(first + batch, count); i += 1) {
      sentiments.push({
        started_at: ts(new Date(start.getTime() + i * 1000)),
        ended_at: ts(new Date(start.getTime() + (i + 1) * 1000)),
        label: i % 2 ? 'SENTIMENT_LABEL_POSITIVE' : 'SENTIMENT_LABEL_NEUTRAL',
        score: 0.5,
      });
    }
    frames.push({ batch: { sentiments } });
  }
  frames.push({ trailer: { item_count: count } });
  return frames;
}

// google.rpc.Status and BadRequest, to read the rich error details of INVALID_ARGUMENT.
const richErrors = protobuf.Root.fromJSON({
  nested: {
    Any: { fields: { type_url: { type: 'string', id: 1 }, value: { type: 'bytes', id: 2 } } },
    Status: {
      fields: {
        code: { type: 'int32', id: 1 },
        message: { type: 'string', id: 2 },
        details: { rule: 'repeated', type: 'Any', id: 3 },
      },
    },
    FieldViolation: {
      fields: { field: { type: 'string', id: 1 }, description: { type: 'string', id: 2 } },
    },
    BadRequest: { fields: { field_violations: { rule: 'repeated', type: 'FieldViolation', id: 1 } } },
  },
});

/** The field violations of an INVALID_ARGUMENT error, as [{field, description}]. */
function fieldViolations(error) {
  const [bytes] = error.metadata.get('grpc-status-details-bin');
  if (!bytes) return [];
  const status = richErrors.lookupType('Status').decode(bytes);
  return status.details
    .filter((d) => d.type_url.endsWith('/google.rpc.BadRequest'))
    .flatMap((d) => richErrors.lookupType('BadRequest').decode(d.value).field_violations)
    .map(({ field, description }) => ({ field, description }));
}

module.exports = { connect, call, ts, streamSentiments, sentimentFrames, fieldViolations, grpc };
