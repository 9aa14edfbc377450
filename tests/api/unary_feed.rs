use krisp_ingest::proto::{self, timeline_entry::Entry};
use tonic::Code;

use crate::helpers::{
    at, count, lock_participation, refuse_sentiments_scored, sentiment_inserts_waiting, sentiments,
    spawn_app, t0, violated_fields,
};

fn sentiment(start: i64, end: i64, score: Option<f64>) -> proto::NewSentiment {
    proto::NewSentiment {
        started_at: at(t0(), start),
        ended_at: at(t0(), end),
        label: proto::SentimentLabel::Negative as i32,
        score,
    }
}

#[tokio::test]
async fn a_sentiment_is_recorded_and_returned_as_stored() {
    let app = spawn_app().await;
    let participation = app.participation().await;
    let mut sent = sentiment(5, 9, Some(-0.5));
    // Nanoseconds are truncated to the microseconds PostgreSQL keeps.
    sent.started_at.as_mut().unwrap().nanos = 123_456_789;
    let stored = app
        .client
        .clone()
        .record_sentiment(proto::RecordSentimentRequest {
            request_id: String::new(),
            participation_id: participation.id.clone(),
            sentiment: Some(sent),
        })
        .await
        .unwrap()
        .into_inner()
        .sentiment
        .unwrap();
    assert_eq!(stored.started_at.unwrap().nanos, 123_456_000);
    assert_eq!(stored.score, Some(-0.5));
    let row: (String, f64, i64) = sqlx::query_as(
        "SELECT label, score, (extract(epoch FROM started_at) * 1000000)::bigint - 1750000000000000 FROM sentiments WHERE id = $1",
    )
    .bind(stored.id.parse::<uuid::Uuid>().unwrap())
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(row, ("negative".to_owned(), -0.5, 5_123_456));
}

