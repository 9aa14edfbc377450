//! Every statement the service runs, checked against Citus' documented limits for DML on
//! distributed and reference tables (docs/SCALING.md, "Statements under Citus"). A real
//! Citus cluster cannot be installed here, so the statements are captured from a
//! workload that calls every RPC (sqlx logs each statement it runs), and each one that
//! modifies a table of `deploy/citus.sql` is checked with PostgreSQL's own volatility of
//! the functions it calls:
//! - UPDATE and DELETE: no VOLATILE function (clock_timestamp, random, gen_random_uuid,
//!   nextval, ...); STABLE ones only without column arguments (Citus evaluates them
//!   once, on the coordinator);
//! - RETURNING, and the SET of INSERT ... ON CONFLICT DO UPDATE: IMMUTABLE functions
//!   only.

use std::{
    cell::RefCell,
    collections::{BTreeSet, HashMap},
    sync::Once,
};

use krisp_ingest::{auth, proto};
use sqlx::PgPool;
use tracing::{
    Event, Subscriber,
    field::{Field, Visit},
};
use tracing_subscriber::{Layer, layer::Context, prelude::*};
use uuid::Uuid;

use crate::distribution::placements;
use crate::helpers::{event_frames, frames, fresh_database, sentiments, spawn_app_configured};

thread_local! {
    /// The statements sqlx ran on this thread, while a test collects them.
    static CAPTURED: RefCell<Option<Vec<String>>> = const { RefCell::new(None) };
}

/// Collects the SQL of every statement sqlx runs on a thread that is collecting. It is the
/// process's global subscriber, installed once: a thread-local one raced with other
/// tests registering sqlx's callsites (an event was then sometimes missed).
struct Statements;

#[derive(Default)]
struct StatementFields {
    summary: String,
    statement: String,
}

impl Visit for StatementFields {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "summary" => self.summary = value.to_owned(),
            "db.statement" => self.statement = value.to_owned(),
            _ => {}
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.record_str(field, &format!("{value:?}"));
    }
}

impl<S: Subscriber> Layer<S> for Statements {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        if event.metadata().target() != "sqlx::query" {
            return;
        }
        CAPTURED.with(|captured| {
            if let Some(all) = captured.borrow_mut().as_mut() {
                let mut fields = StatementFields::default();
                event.record(&mut fields);
                // sqlx logs short statements whole as the summary, long ones in
                // db.statement.
                all.push(if fields.statement.trim().is_empty() {
                    fields.summary
                } else {
                    fields.statement.trim().to_owned()
                });
            }
        });
    }
}

/// Runs `work` and returns the statements sqlx ran on this thread meanwhile (the test
/// runtime is single-threaded: the server's tasks run here too).
async fn statements_of(work: impl std::future::Future<Output = ()>) -> Vec<String> {
    static INSTALLED: Once = Once::new();
    INSTALLED.call_once(|| {
        let _ = tracing::subscriber::set_global_default(
            tracing_subscriber::registry().with(Statements),
        );
    });
    CAPTURED.with(|captured| *captured.borrow_mut() = Some(Vec::new()));
    work.await;
    CAPTURED.with(|captured| captured.borrow_mut().take().unwrap_or_default())
}

/// The most volatile kind of any function of each name: 'i', 's' or 'v'.
async fn volatility(db: &PgPool) -> HashMap<String, char> {
    let rows: Vec<(String, String)> =
        sqlx::query_as("SELECT proname::text, max(provolatile::text) FROM pg_proc GROUP BY 1")
            .fetch_all(db)
            .await
            .unwrap();
    rows.into_iter()
        .filter_map(|(name, v)| v.chars().next().map(|v| (name, v)))
        .collect()
}

/// `sql` without its string literals.
fn without_literals(sql: &str) -> String {
    let mut out = String::new();
    let mut quoted = false;
    for c in sql.chars() {
        if c == '\'' {
            quoted = !quoted;
            out.push(' ');
        } else if !quoted {
            out.push(c);
        }
    }
    out
}

