//! krisp-ingest: a gRPC service that ingests call analytics into PostgreSQL.
//! docs/ARCHITECTURE.md draws the layers and walks through adding an RPC.
//!
//! The layers, outermost first:
//! - [`app`]: the application assembled in one place (`Application::build`), the database
//!   it runs on, serving and shutdown;
//! - [`grpc`]: the tonic adapter (thin handlers over [`service`]), the conversion between
//!   protobuf and domain values (`grpc::convert`), and the tower middleware around every
//!   call (`grpc::middleware`: request ids, metrics, API keys, load shedding);
//! - [`service`]: the use cases, including "one client stream, one transaction";
//! - [`domain`]: validated types and the rules that need no database;
//! - [`storage`]: every SQL statement, transactions, and SQLSTATE -> [`error::Error`];
//! - [`error`]: the one place where an error becomes a `tonic::Status`.
//!
//! Beside them:
//! - [`proto`]: the generated contract, and time conversions clients share;
//! - [`config`]: the service's flags (limits, database) and their defaults;
//! - [`auth`]: API keys (hashing, scopes, the in-memory store the middleware checks);
//! - [`deadline`]: the call's deadline, which storage passes on to PostgreSQL;
//! - [`partitions`]: time partitions with pg_partman, and their maintenance;
//! - [`metrics`]: the Prometheus recorder and endpoint;
//! - [`local_postgres`]: the zero-configuration local cluster;
//! - [`telemetry`]: the logs (text or JSON).
//!
//! The command line (`src/bin/krisp-ingest/`: serve, migrate, keys, demo, feed) and the
//! benchmark (`bench/`, a package of its own) are clients of this library.

pub mod app;
pub mod auth;
pub mod config;
pub mod deadline;
pub mod domain;
pub mod error;
pub mod grpc;
pub mod local_postgres;
pub mod metrics;
pub mod partitions;
pub mod proto;
pub mod service;
pub mod storage;
pub mod telemetry;
