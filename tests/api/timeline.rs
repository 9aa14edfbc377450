//! GetTimeline reads: time ranges (half-open), a read resumed after its last entry,
//! entries in chunks, one snapshot per read, and only the partitions of the range read.
//! The `pub` checks run on Citus as well (`citus::rpcs`).

use chrono::{DateTime, TimeDelta, Utc};
use krisp_ingest::{
    domain::{EntryKind, Participation, TimelinePosition, TimelineRange, TimezoneCode},
    proto::{self, live_feed_response::Frame as Reply, timeline_entry::Entry, to_timestamp},
    storage,
};
use prost::Message as _;
use sqlx::PgPool;
use tonic::Code;
use uuid::Uuid;

use crate::{
    helpers::{TestApp, at, empty_database, spawn_app, spawn_app_on, t0, violated_fields},
    live::{FeedCall, append},
};

/// A request for the whole timeline of `participation_id`, one entry a message.
pub fn request(participation_id: &str) -> proto::GetTimelineRequest {
    proto::GetTimelineRequest {
        participation_id: participation_id.into(),
        ..Default::default()
    }
}

/// Reads `request` to its end: every entry, and the number of messages.
pub async fn read(
    app: &TestApp,
    request: proto::GetTimelineRequest,
) -> (Vec<proto::TimelineEntry>, usize) {
    let chunked = request.chunked;
    let mut stream = app
        .client
        .clone()
        .get_timeline(request)
        .await
        .unwrap()
        .into_inner();
    let (mut entries, mut messages) = (Vec::new(), 0);
    while let Some(message) = stream.message().await.unwrap() {
        messages += 1;
        if chunked {
            assert!(
                message.entry.is_none() && !message.entries.is_empty(),
                "{message:?}"
            );
            entries.extend(message.entries);
        } else {
            assert!(message.entries.is_empty(), "{message:?}");
            entries.push(message.entry.unwrap());
        }
    }
    (entries, messages)
}

/// The position a client sends back in `after` for `entry`.
pub fn position(entry: &proto::TimelineEntry) -> proto::TimelinePosition {
    match entry.entry.as_ref().unwrap() {
        Entry::Sentiment(s) => proto::TimelinePosition {
            time: s.started_at,
            kind: proto::TimelineEntryKind::Sentiment as i32,
            id: s.id.clone(),
        },
        Entry::Event(e) => proto::TimelinePosition {
            time: e.occurred_at,
            kind: proto::TimelineEntryKind::Event as i32,
            id: e.id.clone(),
        },
    }
}

/// `entry`'s place in the timeline, to check the order.
fn place(entry: &proto::TimelineEntry) -> TimelinePosition {
    let p = position(entry);
    let time = p.time.unwrap();
    TimelinePosition {
        at: DateTime::from_timestamp(time.seconds, u32::try_from(time.nanos).unwrap()).unwrap(),
        kind: if p.kind == proto::TimelineEntryKind::Event as i32 {
            EntryKind::Event
        } else {
            EntryKind::Sentiment
        },
        id: Uuid::parse_str(&p.id).unwrap(),
    }
}

/// `n` sentiments of `millis` ms each, back to back from t0.
fn back_to_back(n: i64, millis: i64) -> Vec<proto::NewSentiment> {
    (0..n)
        .map(|i| proto::NewSentiment {
            started_at: Some(to_timestamp(t0() + TimeDelta::milliseconds(i * millis))),
            ended_at: Some(to_timestamp(
                t0() + TimeDelta::milliseconds((i + 1) * millis),
            )),
            label: proto::SentimentLabel::Positive as i32,
            score: Some(0.5),
        })
        .collect()
}

/// Records, for `participation_id`, at each second 0..`seconds` after t0: three
/// sentiments and two events starting at that same instant (so that ties need the
/// order's kind and id). Returns how many entries that makes.
pub async fn record_ties(app: &TestApp, participation_id: &str, seconds: i64) -> usize {
    let mut sentiments = Vec::new();
    let mut client = app.client.clone();
    for second in 0..seconds {
        for n in 0..3 {
            sentiments.push(proto::NewSentiment {
                started_at: at(t0(), second),
                ended_at: at(t0(), second + 1 + n),
                label: proto::SentimentLabel::Neutral as i32,
                score: Some(0.25),
            });
        }
        for kind in [proto::EventKind::TalkStarted, proto::EventKind::Connected] {
            client
                .record_event(proto::RecordEventRequest {
                    request_id: String::new(),
                    participation_id: participation_id.into(),
                    event: Some(proto::NewEvent {
                        occurred_at: at(t0(), second),
                        kind: kind as i32,
                        attributes: Default::default(),
                    }),
                })
                .await
                .unwrap();
        }
    }
    app.stream_sentiments(participation_id, vec![sentiments])
        .await;
    usize::try_from(seconds).unwrap() * 5
}