/// The function calls in `sql`: (name, its argument text).
fn calls(sql: &str, functions: &HashMap<String, char>) -> Vec<(String, String)> {
    let sql = without_literals(sql);
    let bytes = sql.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if c.is_ascii_alphabetic() || c == b'_' {
            let start = i;
            while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                i += 1;
            }
            let name = sql[start..i].to_ascii_lowercase();
            let mut j = i;
            while j < bytes.len() && bytes[j] == b' ' {
                j += 1;
            }
            if j < bytes.len() && bytes[j] == b'(' && functions.contains_key(&name) {
                let (mut depth, mut k) = (0, j);
                while k < bytes.len() {
                    match bytes[k] {
                        b'(' => depth += 1,
                        b')' => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                        }
                        _ => {}
                    }
                    k += 1;
                }
                out.push((name, sql[j + 1..k.min(sql.len())].to_owned()));
            }
        } else {
            i += 1;
        }
    }
    out
}

/// Whether `args` may refer to a column: anything but parameters, literals and casts.
fn has_column_argument(args: &str) -> bool {
    let mut rest = String::new();
    let mut chars = args.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            // A parameter: $ and digits.
            '$' => {
                while chars.peek().is_some_and(char::is_ascii_digit) {
                    chars.next();
                }
            }
            // A cast: :: and a type name.
            ':' if chars.peek() == Some(&':') => {
                chars.next();
                while chars.peek().is_some_and(|c| *c == ' ') {
                    chars.next();
                }
                while chars
                    .peek()
                    .is_some_and(|c| c.is_ascii_alphanumeric() || *c == '_')
                {
                    chars.next();
                }
            }
            c => rest.push(c),
        }
    }
    rest.chars().any(|c| c.is_ascii_alphabetic() || c == '_')
}

/// The table a modification writes, and its kind; `None` for anything else.
fn modification(sql: &str) -> Option<(&'static str, String)> {
    let words: Vec<String> = sql
        .split_whitespace()
        .take(4)
        .map(|w| w.to_ascii_uppercase())
        .collect();
    let raw: Vec<&str> = sql.split_whitespace().take(4).collect();
    let table = |i: usize| {
        raw.get(i).map(|t| {
            t.trim_start_matches("public.")
                .split('(')
                .next()
                .unwrap_or_default()
                .to_ascii_lowercase()
        })
    };
    match words.first().map(String::as_str) {
        Some("UPDATE") => table(1).map(|t| ("UPDATE", t)),
        Some("DELETE") if words.get(1).map(String::as_str) == Some("FROM") => {
            table(2).map(|t| ("DELETE", t))
        }
        Some("INSERT") if words.get(1).map(String::as_str) == Some("INTO") => {
            table(2).map(|t| ("INSERT", t))
        }
        _ => None,
    }
}

/// Text after the keyword `keyword` (case-insensitive), up to any of `ends`.
fn clause<'s>(sql: &'s str, keyword: &str, ends: &[&str]) -> Option<&'s str> {
    let upper = sql.to_ascii_uppercase();
    let start = upper.find(keyword)? + keyword.len();
    let end = ends
        .iter()
        .filter_map(|e| upper[start..].find(e).map(|i| start + i))
        .min()
        .unwrap_or(sql.len());
    Some(&sql[start..end])
}

/// What in `sql` Citus refuses for a modification of one of its tables.
fn citus_violations(sql: &str, functions: &HashMap<String, char>) -> Vec<String> {
    let Some((kind, table)) = modification(sql) else {
        return Vec::new();
    };
    if !placements().contains_key(&table) {
        return Vec::new();
    }
    let mut found = Vec::new();
    let volatility = |name: &str| functions.get(name).copied().unwrap_or('v');
    if matches!(kind, "UPDATE" | "DELETE") {
        for (name, args) in calls(sql, functions) {
            match volatility(&name) {
                'v' => found.push(format!(
                    "VOLATILE function {name}() in an {kind} of Citus table {table}"
                )),
                's' if has_column_argument(&args) => found.push(format!(
                    "STABLE function {name}() called with a column in an {kind} of Citus \
                     table {table}"
                )),
                _ => {}
            }
        }
    }
    let checked_clauses = [
        ("RETURNING", " RETURNING ", &[][..]),
        (
            "ON CONFLICT DO UPDATE SET",
            " DO UPDATE SET ",
            &[" WHERE ", " RETURNING "][..],
        ),
    ];
    for (what, keyword, ends) in checked_clauses {
        if let Some(text) = clause(sql, keyword, ends) {
            for (name, _) in calls(text, functions) {
                if volatility(&name) != 'i' {
                    found.push(format!(
                        "non-IMMUTABLE function {name}() in the {what} of an {kind} of Citus \
                         table {table}"
                    ));
                }
            }
        }
    }
    found
}

