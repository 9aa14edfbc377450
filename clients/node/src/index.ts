// krisp-ingest-client: the typed TypeScript client of krisp-ingest (package
// krisp.ingest.v1). The generated messages and the service descriptor, connecting (TLS,
// mutual TLS, API keys), error details, and a pipelined, resuming live feed.
export * from "./client.js";
export * from "./live-feed.js";
export * from "./gen/krisp/ingest/v1/ingest_service_pb.js";
export * from "./gen/krisp/ingest/v1/resources_pb.js";
