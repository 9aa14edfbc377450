//! krisp-ingest: a gRPC service that ingests call analytics into PostgreSQL.
//!
//! Layers, outermost first:
//! - [`grpc`]: thin tonic handlers and the conversion between protobuf and domain types;
//! - [`service`]: the use cases, including "one client stream, one transaction";
//! - [`domain`]: validated types and rules no storage may bypass;
//! - [`storage`]: sqlx queries, transactions, and SQLSTATE -> [`error::Error`];
//! - [`error`]: the one place where an error becomes a `tonic::Status`;
//! - [`deadline`]: the call's deadline, which storage passes on to PostgreSQL.

pub mod app;
pub mod auth;
pub mod client;
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