/// The whole timeline is in timeline order; a range holds exactly its half-open share of
/// it; a bad range or position is refused by field.
pub async fn ranges_are_half_open_and_ordered(app: &TestApp) {
    let participation = app.participation().await;
    let id = participation.id.as_str();
    let total = record_ties(app, id, 12).await;
    let (all, _) = read(app, request(id)).await;
    assert_eq!(all.len(), total);
    let places: Vec<TimelinePosition> = all.iter().map(place).collect();
    let mut sorted = places.clone();
    sorted.sort();
    assert_eq!(places, sorted, "the timeline is in timeline order");
    assert_eq!(
        places[0].kind,
        EntryKind::Event,
        "at one instant events come first"
    );

    let (from, until) = (t0() + TimeDelta::seconds(3), t0() + TimeDelta::seconds(7));
    let (ranged, _) = read(
        app,
        proto::GetTimelineRequest {
            start_time: Some(to_timestamp(from)),
            end_time: Some(to_timestamp(until)),
            ..request(id)
        },
    )
    .await;
    let expected: Vec<&proto::TimelineEntry> = all
        .iter()
        .filter(|e| (from..until).contains(&place(e).at))
        .collect();
    assert_eq!(expected.len(), 4 * 5);
    assert_eq!(ranged.iter().collect::<Vec<_>>(), expected);
    let (open_ended, _) = read(
        app,
        proto::GetTimelineRequest {
            start_time: Some(to_timestamp(until)),
            ..request(id)
        },
    )
    .await;
    assert_eq!(open_ended.len(), 5 * 5);

    let mut client = app.client.clone();
    let refused = |request| {
        let mut client = client.clone();
        async move { client.get_timeline(request).await.unwrap_err() }
    };
    let status = refused(proto::GetTimelineRequest {
        start_time: Some(to_timestamp(until)),
        end_time: Some(to_timestamp(until)),
        ..request(id)
    })
    .await;
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&status), ["end_time"]);
    let status = refused(proto::GetTimelineRequest {
        after: Some(proto::TimelinePosition {
            time: None,
            kind: 0,
            id: "x".into(),
        }),
        ..request(id)
    })
    .await;
    assert_eq!(
        violated_fields(&status),
        ["after.time", "after.kind", "after.id"]
    );
    let status = client
        .get_timeline(request(&Uuid::new_v4().to_string()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
}

/// A read cut off after any entry and resumed `after` it yields the rest: nothing
/// skipped, nothing repeated, ties included; in a range too.
pub async fn a_cut_read_resumes_after_its_last_entry(app: &TestApp) {
    let participation = app.participation().await;
    let id = participation.id.as_str();
    record_ties(app, id, 6).await;
    let range = proto::GetTimelineRequest {
        start_time: at(t0(), 1),
        end_time: at(t0(), 5),
        ..request(id)
    };
    let (all, _) = read(app, range.clone()).await;
    assert_eq!(all.len(), 4 * 5);
    for cut in 1..all.len() {
        // The client got `cut` entries and lost the stream.
        let (rest, _) = read(
            app,
            proto::GetTimelineRequest {
                after: Some(position(&all[cut - 1])),
                chunked: cut % 2 == 0,
                ..range.clone()
            },
        )
        .await;
        assert_eq!(rest, all[cut..], "resumed after entry {cut}");
    }
}

/// Chunked, the same entries come in far fewer messages, each within the chunk size
/// (plus one entry); unchunked, one a message, as clients built before chunks expect.
pub async fn chunks_carry_the_same_entries_in_fewer_messages(app: &TestApp) {
    let participation = app.participation().await;
    let id = participation.id.as_str();
    let sentiments = back_to_back(3000, 100);
    app.stream_sentiments(id, vec![sentiments]).await;
    let (one_by_one, messages) = read(app, request(id)).await;
    assert_eq!((one_by_one.len(), messages), (3000, 3000));
    let mut stream = app
        .client
        .clone()
        .get_timeline(proto::GetTimelineRequest {
            chunked: true,
            ..request(id)
        })
        .await
        .unwrap()
        .into_inner();
    let (mut chunked, mut messages) = (Vec::new(), 0);
    while let Some(message) = stream.message().await.unwrap() {
        let largest = message
            .entries
            .iter()
            .map(prost::Message::encoded_len)
            .max()
            .unwrap();
        assert!(
            message.encoded_len() <= krisp_ingest::grpc::convert::CHUNK_BYTES + largest + 16,
            "a message of {} bytes",
            message.encoded_len()
        );
        messages += 1;
        chunked.extend(message.entries);
    }
    assert_eq!(chunked, one_by_one);
    assert!(
        messages <= 3000 / 100,
        "{messages} messages for 3000 entries"
    );
}

/// Reads while a live feed appends see whole appends only, never part of one, and
/// never less than what was acknowledged before the read began.
pub async fn reads_see_whole_appends_of_a_live_feed(app: &TestApp) {
    const APPEND: u64 = 40;
    let participation = app.participation().await;
    let id = participation.id.clone();
    let feed_id = Uuid::new_v4().to_string();
    let (mut call, _) = FeedCall::open(app.channel.clone(), &feed_id, &id).await;
    let acked = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let writer = {
        let acked = acked.clone();
        tokio::spawn(async move {
            let mut next = 1;
            while next <= 20 * APPEND {
                match call.send(append(next, APPEND)).await {
                    Ok(Reply::Ack(ack)) => {
                        acked.store(ack.committed_through, std::sync::atomic::Ordering::SeqCst)
                    }
                    other => panic!("expected an ack, got {other:?}"),
                }
                next += APPEND;
            }
        })
    };
    let mut reads = 0;
    while !writer.is_finished() || reads == 0 {
        let before = acked.load(std::sync::atomic::Ordering::SeqCst);
        let (entries, _) = read(
            app,
            proto::GetTimelineRequest {
                chunked: true,
                ..request(&id)
            },
        )
        .await;
        let seen = u64::try_from(entries.len()).unwrap();
        assert_eq!(
            seen % APPEND,
            0,
            "a read saw part of an append: {seen} entries"
        );
        assert!(
            seen >= before,
            "a read saw {seen} entries after {before} were acknowledged"
        );
        reads += 1;
    }
    writer.await.unwrap();
    let (entries, _) = read(app, request(&id)).await;
    assert_eq!(entries.len(), usize::try_from(20 * APPEND).unwrap());
}

#[tokio::test]
async fn ranges_are_half_open_and_in_timeline_order() {
    ranges_are_half_open_and_ordered(&spawn_app().await).await;
}

#[tokio::test]
async fn a_cut_read_resumes_after_its_last_entry_without_skipping_or_repeating() {
    a_cut_read_resumes_after_its_last_entry(&spawn_app().await).await;
}

#[tokio::test]
async fn chunked_reads_carry_the_same_entries_in_far_fewer_messages() {
    chunks_carry_the_same_entries_in_fewer_messages(&spawn_app().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_during_a_live_feed_sees_whole_appends_only() {
    reads_see_whole_appends_of_a_live_feed(&spawn_app().await).await;
}

/// Daily partitions of sentiments and events for the `days` days from t0's.
async fn daily_partitions(db: &PgPool, days: i64) -> Vec<DateTime<Utc>> {
    let first = t0().date_naive().and_hms_opt(0, 0, 0).unwrap().and_utc();
    let starts: Vec<DateTime<Utc>> = (0..days).map(|d| first + TimeDelta::days(d)).collect();
    for table in ["sentiments", "events"] {
        for (day, start) in starts.iter().enumerate() {
            sqlx::query(&format!(
                "CREATE TABLE {table}_day{day} PARTITION OF {table} FOR VALUES FROM ('{}') TO ('{}')",
                start.to_rfc3339(),
                (*start + TimeDelta::days(1)).to_rfc3339()
            ))
            .execute(db)
            .await
            .unwrap();
        }
    }
    starts
}

/// The partitions PostgreSQL plans to read for the service's statement of `range`.
async fn partitions_planned(
    db: &PgPool,
    participation: &Participation,
    range: &TimelineRange,
) -> Vec<String> {
    let sql = format!("EXPLAIN (COSTS OFF) {}", storage::timeline_sql(range));
    let mut query = sqlx::query_scalar::<_, String>(&sql)
        .bind(participation.user_id)
        .bind(participation.id)
        .bind(storage::timeline_lower_bound(participation, range));
    if let Some(until) = range.until() {
        query = query.bind(until);
    }
    if let Some(after) = range.after_position() {
        query = query.bind(after.at).bind(1_i32).bind(after.id);
    }
    let plan = query
        .persistent(false)
        .fetch_all(db)
        .await
        .unwrap()
        .join("\n");
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT relname::text FROM pg_class WHERE relkind = 'r' \
         AND relnamespace = 'public'::regnamespace",
    )
    .fetch_all(db)
    .await
    .unwrap();
    let mut names: Vec<String> = plan
        .split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .filter(|w| tables.iter().any(|t| t == w))
        .map(str::to_owned)
        .collect();
    names.sort();
    names.dedup();
    names
}

#[tokio::test]
async fn a_range_read_plans_only_the_partitions_of_its_range() {
    let db = empty_database().await;
    storage::migrate(&db).await.unwrap();
    let days = daily_partitions(&db, 5).await;
    let app = spawn_app_on(db.clone()).await;
    let participation = app.participation().await;
    let uuid = |id: &str| Uuid::parse_str(id).unwrap();
    let stored = Participation {
        id: uuid(&participation.id),
        user_id: uuid(&participation.user_id),
        session_id: uuid(&participation.session_id),
        timezone_code: TimezoneCode::parse("UTC").unwrap(),
        connected_at: t0(),
        disconnected_at: None,
        usage: None,
    };

    let range = TimelineRange::between(
        Some(days[2] + TimeDelta::hours(1)),
        Some(days[2] + TimeDelta::hours(2)),
    )
    .unwrap();
    assert_eq!(
        partitions_planned(&db, &stored, &range).await,
        ["events_day2", "sentiments_day2"]
    );
    let range = TimelineRange::between(Some(days[1]), Some(days[3])).unwrap();
    assert_eq!(
        partitions_planned(&db, &stored, &range).await,
        [
            "events_day1",
            "events_day2",
            "sentiments_day1",
            "sentiments_day2"
        ]
    );
    let resumed = TimelineRange::between(None, Some(days[3]))
        .unwrap()
        .after(TimelinePosition {
            at: days[2] + TimeDelta::minutes(5),
            kind: EntryKind::Sentiment,
            id: Uuid::nil(),
        });
    assert_eq!(
        partitions_planned(&db, &stored, &resumed).await,
        ["events_day2", "sentiments_day2"]
    );
}

/// The backend of the server's timeline query, if one runs: its `wait_event`.
async fn timeline_query_wait(db: &PgPool) -> Option<Option<String>> {
    sqlx::query_scalar(
        "SELECT wait_event FROM pg_stat_activity \
         WHERE datname = current_database() AND state = 'active' \
           AND query LIKE 'COPY (SELECT false AS is_event%'",
    )
    .fetch_optional(db)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_holds_the_query_back_and_a_dropped_read_stops_it() {
    let app = spawn_app().await;
    let participation = app.participation().await;
    let sentiments = back_to_back(300_000, 10);
    app.stream_sentiments(
        &participation.id,
        sentiments.chunks(10_000).map(<[_]>::to_vec).collect(),
    )
    .await;
    let mut stream = app
        .client
        .clone()
        .get_timeline(request(&participation.id))
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().unwrap();
    // The client reads no further: the server stops taking rows, so PostgreSQL waits to
    // send them (what the server holds meanwhile is bounded, not the timeline).
    crate::helpers::eventually(
        "the query waits for the server to take its rows",
        || async { timeline_query_wait(&app.db).await == Some(Some("ClientWrite".to_owned())) },
    )
    .await;
    drop(stream);
    crate::helpers::eventually("the query ends once the read is dropped", || async {
        timeline_query_wait(&app.db).await.is_none()
    })
    .await;
}

/// Reads abandoned after their first entry while other calls run on the same few
/// connections: cancelling an abandoned read's statement never stops another call's
/// (the connection goes back to the pool only once the cancel is through).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_reads_never_cancel_another_calls_statement() {
    let db = crate::helpers::fresh_database().await;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect_with((*db.connect_options()).clone())
        .await
        .unwrap();
    let app = crate::helpers::spawn_app_with(pool, krisp_ingest::config::Limits::default()).await;
    let participation = app.participation().await;
    app.stream_sentiments(
        &participation.id,
        vec![crate::helpers::sentiments(0, 2_000)],
    )
    .await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let others: Vec<_> = (0..4)
        .map(|_| {
            let (mut client, stop) = (app.client.clone(), stop.clone());
            let user_id = participation.user_id.clone();
            tokio::spawn(async move {
                let mut calls = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let user_id = user_id.clone();
                    client
                        .get_user(proto::GetUserRequest { user_id })
                        .await
                        .expect("a call beside the abandoned reads");
                    calls += 1;
                }
                calls
            })
        })
        .collect();
    let mut client = app.client.clone();
    for _ in 0..300 {
        let mut stream = client
            .get_timeline(request(&participation.id))
            .await
            .unwrap()
            .into_inner();
        stream.message().await.unwrap().unwrap();
        drop(stream);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for other in others {
        assert!(other.await.unwrap() > 0);
    }
}
