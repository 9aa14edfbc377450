//! Resumable live feeds (LiveFeed): each append acknowledged once committed, resumed
//! from the committed position after a cut, taken over by a newer stream, exactly once.

use krisp_ingest::proto::{
    self, feed_item::Item, ingest_service_client::IngestServiceClient, live_feed_request::Frame,
    live_feed_response::Frame as Reply,
};
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status, transport::Channel};
use uuid::Uuid;

use crate::helpers::{TestApp, at, count, leave, spawn_app, spawn_app_on, t0, violated_fields};

/// The item with sequence number `seq`: a sentiment of 1 s at t0 + seq s, or every
/// fifth an event.
pub fn item(seq: u64) -> proto::FeedItem {
    let second = i64::try_from(seq).unwrap();
    let item = if seq.is_multiple_of(5) {
        Item::Event(proto::NewEvent {
            occurred_at: at(t0(), second),
            kind: proto::EventKind::TalkStarted as i32,
            attributes: [("seq".to_owned(), seq.to_string())].into(),
        })
    } else {
        Item::Sentiment(proto::NewSentiment {
            started_at: at(t0(), second),
            ended_at: at(t0(), second + 1),
            label: proto::SentimentLabel::Positive as i32,
            score: Some(0.5),
        })
    };
    proto::FeedItem { item: Some(item) }
}

pub fn append(first_seq: u64, n: u64) -> proto::LiveFeedRequest {
    proto::LiveFeedRequest {
        frame: Some(Frame::Append(proto::FeedAppend {
            first_seq,
            items: (first_seq..first_seq + n).map(item).collect(),
        })),
    }
}

pub fn open_message(feed_id: &str, participation_id: &str) -> proto::LiveFeedRequest {
    proto::LiveFeedRequest {
        frame: Some(Frame::Open(proto::FeedOpen {
            feed_id: feed_id.into(),
            participation_id: participation_id.into(),
        })),
    }
}

pub fn close(final_seq: u64) -> proto::LiveFeedRequest {
    proto::LiveFeedRequest {
        frame: Some(Frame::Close(proto::FeedClose { final_seq })),
    }
}

/// One LiveFeed call: the test sends with `tx` and reads replies in order.
pub struct FeedCall {
    pub tx: mpsc::Sender<proto::LiveFeedRequest>,
    replies: tonic::Streaming<proto::LiveFeedResponse>,
}

