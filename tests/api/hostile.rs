//! Hostile input, generated: NUL bytes, huge strings, out-of-range and reversed times,
//! NaN and infinite scores, unknown enum values, missing fields. Conversion never panics,
//! accepts only what the schema can store, and the server answers INVALID_ARGUMENT with
//! field violations (never INTERNAL) for everything it refuses.

use std::collections::HashMap;

use krisp_ingest::{grpc::convert, proto};
use proptest::prelude::*;
use tonic::Code;

fn timestamp() -> impl Strategy<Value = Option<prost_types::Timestamp>> {
    prop_oneof![
        1 => Just(None),
        2 => (any::<i64>(), any::<i32>()).prop_map(|(seconds, nanos)| Some(prost_types::Timestamp { seconds, nanos })),
        // Plausible times: a few seconds apart, in either order, inside the test's
        // participation (which connects at helpers::t0() and stays open).
        6 => (1_750_000_000i64..1_750_000_100, 0i32..1_000_000_000)
            .prop_map(|(seconds, nanos)| Some(prost_types::Timestamp { seconds, nanos })),
    ]
}

fn score() -> impl Strategy<Value = Option<f64>> {
    prop_oneof![
        Just(None),
        Just(Some(f64::NAN)),
        Just(Some(f64::INFINITY)),
        Just(Some(f64::NEG_INFINITY)),
        any::<f64>().prop_map(Some),
        (-1.5f64..1.5).prop_map(Some),
    ]
}

/// Strings with NUL bytes, other control characters, non-ASCII, and sometimes huge.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-zA-Z0-9 /_+-]{0,12}",
        2 => "\\PC{0,40}",
        1 => "[a-z]{0,5}\u{0}[a-z]{0,5}",
        1 => "[a-z]{0,5}[\u{1}-\u{1f}\u{7f}][a-z]{0,5}",
        1 => (0usize..3000).prop_map(|n| "x".repeat(n)),
    ]
}

fn new_sentiment() -> impl Strategy<Value = proto::NewSentiment> {
    (timestamp(), timestamp(), -2i32..6, score()).prop_map(
        |(started_at, ended_at, label, score)| proto::NewSentiment {
            started_at,
            ended_at,
            label,
            score,
        },
    )
}

