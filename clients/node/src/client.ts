// A typed krisp-ingest client for Node: stubs generated from the protos (src/gen, by
// protoc-gen-es), plain gRPC over HTTP/2 (Connect's Node gRPC transport), TLS with a CA
// file and an optional client certificate (mutual TLS), an API key on every call, and the
// field violations of an INVALID_ARGUMENT error read from its details.
import { readFileSync } from "node:fs";

import { create } from "@bufbuild/protobuf";
import { timestampFromDate, type Timestamp } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, createClient, type Client, type Interceptor } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";

import { BadRequestSchema } from "./gen/google/rpc/error_details_pb.js";
import {
  IngestService,
  type StreamSentimentsRequest,
  StreamSentimentsRequestSchema,
} from "./gen/krisp/ingest/v1/ingest_service_pb.js";
import {
  type NewSentiment,
  NewSentimentSchema,
  SentimentLabel,
  type StreamReceipt,
} from "./gen/krisp/ingest/v1/resources_pb.js";

export { Code, ConnectError };
export type IngestClient = Client<typeof IngestService>;

export interface ConnectOptions {
  /** host:port of the server. */
  address: string;
  /** PEM file of the CA that signed the server's certificate; unset: plaintext. */
  caFile?: string;
  /** Client certificate and key (PEM files), for mutual TLS. */
  certFile?: string;
  keyFile?: string;
  /** Sent with every call as `authorization: Bearer <key>`. */
  apiKey?: string;
}

/** A client for the server `options` name. */
export function connect(options: ConnectOptions): IngestClient {
  const interceptors: Interceptor[] = [];
  const { apiKey } = options;
  if (apiKey) {
    interceptors.push((next) => async (request) => {
      request.header.set("authorization", `Bearer ${apiKey}`);
      return next(request);
    });
  }
  const tls = options.caFile !== undefined;
  const transport = createGrpcTransport({
    baseUrl: `${tls ? "https" : "http"}://${options.address}`,
    interceptors,
    nodeOptions: tls
      ? {
          ca: readFileSync(options.caFile as string),
          cert: options.certFile ? readFileSync(options.certFile) : undefined,
          key: options.keyFile ? readFileSync(options.keyFile) : undefined,
        }
      : {},
  });
  return createClient(IngestService, transport);
}

/** A google.protobuf.Timestamp for a Date. */
export function ts(date: Date): Timestamp {
  return timestampFromDate(date);
}

/** `count` one-second sentiments from `start` on. */
export function sentiments(start: Date, count: number): NewSentiment[] {
  return Array.from({ length: count }, (_, i) =>
    create(NewSentimentSchema, {
      startedAt: ts(new Date(start.getTime() + i * 1000)),
      endedAt: ts(new Date(start.getTime() + (i + 1) * 1000)),
      label: i % 2 ? SentimentLabel.POSITIVE : SentimentLabel.NEUTRAL,
      score: 0.5,
    }),
  );
}

/** The messages of one StreamSentiments call: header, batches of `batch`, trailer. */
export function* sentimentFrames(
  streamId: string,
  participationId: string,
  items: NewSentiment[],
  batch = 250,
): Generator<StreamSentimentsRequest> {
  yield create(StreamSentimentsRequestSchema, {
    frame: { case: "header", value: { streamId, participationId } },
  });
  for (let first = 0; first < items.length; first += batch) {
    yield create(StreamSentimentsRequestSchema, {
      frame: { case: "batch", value: { sentiments: items.slice(first, first + batch) } },
    });
  }
  yield create(StreamSentimentsRequestSchema, {
    frame: { case: "trailer", value: { itemCount: BigInt(items.length) } },
  });
}

/** Sends `items` in one client stream (all or nothing); resolves with the receipt. */
export async function streamSentiments(
  client: IngestClient,
  streamId: string,
  participationId: string,
  items: NewSentiment[],
  batch = 250,
): Promise<StreamReceipt> {
  async function* frames() {
    yield* sentimentFrames(streamId, participationId, items, batch);
  }
  const { receipt } = await client.streamSentiments(frames());
  if (!receipt) throw new Error("the server answered without a receipt");
  return receipt;
}

/** The field violations of an INVALID_ARGUMENT error, as [{field, description}]. */
export function fieldViolations(error: unknown): { field: string; description: string }[] {
  return ConnectError.from(error)
    .findDetails(BadRequestSchema)
    .flatMap((bad) => bad.fieldViolations)
    .map(({ field, description }) => ({ field, description }));
}