impl FeedCall {
    /// Starts a call on `channel` whose first message is `first`.
    pub async fn start(channel: Channel, first: proto::LiveFeedRequest) -> Self {
        let (tx, rx) = mpsc::channel(16);
        tx.send(first).await.unwrap();
        let replies = IngestServiceClient::new(channel)
            .live_feed(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        Self { tx, replies }
    }

    /// Opens `feed_id`; returns the call and the committed position.
    pub async fn open(channel: Channel, feed_id: &str, participation_id: &str) -> (Self, u64) {
        let mut call = Self::start(channel, open_message(feed_id, participation_id)).await;
        match call.reply().await {
            Ok(Reply::Opened(opened)) => (call, opened.committed_seq),
            other => panic!("expected Opened, got {other:?}"),
        }
    }

    /// The next reply, or the status that ended the call.
    pub async fn reply(&mut self) -> Result<Reply, Status> {
        match self.replies.message().await? {
            Some(reply) => Ok(reply.frame.unwrap()),
            None => Err(Status::ok("the stream ended")),
        }
    }

    /// Sends `message` and returns the reply to it.
    pub async fn send(&mut self, message: proto::LiveFeedRequest) -> Result<Reply, Status> {
        self.tx.send(message).await.unwrap();
        self.reply().await
    }

    pub async fn ack(&mut self, message: proto::LiveFeedRequest) -> u64 {
        match self.send(message).await {
            Ok(Reply::Ack(ack)) => ack.committed_through,
            other => panic!("expected Ack, got {other:?}"),
        }
    }
}

/// Rows stored for `feed_id`: (rows, distinct sequence numbers, highest number).
pub async fn feed_rows(db: &PgPool, feed_id: &str) -> (i64, i64, i64) {
    sqlx::query_as(
        "SELECT count(*), count(DISTINCT feed_seq), coalesce(max(feed_seq), 0) FROM ( \
           SELECT feed_seq FROM sentiments WHERE stream_id = $1 \
           UNION ALL SELECT feed_seq FROM events WHERE stream_id = $1) AS rows",
    )
    .bind(Uuid::parse_str(feed_id).unwrap())
    .fetch_one(db)
    .await
    .unwrap()
}

/// A feed's row closed by anything but its stream (here by hand) takes no further item
/// from that stream, even one that names the right epoch and position: the batch
/// statement matches open feeds only, and the stream is told to go on elsewhere.
#[tokio::test]
async fn a_feed_closed_behind_its_stream_takes_no_more_items() {
    let app = spawn_app().await;
    let participation = app.participation().await;
    let feed_id = Uuid::new_v4().to_string();
    let (mut call, _) = FeedCall::open(app.channel.clone(), &feed_id, &participation.id).await;
    assert_eq!(call.ack(append(1, 3)).await, 3);
    sqlx::query("UPDATE live_feeds SET closed_at = now() WHERE feed_id = $1")
        .bind(Uuid::parse_str(&feed_id).unwrap())
        .execute(&app.db)
        .await
        .unwrap();
    let status = call.send(append(4, 2)).await.unwrap_err();
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    assert!(status.message().contains("closed"), "{status:?}");
    assert_eq!(feed_rows(&app.db, &feed_id).await, (3, 3, 3));
    let committed: i64 =
        sqlx::query_scalar("SELECT committed_seq FROM live_feeds WHERE feed_id = $1")
            .bind(Uuid::parse_str(&feed_id).unwrap())
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(committed, 3);
}

#[tokio::test]
async fn appends_are_acknowledged_once_committed_and_close_returns_a_receipt() {
    let app = spawn_app().await;
    let participation = app.participation().await;
    let feed_id = Uuid::new_v4().to_string();
    let (mut call, committed) =
        FeedCall::open(app.channel.clone(), &feed_id, &participation.id).await;
    assert_eq!(committed, 0);
    assert_eq!(call.ack(append(1, 5)).await, 5);
    // Acknowledged means committed: visible to anyone at once.
    assert_eq!(feed_rows(&app.db, &feed_id).await, (5, 5, 5));
    assert_eq!(call.ack(append(6, 4)).await, 9);
    assert_eq!(feed_rows(&app.db, &feed_id).await, (9, 9, 9));
    assert_eq!(count(&app.db, "SELECT count(*) FROM events").await, 1);
    let Ok(Reply::Closed(closed)) = call.send(close(9)).await else {
        panic!("expected Closed");
    };
    assert_eq!(closed.feed_id, feed_id);
    assert_eq!(closed.items_stored, 9);
    assert!(closed.closed_at.is_some());
    // The server ends the call with OK after Closed.
    assert_eq!(call.reply().await.unwrap_err().code(), Code::Ok);

    // A closed feed opens as closed, takes no appends, and answers Close again.
    let (mut again, committed) =
        FeedCall::open(app.channel.clone(), &feed_id, &participation.id).await;
    assert_eq!(committed, 9);
    let status = again.send(append(10, 1)).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    let (mut again, _) = FeedCall::open(app.channel.clone(), &feed_id, &participation.id).await;
    let Ok(Reply::Closed(replayed)) = again.send(close(9)).await else {
        panic!("expected Closed again");
    };
    assert_eq!(replayed.closed_at, closed.closed_at);
    assert_eq!(feed_rows(&app.db, &feed_id).await, (9, 9, 9));
}

#[tokio::test]
async fn a_resumed_feed_goes_on_after_its_committed_position_and_resends_are_not_stored() {
    let app = spawn_app().await;
    let participation = app.participation().await;
    let feed_id = Uuid::new_v4().to_string();
    let (mut call, _) = FeedCall::open(app.channel.clone(), &feed_id, &participation.id).await;
    assert_eq!(call.ack(append(1, 5)).await, 5);
    // The cut: the client drops the call.
    drop(call);
    let (mut call, committed) =
        FeedCall::open(app.channel.clone(), &feed_id, &participation.id).await;
    assert_eq!(committed, 5);
    // A resend overlapping the committed position: only 6..7 are new.
    assert_eq!(call.ack(append(3, 5)).await, 7);
    // Entirely old: acknowledged, nothing stored.
    assert_eq!(call.ack(append(1, 2)).await, 7);
    assert_eq!(feed_rows(&app.db, &feed_id).await, (7, 7, 7));
}

/// Item `seq` with other content than [`item`]'s: the same time, another label or kind.
fn other_item(seq: u64) -> proto::FeedItem {
    let mut other = item(seq);
    match other.item.as_mut().unwrap() {
        Item::Sentiment(s) => s.label = proto::SentimentLabel::Negative as i32,
        Item::Event(e) => e.kind = proto::EventKind::TalkStopped as i32,
    }
    other
}

fn append_items(first_seq: u64, items: Vec<proto::FeedItem>) -> proto::LiveFeedRequest {
    proto::LiveFeedRequest {
        frame: Some(Frame::Append(proto::FeedAppend { first_seq, items })),
    }
}

/// A resend of items sent before is acknowledged when it carries the same items, and
/// refused with ALREADY_EXISTS naming the first item that differs, storing nothing of
/// its append, when it does not: items stored (after a reopen) and items of this stream
/// not yet committed alike.
pub async fn resends_must_carry_the_items_sent_first(app: &TestApp) {
    let participation = app.participation().await;
    let feed_id = Uuid::new_v4().to_string();
    let open = || FeedCall::open(app.channel.clone(), &feed_id, &participation.id);
    let refused = |reply: Result<Reply, Status>, seq: u64| {
        let status = reply.expect_err("a resend with other content is refused");
        assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
        assert!(
            status.message().contains(&format!("item {seq} of feed")),
            "{status:?}"
        );
    };

    let (mut call, _) = open().await;
    assert_eq!(call.ack(append(1, 6)).await, 6);
    // The same items again, on the same stream: acknowledged.
    assert_eq!(call.ack(append(3, 4)).await, 6);
    // Item 5 renumbered by mistake: refused, item 7 with it.
    refused(
        call.send(append_items(5, vec![other_item(5), item(6), item(7)]))
            .await,
        5,
    );
    assert_eq!(feed_rows(&app.db, &feed_id).await, (6, 6, 6));

    // After a reopen the stored items are the reference.
    let (mut call, committed) = open().await;
    assert_eq!(committed, 6);
    assert_eq!(call.ack(append(4, 5)).await, 8);
    let (mut call, _) = open().await;
    refused(
        call.send(append_items(7, vec![item(7), other_item(8), item(9)]))
            .await,
        8,
    );
    assert_eq!(feed_rows(&app.db, &feed_id).await, (8, 8, 8));

    // Items of this stream not committed yet (or just committed): the same rule.
    let (mut call, _) = open().await;
    call.tx.send(append(9, 3)).await.unwrap();
    call.tx
        .send(append_items(10, vec![item(10), other_item(11)]))
        .await
        .unwrap();
    match call.reply().await {
        Ok(Reply::Ack(ack)) => assert_eq!(ack.committed_through, 11),
        other => panic!("expected an ack, got {other:?}"),
    }
    refused(call.reply().await, 11);
    assert_eq!(feed_rows(&app.db, &feed_id).await, (11, 11, 11));
}

#[tokio::test]
async fn resends_with_other_content_are_refused_and_identical_ones_acknowledged() {
    resends_must_carry_the_items_sent_first(&spawn_app().await).await;
}

#[tokio::test]
async fn a_newer_open_takes_the_feed_over_and_the_older_stream_is_aborted() {
    let db = crate::helpers::fresh_database().await;
    // Two replicas over one database.
    let a = spawn_app_on(db.clone()).await;
    let b = spawn_app_on(db.clone()).await;
    let participation = a.participation().await;
    let feed_id = Uuid::new_v4().to_string();
    let (mut old, _) = FeedCall::open(a.channel.clone(), &feed_id, &participation.id).await;
    assert_eq!(old.ack(append(1, 3)).await, 3);
    let (mut new, committed) = FeedCall::open(b.channel.clone(), &feed_id, &participation.id).await;
    assert_eq!(committed, 3);
    let status = old.send(append(4, 2)).await.unwrap_err();
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    assert!(
        status.message().contains("newer stream"),
        "{}",
        status.message()
    );
    assert_eq!(new.ack(append(4, 2)).await, 5);
    assert_eq!(feed_rows(&db, &feed_id).await, (5, 5, 5));
}

/// A feed checks its items against its participation as it opened; a leave while the
/// feed is open is taken in when its appends are written: items up to the leave are
/// still taken (they may arrive late), an append with one past it is refused, naming the
/// item that ends last, and nothing of it is stored.
#[tokio::test]
async fn a_leave_while_a_feed_is_open_refuses_its_appends_past_the_leave() {
    let app = spawn_app().await;
    let participation = app.participation().await;
    let feed_id = Uuid::new_v4().to_string();
    let (mut call, _) = FeedCall::open(app.channel.clone(), &feed_id, &participation.id).await;
    // Items 1 to 3 end by 4 s.
    assert_eq!(call.ack(append(1, 3)).await, 3);
    app.client
        .clone()
        .leave_session(leave(&participation.id, 10, 0))
        .await
        .expect("the items stored end before the leave");
    // Items 4 to 9 end by 10 s: taken.
    assert_eq!(call.ack(append(4, 6)).await, 9);
    // Item 10 (an event at 10 s) is in; item 11 ends at 12 s.
    let status = call.send(append(10, 2)).await.unwrap_err();
    assert_eq!(
        violated_fields(&status),
        ["items[11].ended_at"],
        "{status:?}"
    );
    assert!(
        status.message().contains("participation ended"),
        "{status:?}"
    );
    assert_eq!(feed_rows(&app.db, &feed_id).await, (9, 9, 9));
}

#[tokio::test]
async fn hostile_feed_messages_get_clear_statuses_and_store_nothing_wrongly() {
    let app = spawn_app().await;
    let participation = app.participation().await;
    let feed_id = Uuid::new_v4().to_string();
    let channel = || app.channel.clone();

    // An append before Open.
    let mut call = FeedCall::start(channel(), append(1, 1)).await;
    let status = call.reply().await.unwrap_err();
    assert_eq!(violated_fields(&status), ["append"]);

    let (mut call, _) = FeedCall::open(channel(), &feed_id, &participation.id).await;
    assert_eq!(call.ack(append(1, 5)).await, 5);
    // A gap names the expected number.
    let status = call.send(append(8, 1)).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains("expects 6"),
        "{}",
        status.message()
    );