fn new_event() -> impl Strategy<Value = proto::NewEvent> {
    (
        timestamp(),
        -2i32..16,
        prop::collection::hash_map(text(), text(), 0..40),
    )
        .prop_map(|(occurred_at, kind, attributes)| proto::NewEvent {
            occurred_at,
            kind,
            attributes,
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn accepted_sentiments_satisfy_the_schema(s in new_sentiment()) {
        if let Ok(sentiment) = convert::new_sentiment(&s) {
            prop_assert!(sentiment.ended_at > sentiment.started_at);
            prop_assert!(sentiment.score.is_none_or(|x| x.is_finite() && (-1.0..=1.0).contains(&x)));
            prop_assert!(sentiment.started_at.timestamp_subsec_nanos() % 1000 == 0);
        }
    }

    #[test]
    fn accepted_events_satisfy_the_schema(e in new_event()) {
        if let Ok(event) = convert::new_event(e) {
            prop_assert!(event.attributes.len() <= 32);
            for (key, value) in &event.attributes {
                prop_assert!((1..=64).contains(&key.chars().count()) && !key.contains('\0'));
                prop_assert!(value.chars().count() <= 1024 && !value.contains('\0'));
            }
        }
    }

    #[test]
    fn refused_users_name_their_fields(
        external_id in text(), country in text(), native_language in text(), region in text()
    ) {
        let request = proto::CreateUserRequest { external_id, country, native_language, region, request_id: String::new() };
        match convert::new_user(request) {
            Ok(convert::CreateUser { user, .. }) => {
                let external_id = user.external_id.as_str();
                prop_assert!(!external_id.contains('\0') && external_id.chars().count() <= 200);
                prop_assert!(user.country.as_ref().is_none_or(|c| c.as_str().len() == 2));
            }
            Err(violations) => {
                prop_assert!(!violations.is_empty());
                for v in violations {
                    prop_assert!(["external_id", "country", "native_language", "region"].contains(&v.field.as_str()), "{v:?}");
                }
            }
        }
    }
}

/// The same kind of input against the real server: every refusal is INVALID_ARGUMENT with
/// at least one field violation; nothing is INTERNAL or UNKNOWN; nothing invalid is stored.
#[test]
fn the_server_refuses_hostile_requests_with_field_violations() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let app = runtime.block_on(crate::helpers::spawn_app());
    let participation = runtime.block_on(app.participation());
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::with_cases(300)
    });
    assert_eq!(
        participation.connected_at,
        Some(krisp_ingest::proto::to_timestamp(crate::helpers::t0()))
    );
    let strategy = (new_sentiment(), new_event(), text(), text());
    let codes: std::sync::Mutex<HashMap<Code, u32>> = Default::default();
    // Acknowledged calls per RPC: sentiment, event, user.
    let stored: std::sync::Mutex<[i64; 3]> = Default::default();
    runner
        .run(&strategy, |(sentiment, event, external_id, country)| {
            runtime.block_on(async {
                let mut client = app.client.clone();
                let outcomes = [
                    client
                        .record_sentiment(proto::RecordSentimentRequest {
                            participation_id: participation.id.clone(),
                            sentiment: Some(sentiment),
                            request_id: String::new(),
                        })
                        .await
                        .map(|_| ()),
                    client
                        .record_event(proto::RecordEventRequest {
                            participation_id: participation.id.clone(),
                            event: Some(event),
                            request_id: String::new(),
                        })
                        .await
                        .map(|_| ()),
                    client
                        .create_user(proto::CreateUserRequest {
                            external_id,
                            country,
                            ..Default::default()
                        })
                        .await
                        .map(|_| ()),
                ];
                for (rpc, outcome) in outcomes.into_iter().enumerate() {
                    if outcome.is_ok() {
                        stored.lock().unwrap()[rpc] += 1;
                    }
                    let code = outcome.as_ref().map_or_else(|s| s.code(), |()| Code::Ok);
                    *codes.lock().unwrap().entry(code).or_default() += 1;
                    if let Err(status) = outcome {
                        // Duplicate external ids are the one legitimate non-validation refusal.
                        if status.code() == Code::AlreadyExists {
                            continue;
                        }
                        prop_assert_eq!(status.code(), Code::InvalidArgument, "{:?}", status);
                        prop_assert!(!crate::helpers::violated_fields(&status).is_empty());
                    }
                }
                Ok(())
            })
        })
        .unwrap();
    let codes = codes.into_inner().unwrap();
    let [sentiments, events, users] = stored.into_inner().unwrap();
    eprintln!(
        "hostile requests: 900 sent, outcomes {codes:?}; stored {sentiments} sentiments, \
         {events} events, {users} users"
    );
    // Valid hostile items were stored, each exactly once; nothing refused was.
    assert!(sentiments > 0 && events > 0 && users > 0, "{codes:?}");
    let rows = |sql: &'static str| runtime.block_on(crate::helpers::count(&app.db, sql));
    assert_eq!(rows("SELECT count(*) FROM sentiments"), sentiments);
    assert_eq!(rows("SELECT count(*) FROM events"), events);
    // The participation's own user, and the acknowledged ones.
    assert_eq!(rows("SELECT count(*) FROM users"), users + 1);
    // What is stored keeps the rules the server checked, as stored.
    assert_eq!(
        rows(
            "SELECT count(*) FROM sentiments WHERE ended_at <= started_at \
             OR NOT (score BETWEEN -1 AND 1) OR label NOT IN ('positive', 'neutral', 'negative')"
        ),
        0
    );
    assert_eq!(
        rows("SELECT count(*) FROM users WHERE char_length(external_id) NOT BETWEEN 1 AND 200"),
        0
    );
    assert!(
        codes.get(&Code::Ok).copied().unwrap_or(0) > 0,
        "some inputs must be valid: {codes:?}"
    );
    assert!(
        codes.get(&Code::InvalidArgument).copied().unwrap_or(0) > 0,
        "{codes:?}"
    );
}