#[tokio::test]
async fn bad_sentiments_are_refused_with_their_field() {
    let app = spawn_app().await;
    let participation = app.participation().await;
    let mut client = app.client.clone();
    let cases = [
        (sentiment(9, 5, None), "sentiment.ended_at"),
        (sentiment(5, 5, None), "sentiment.ended_at"),
        (sentiment(1, 2, Some(f64::NAN)), "sentiment.score"),
        (sentiment(1, 2, Some(f64::INFINITY)), "sentiment.score"),
        (sentiment(1, 2, Some(1.5)), "sentiment.score"),
        // Before the participation connected (t0).
        (sentiment(-5, 2, None), "sentiment.started_at"),
        (
            proto::NewSentiment {
                label: 0,
                ..sentiment(1, 2, None)
            },
            "sentiment.label",
        ),
        (
            proto::NewSentiment {
                label: 77,
                ..sentiment(1, 2, None)
            },
            "sentiment.label",
        ),
        (
            proto::NewSentiment {
                started_at: None,
                ..sentiment(1, 2, None)
            },
            "sentiment.started_at",
        ),
    ];
    for (bad, field) in cases {
        let status = client
            .record_sentiment(proto::RecordSentimentRequest {
                request_id: String::new(),
                participation_id: participation.id.clone(),
                sentiment: Some(bad),
            })
            .await
            .unwrap_err();
        assert_eq!(violated_fields(&status), [field], "{bad:?}");
    }
    let status = client
        .record_sentiment(proto::RecordSentimentRequest {
            request_id: String::new(),
            participation_id: uuid::Uuid::new_v4().to_string(),
            sentiment: Some(sentiment(1, 2, None)),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(count(&app.db, "SELECT count(*) FROM sentiments").await, 0);
}

#[tokio::test]
async fn items_after_the_participation_ended_are_refused() {
    let app = spawn_app().await;
    let participation = app.participation().await;
    let mut client = app.client.clone();
    client
        .leave_session(proto::LeaveSessionRequest {
            participation_id: participation.id.clone(),
            disconnected_at: at(t0(), 60),
            talked_time: Some(prost_types::Duration {
                seconds: 1,
                nanos: 0,
            }),
            microphone_used: true,
            speaker_used: true,
        })
        .await
        .unwrap();
    let status = client
        .record_sentiment(proto::RecordSentimentRequest {
            request_id: String::new(),
            participation_id: participation.id.clone(),
            sentiment: Some(sentiment(50, 61, None)),
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["sentiment.ended_at"]);
    let status = client
        .record_event(proto::RecordEventRequest {
            request_id: String::new(),
            participation_id: participation.id.clone(),
            event: Some(proto::NewEvent {
                occurred_at: at(t0(), 61),
                kind: proto::EventKind::Disconnected as i32,
                attributes: Default::default(),
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["event.occurred_at"]);
}

#[tokio::test]
async fn events_keep_their_attributes_and_refuse_bad_ones() {
    let app = spawn_app().await;
    let participation = app.participation().await;
    let mut client = app.client.clone();
    let event = |attributes: Vec<(&str, &str)>| proto::RecordEventRequest {
        request_id: String::new(),
        participation_id: participation.id.clone(),
        event: Some(proto::NewEvent {
            occurred_at: at(t0(), 3),
            kind: proto::EventKind::SpeakerOn as i32,
            attributes: attributes
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        }),
    };
    let stored = client
        .record_event(event(vec![("device", "AirPods Pro"), ("os", "macOS")]))
        .await
        .unwrap()
        .into_inner()
        .event
        .unwrap();
    assert_eq!(stored.attributes["device"], "AirPods Pro");
    let attributes: serde_json::Value = sqlx::query_scalar("SELECT attributes FROM events")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(
        attributes,
        serde_json::json!({"device": "AirPods Pro", "os": "macOS"})
    );

    let status = client
        .record_event(event(vec![("device", "a\0b")]))
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["event.attributes[\"device\"]"]);
    let status = client
        .record_event(event(vec![("", "x")]))
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["event.attributes[\"\"]"]);
    let status = client
        .record_event(proto::RecordEventRequest {
            request_id: String::new(),
            participation_id: participation.id.clone(),
            event: Some(proto::NewEvent {
                occurred_at: at(t0(), 1),
                kind: 0,
                attributes: Default::default(),
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["event.kind"]);
    let status = client
        .record_event(proto::RecordEventRequest {
            request_id: String::new(),
            participation_id: participation.id.clone(),
            event: None,
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["event"]);
    assert_eq!(count(&app.db, "SELECT count(*) FROM events").await, 1);
}

#[tokio::test]
async fn the_timeline_interleaves_events_and_sentiments_in_time_order() {
    let app = spawn_app().await;
    let participation = app.participation().await;
    let mut client = app.client.clone();
    for (offset, kind) in [
        (0, proto::EventKind::Connected),
        (4, proto::EventKind::TalkStarted),
    ] {
        client
            .record_event(proto::RecordEventRequest {
                request_id: String::new(),
                participation_id: participation.id.clone(),
                event: Some(proto::NewEvent {
                    occurred_at: at(t0(), offset),
                    kind: kind as i32,
                    attributes: Default::default(),
                }),
            })
            .await
            .unwrap();
    }
    for s in [sentiments(6, 1), sentiments(2, 1), sentiments(4, 1)] {
        client
            .record_sentiment(proto::RecordSentimentRequest {
                request_id: String::new(),
                participation_id: participation.id.clone(),
                sentiment: s.into_iter().next(),
            })
            .await
            .unwrap();
    }
    let mut stream = client
        .get_timeline(proto::GetTimelineRequest {
            participation_id: participation.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    while let Some(message) = stream.message().await.unwrap() {
        seen.push(match message.entry.unwrap().entry.unwrap() {
            Entry::Event(e) => format!(
                "event@{}",
                e.occurred_at.unwrap().seconds - t0().timestamp()
            ),
            Entry::Sentiment(s) => format!(
                "sentiment@{}",
                s.started_at.unwrap().seconds - t0().timestamp()
            ),
        });
    }
    assert_eq!(
        seen,
        [
            "event@0",
            "sentiment@2",
            "event@4",
            "sentiment@4",
            "sentiment@6"
        ]
    );

    let status = client
        .get_timeline(proto::GetTimelineRequest {
            participation_id: uuid::Uuid::new_v4().to_string(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
}

/// Concurrent unary records are written together (group commit); each call still gets
/// its own outcome, and one item's failure is never another's. Calls with and without a
/// request_id are mixed (a batch writes them in a statement each).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_records_each_get_their_own_outcome() {
    let app = spawn_app().await;
    let participation = app.participation().await;
    // The database refuses rows with this score (a real write failure, for one item).
    refuse_sentiments_scored(&app.db, 0.875).await;
    let unknown = uuid::Uuid::new_v4().to_string();
    let calls: Vec<_> = (0..300)
        .map(|i| {
            let mut client = app.client.clone();
            let (participation_id, s, expected) = match i % 10 {
                // Before the participation connected.
                3 => (
                    participation.id.clone(),
                    sentiment(-5, 1, None),
                    Code::InvalidArgument,
                ),
                7 => (unknown.clone(), sentiment(1, 2, None), Code::NotFound),
                9 if i == 99 => (
                    participation.id.clone(),
                    sentiment(1, 2, Some(0.875)),
                    Code::Internal,
                ),
                _ => (
                    participation.id.clone(),
                    sentiment(i, i + 1, Some(0.5)),
                    Code::Ok,
                ),
            };
            let request_id = if i % 2 == 0 {
                uuid::Uuid::new_v4().to_string()
            } else {
                String::new()
            };
            tokio::spawn(async move {
                let outcome = client
                    .record_sentiment(proto::RecordSentimentRequest {
                        request_id: request_id.clone(),
                        participation_id,
                        sentiment: Some(s),
                    })
                    .await;
                if let (Ok(response), false) = (&outcome, request_id.is_empty()) {
                    let stored = response.get_ref().sentiment.as_ref().unwrap();
                    assert_eq!(stored.id, request_id, "call {i}");
                }
                let code = outcome
                    .as_ref()
                    .map_or_else(|status| status.code(), |_| Code::Ok);
                (i, code, expected)
            })
        })
        .collect();
    let mut stored = 0;
    for call in calls {
        let (i, code, expected) = call.await.unwrap();
        assert_eq!(code, expected, "call {i}");
        stored += i64::from(code == Code::Ok);
    }
    assert_eq!(stored, 239);
    assert_eq!(
        count(&app.db, "SELECT count(*) FROM sentiments").await,
        stored
    );
}

/// Group commit writes one batch at a time, but a batch stuck on a lock does not hold up
/// the calls behind it: after a short wait the next batch goes beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_stuck_on_a_lock_does_not_hold_up_other_calls() {
    let app = spawn_app().await;
    let stuck = app.participation().await;
    let other = app.participation().await;
    // Another session locks the stuck participation's row: a sentiment of it waits in
    // its foreign-key check until that transaction ends.
    let locker = lock_participation(&app.db, &stuck.id).await;
    let record = |participation_id: &str, second: i64| {
        let mut client = app.client.clone();
        let request = proto::RecordSentimentRequest {
            request_id: String::new(),
            participation_id: participation_id.to_owned(),
            sentiment: Some(sentiment(second, second + 1, None)),
        };
        async move { client.record_sentiment(request).await.map(drop) }
    };
    let waiting = tokio::spawn(record(&stuck.id, 1));
    sentiment_inserts_waiting(&app.db, 1).await;
    for second in 0..5 {
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            record(&other.id, second),
        )
        .await
        .expect("a call was held up behind the stuck batch")
        .unwrap();
    }
    assert!(!waiting.is_finished());
    locker.rollback().await.unwrap();
    waiting.await.unwrap().unwrap();
    let stored = |id: &str| {
        let sql = format!("SELECT count(*) FROM sentiments WHERE participation_id = '{id}'");
        let db = app.db.clone();
        async move { count(&db, &sql).await }
    };
    assert_eq!((stored(&stuck.id).await, stored(&other.id).await), (1, 5));
}