    // An invalid item stores nothing of its append and is named by sequence number.
    let (mut call, _) = FeedCall::open(channel(), &feed_id, &participation.id).await;
    let mut bad = append(6, 3);
    if let Some(Frame::Append(append)) = &mut bad.frame {
        append.items[1] = proto::FeedItem {
            item: Some(Item::Sentiment(proto::NewSentiment {
                started_at: at(t0(), 10),
                ended_at: at(t0(), 9),
                label: proto::SentimentLabel::Neutral as i32,
                score: None,
            })),
        };
    }
    let status = call.send(bad).await.unwrap_err();
    assert_eq!(violated_fields(&status), ["items[7].ended_at"]);
    // An item before the participation began is refused the same way.
    let (mut call, _) = FeedCall::open(channel(), &feed_id, &participation.id).await;
    let mut early = append(6, 1);
    if let Some(Frame::Append(append)) = &mut early.frame {
        append.items[0] = proto::FeedItem {
            item: Some(Item::Sentiment(proto::NewSentiment {
                started_at: at(t0(), -100),
                ended_at: at(t0(), -99),
                label: proto::SentimentLabel::Neutral as i32,
                score: None,
            })),
        };
    }
    let status = call.send(early).await.unwrap_err();
    assert_eq!(violated_fields(&status), ["items[6].started_at"]);
    assert_eq!(feed_rows(&app.db, &feed_id).await, (5, 5, 5));