/// Calls every RPC once or more, with replays, and the key management.
async fn workload(db: &PgPool) {
    // The server never re-reads its keys here: the key created below would otherwise
    // make it require one (KeyStore::load runs the same statements).
    let app = spawn_app_configured(db.clone(), |settings| {
        settings.key_refresh = std::time::Duration::from_secs(3600);
    })
    .await;
    let key = auth::create_key(db, "citus-check", &[auth::Scope::Ingest, auth::Scope::Read])
        .await
        .unwrap();
    assert!(!key.is_empty());
    auth::KeyStore::load(db).await.unwrap();
    auth::list_keys(db).await.unwrap();
    assert!(auth::revoke_key(db, "citus-check").await.unwrap());

    let mut client = app.client.clone();
    let participation = app.participation().await;
    client
        .get_user(proto::GetUserRequest {
            user_id: participation.user_id.clone(),
        })
        .await
        .unwrap();
    client
        .list_timezones(proto::ListTimezonesRequest::default())
        .await
        .unwrap();
    client
        .get_session(proto::GetSessionRequest {
            session_id: participation.session_id.clone(),
        })
        .await
        .unwrap();
    client
        .get_participation(proto::GetParticipationRequest {
            participation_id: participation.id.clone(),
        })
        .await
        .unwrap();
    // Without a request_id (the ids are the server's: no look-up across partitions), then
    // with one, twice (the second time is a replay: the stored item is looked up).
    let replayed = "0190f000-0000-7000-8000-000000000001";
    for request_id in ["", replayed, replayed] {
        let offset = if request_id.is_empty() { 9010 } else { 9000 };
        let request_id = request_id.to_owned();
        client
            .record_sentiment(proto::RecordSentimentRequest {
                participation_id: participation.id.clone(),
                sentiment: sentiments(offset, 1).pop(),
                request_id: request_id.clone(),
            })
            .await
            .unwrap();
        client
            .record_event(proto::RecordEventRequest {
                participation_id: participation.id.clone(),
                event: Some(proto::NewEvent {
                    occurred_at: crate::helpers::at(crate::helpers::t0(), offset + 1),
                    kind: proto::EventKind::Connected as i32,
                    attributes: Default::default(),
                }),
                request_id,
            })
            .await
            .unwrap();
    }
    let stream_id = Uuid::new_v4().to_string();
    for _ in 0..2 {
        let stream = frames::stream(&stream_id, &participation.id, vec![sentiments(0, 10)]);
        client
            .stream_sentiments(tokio_stream::iter(stream))
            .await
            .unwrap();
    }
    // A bulk upload, written as it arrives: its record is completed after its COPY.
    let bulk = frames::stream(
        &Uuid::new_v4().to_string(),
        &participation.id,
        vec![sentiments(100, crate::helpers::BULK_ITEMS)],
    );
    client
        .stream_sentiments(tokio_stream::iter(bulk))
        .await
        .unwrap();
    let events = event_frames::stream(
        &Uuid::new_v4().to_string(),
        &participation.id,
        vec![vec![proto::NewEvent {
            occurred_at: crate::helpers::at(crate::helpers::t0(), 5),
            kind: proto::EventKind::TalkStarted as i32,
            attributes: Default::default(),
        }]],
    );
    client
        .stream_events(tokio_stream::iter(events))
        .await
        .unwrap();
    // A live feed: open, append, a takeover, close.
    let feed_id = Uuid::new_v4().to_string();
    let (mut feed, _) =
        crate::live::FeedCall::open(app.channel.clone(), &feed_id, &participation.id).await;
    assert_eq!(feed.ack(crate::live::append(1, 6)).await, 6);
    let (mut feed, _) =
        crate::live::FeedCall::open(app.channel.clone(), &feed_id, &participation.id).await;
    feed.send(crate::live::close(6)).await.unwrap();
    let mut timeline = client
        .get_timeline(proto::GetTimelineRequest {
            participation_id: participation.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    while timeline.message().await.unwrap().is_some() {}
    client
        .leave_session(proto::LeaveSessionRequest {
            participation_id: participation.id.clone(),
            disconnected_at: crate::helpers::at(crate::helpers::t0(), 10_000),
            talked_time: Some(prost_types::Duration {
                seconds: 60,
                nanos: 0,
            }),
            microphone_used: true,
            speaker_used: true,
        })
        .await
        .unwrap();
    client
        .end_session(proto::EndSessionRequest {
            session_id: participation.session_id.clone(),
            ended_at: crate::helpers::at(crate::helpers::t0(), 20_000),
        })
        .await
        .unwrap();
    let mut request = tonic::Request::new(proto::DeleteUserRequest {
        user_id: participation.user_id.clone(),
    });
    // With a deadline, so that its statement_timeout statement is run too.
    request.set_timeout(std::time::Duration::from_secs(30));
    client.delete_user(request).await.unwrap();
}

#[tokio::test]
async fn every_statement_of_the_service_keeps_to_the_citus_dml_rules() {
    let db = fresh_database().await;
    let functions = volatility(&db).await;
    let captured: BTreeSet<String> = statements_of(workload(&db))
        .await
        .iter()
        .map(|sql| sql.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    // The workload reached the statements that matter (and the capture works).
    for expected in [
        "UPDATE ingest_streams SET items_stored",
        "UPDATE participations SET disconnected_at",
        "UPDATE sessions SET ended_at",
        "UPDATE api_keys SET revoked_at",
        "DELETE FROM user_external_ids",
        "INSERT INTO sentiments",
        "INSERT INTO events",
        "INSERT INTO timezones",
        "INSERT INTO ingest_streams",
        "INSERT INTO live_feeds",
        "UPDATE live_feeds AS f SET committed_seq",
        "UPDATE live_feeds SET closed_at",
        "SELECT set_config('statement_timeout'",
    ] {
        assert!(
            captured.iter().any(|sql| sql.starts_with(expected)),
            "no statement starting {expected:?} was captured: {captured:#?}"
        );
    }
    let mut violations = Vec::new();
    let mut modifications = 0;
    for sql in &captured {
        if modification(sql).is_some() {
            modifications += 1;
        }
        for violation in citus_violations(sql, &functions) {
            violations.push(format!("{violation}:\n    {sql}"));
        }
    }
    println!(
        "{} distinct statements, {modifications} modifications checked:",
        captured.len()
    );
    for sql in &captured {
        println!("  {sql}");
    }
    assert!(violations.is_empty(), "{violations:#?}");
}

#[tokio::test]
async fn the_statement_check_finds_what_citus_refuses() {
    let db = fresh_database().await;
    let functions = volatility(&db).await;
    for (sql, expected) in [
        (
            "UPDATE ingest_streams SET items_stored = $3, committed_at = clock_timestamp() \
             WHERE user_id = $1 AND stream_id = $2 RETURNING committed_at",
            "VOLATILE function clock_timestamp() in an UPDATE of Citus table ingest_streams",
        ),
        (
            "DELETE FROM sentiments WHERE user_id = $1 AND random() < 0.5",
            "VOLATILE function random() in an DELETE of Citus table sentiments",
        ),
        (
            "UPDATE users SET region = nextval('regions')::text WHERE id = $1",
            "VOLATILE function nextval() in an UPDATE of Citus table users",
        ),
        (
            "UPDATE participations SET timezone_code = to_char(connected_at, 'TZ') \
             WHERE user_id = $1",
            "STABLE function to_char() called with a column in an UPDATE",
        ),
        (
            "INSERT INTO users (id, external_id) VALUES ($1, $2) RETURNING id, gen_random_uuid()",
            "non-IMMUTABLE function gen_random_uuid() in the RETURNING of an INSERT",
        ),
        (
            "INSERT INTO timezones (code, utc_offset_seconds) VALUES ($1, $2) ON CONFLICT (code) \
             DO UPDATE SET utc_offset_seconds = (random() * 60)::int RETURNING code",
            "non-IMMUTABLE function random() in the ON CONFLICT DO UPDATE SET",
        ),
    ] {
        let found = citus_violations(sql, &functions).join("\n");
        assert!(
            found.contains(expected),
            "{sql}\nexpected {expected:?}, found:\n{found}"
        );
    }
    // What Citus accepts: STABLE functions without column arguments, immutable ones
    // anywhere, and tables it does not manage.
    for sql in [
        "UPDATE api_keys SET revoked_at = now() WHERE name = $1 AND revoked_at IS NULL",
        "UPDATE ingest_streams SET committed_at = statement_timestamp() WHERE user_id = $1",
        "UPDATE users SET region = upper($2) WHERE id = $1",
        "UPDATE _sqlx_migrations SET installed_on = clock_timestamp()",
    ] {
        let found = citus_violations(sql, &functions);
        assert!(found.is_empty(), "{sql}: {found:?}");
    }
}
