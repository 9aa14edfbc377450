//! Integration tests: the real gRPC server on a loopback port against real PostgreSQL,
//! one fresh database per test. They assert what a client sees (status codes, error
//! details) and what the database holds.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod auth;
mod binary;
mod citus;
mod client_feed;
mod commit_cutter;
mod deletes;
mod distribution;
mod feed_plans;
mod helpers;
mod hostile;
mod idempotency;
mod item_times;
mod least_privilege;
mod limits;
mod live;
mod live_faults;
mod live_window;
mod lost_commits;
mod metrics;
mod migrations;
mod outage;
mod participations;
mod partitions;
mod prometheus;
mod replicas;
mod server;
mod spool;
mod startup;
mod streams;
mod timeline;
mod tls;
mod traces;
mod unary_feed;
mod users_timezones_sessions;