    // Sequence numbers start at 1; an append carries items; a message sets a frame.
    let (mut call, _) = FeedCall::open(channel(), &feed_id, &participation.id).await;
    let status = call.send(append(0, 1)).await.unwrap_err();
    assert_eq!(violated_fields(&status), ["append.first_seq"]);
    let (mut call, _) = FeedCall::open(channel(), &feed_id, &participation.id).await;
    let status = call.send(append(6, 0)).await.unwrap_err();
    assert_eq!(violated_fields(&status), ["append.items"]);
    let (mut call, _) = FeedCall::open(channel(), &feed_id, &participation.id).await;
    let status = call
        .send(proto::LiveFeedRequest { frame: None })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["frame"]);
    // A second Open on one stream.
    let (mut call, _) = FeedCall::open(channel(), &feed_id, &participation.id).await;
    let status = call
        .send(open_message(&feed_id, &participation.id))
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["open"]);

    // Close must name the committed position.
    let (mut call, _) = FeedCall::open(channel(), &feed_id, &participation.id).await;
    let status = call.send(close(4)).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");

    // The feed id for another participation of the same user: ALREADY_EXISTS.
    let other = another_participation(&app, &participation).await;
    let mut call = FeedCall::start(channel(), open_message(&feed_id, &other)).await;
    let status = call.reply().await.unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    // An unknown participation: NOT_FOUND; a malformed id: INVALID_ARGUMENT.
    let mut call = FeedCall::start(
        channel(),
        open_message(&Uuid::new_v4().to_string(), &Uuid::new_v4().to_string()),
    )
    .await;
    assert_eq!(call.reply().await.unwrap_err().code(), Code::NotFound);
    let mut call = FeedCall::start(channel(), open_message("nope", &participation.id)).await;
    assert_eq!(
        violated_fields(&call.reply().await.unwrap_err()),
        ["open.feed_id"]
    );
    assert_eq!(feed_rows(&app.db, &feed_id).await, (5, 5, 5));
}

/// A second participation of `participation`'s user, in a session of its own, after the
/// first one ends (a user is in one place at a time).
async fn another_participation(app: &TestApp, participation: &proto::Participation) -> String {
    let mut client = app.client.clone();
    client
        .leave_session(proto::LeaveSessionRequest {
            participation_id: participation.id.clone(),
            disconnected_at: at(t0(), 1000),
            talked_time: Some(prost_types::Duration {
                seconds: 10,
                nanos: 0,
            }),
            microphone_used: true,
            speaker_used: true,
        })
        .await
        .unwrap();
    let session = app
        .create_session(t0() + chrono::TimeDelta::seconds(2000))
        .await;
    let user = proto::User {
        id: participation.user_id.clone(),
        ..Default::default()
    };
    app.join(&user, &session, t0() + chrono::TimeDelta::seconds(2000))
        .await
        .unwrap()
        .id
}

#[tokio::test]
async fn the_schema_itself_refuses_a_feed_item_stored_twice() {
    let app = spawn_app().await;
    let participation = app.participation().await;
    let feed_id = Uuid::new_v4().to_string();
    let (mut call, _) = FeedCall::open(app.channel.clone(), &feed_id, &participation.id).await;
    assert_eq!(call.ack(append(1, 4)).await, 4);
    // A second copy of item 2 (another row id), as a bug in the code would write it.
    let copied = sqlx::query(
        "INSERT INTO sentiments \
             (id, user_id, participation_id, stream_id, feed_seq, started_at, ended_at, label, score) \
         SELECT gen_random_uuid(), user_id, participation_id, stream_id, feed_seq, started_at, \
                ended_at, label, score \
         FROM sentiments WHERE stream_id = $1 AND feed_seq = 2",
    )
    .bind(Uuid::parse_str(&feed_id).unwrap())
    .execute(&app.db)
    .await
    .unwrap_err();
    let code = copied.as_database_error().and_then(|e| e.code()).unwrap();
    assert_eq!(code, "23505", "{copied}");
    // A feed's position cannot go negative, nor its epoch below 1.
    for statement in [
        "UPDATE live_feeds SET committed_seq = -1",
        "UPDATE live_feeds SET epoch = 0",
    ] {
        let refused = sqlx::query(statement).execute(&app.db).await.unwrap_err();
        let code = refused.as_database_error().and_then(|e| e.code()).unwrap();
        assert_eq!(code, "23514", "{statement}: {refused}");
    }
    assert_eq!(feed_rows(&app.db, &feed_id).await, (4, 4, 4));
}
