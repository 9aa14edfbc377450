//! A live feed read ahead of its commits: appends sent without waiting for their acks
//! are answered in order, an invalid one ends the call after those before it are
//! committed, and a feed whose writes cannot commit is read no further than its window.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};
use std::time::Duration;

use futures_util::{StreamExt, stream};
use krisp_ingest::proto::{
    self, feed_item::Item, ingest_service_client::IngestServiceClient, live_feed_request::Frame,
    live_feed_response::Frame as Reply,
};
use prost::Message;
use uuid::Uuid;

use crate::helpers::{at, spawn_app, t0, violated_fields};
use crate::live::{FeedCall, append, close, feed_rows};
use tokio::sync::oneshot;

#[tokio::test]
async fn appends_sent_ahead_are_acknowledged_in_order_and_stored_exactly() {
    let app = spawn_app().await;
    let participation = app.participation().await;
    let feed_id = Uuid::new_v4().to_string();
    let (mut call, _) = FeedCall::open(app.channel.clone(), &feed_id, &participation.id).await;
    // 40 appends of 25 items, none waiting for an ack, then the Close.
    let sender = call.tx.clone();
    let sending = tokio::spawn(async move {
        for n in 0..40 {
            sender.send(append(n * 25 + 1, 25)).await.unwrap();
        }
        sender.send(close(1000)).await.unwrap();
    });
    for n in 1..=40 {
        match call.reply().await {
            Ok(Reply::Ack(ack)) => assert_eq!(ack.committed_through, n * 25),
            other => panic!("expected the Ack of append {n}, got {other:?}"),
        }
    }
    match call.reply().await {
        Ok(Reply::Closed(closed)) => assert_eq!(closed.items_stored, 1000),
        other => panic!("expected Closed, got {other:?}"),
    }
    sending.await.unwrap();
    assert_eq!(feed_rows(&app.db, &feed_id).await, (1000, 1000, 1000));
}

#[tokio::test]
async fn an_invalid_append_sent_ahead_ends_the_call_after_the_appends_before_it() {
    let app = spawn_app().await;
    let participation = app.participation().await;
    let feed_id = Uuid::new_v4().to_string();
    let (mut call, _) = FeedCall::open(app.channel.clone(), &feed_id, &participation.id).await;
    let mut bad = append(16, 5);
    if let Some(Frame::Append(append)) = &mut bad.frame {
        append.items[2] = proto::FeedItem {
            item: Some(Item::Sentiment(proto::NewSentiment {
                started_at: at(t0(), 20),
                ended_at: at(t0(), 19),
                label: proto::SentimentLabel::Neutral as i32,
                score: None,
            })),
        };
    }
    for message in [
        append(1, 5),
        append(6, 5),
        append(11, 5),
        bad,
        append(21, 5),
    ] {
        call.tx.send(message).await.unwrap();
    }
    for through in [5, 10, 15] {
        match call.reply().await {
            Ok(Reply::Ack(ack)) => assert_eq!(ack.committed_through, through),
            other => panic!("expected Ack {through}, got {other:?}"),
        }
    }
    let status = call.reply().await.unwrap_err();
    assert_eq!(violated_fields(&status), ["items[18].ended_at"]);
    // The appends before the invalid one are stored, nothing of it or after it.
    assert_eq!(feed_rows(&app.db, &feed_id).await, (15, 15, 15));
}

/// An event of about 8 KiB (eight attributes of 1,000 characters).
fn heavy_append(seq: u64) -> proto::LiveFeedRequest {
    let attributes = (0..8)
        .map(|k| (format!("k{k}"), "x".repeat(1000)))
        .collect();
    let item = Item::Event(proto::NewEvent {
        occurred_at: at(t0(), i64::try_from(seq).unwrap()),
        kind: proto::EventKind::TalkStarted as i32,
        attributes,
    });
    proto::LiveFeedRequest {
        frame: Some(Frame::Append(proto::FeedAppend {
            first_seq: seq,
            items: vec![proto::FeedItem { item: Some(item) }],
        })),
    }
}

#[tokio::test]
async fn a_feed_that_cannot_commit_is_read_no_further_than_its_window() {
    let app = spawn_app().await;
    let participation = app.participation().await;
    let feed_id = Uuid::new_v4().to_string();
    // 2,048 appends of ~8 KiB (16 MiB), counted as the transport takes them, sent
    // once the feed is open and its row locked by another transaction (so that its
    // first write waits).
    const APPENDS: u64 = 2048;
    let (go, gate) = oneshot::channel::<()>();
    let taken = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&taken);
    let open = crate::live::open_message(&feed_id, &participation.id);
    let appends = stream::once(gate).flat_map(|_| {
        stream::iter(1..=APPENDS)
            .map(heavy_append)
            .chain(stream::iter([close(APPENDS)]))
    });
    let messages = stream::iter([open]).chain(appends).inspect(move |message| {
        counter.fetch_add(message.encoded_len(), Ordering::SeqCst);
    });
    let mut replies = IngestServiceClient::new(app.channel.clone())
        .live_feed(messages)
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        replies.message().await.unwrap().unwrap().frame,
        Some(Reply::Opened(_))
    ));
    let mut blocker = app.db.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM live_feeds WHERE feed_id = $1 FOR UPDATE")
        .bind(Uuid::parse_str(&feed_id).unwrap())
        .execute(&mut *blocker)
        .await
        .unwrap();
    go.send(()).unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    // What the client could hand over while nothing commits: the feed's window (1 MiB)
    // plus what HTTP/2 flow control and the two ends' buffers let through.
    let before = taken.load(Ordering::SeqCst);
    assert!(
        before < 8 << 20,
        "the server read {before} bytes of a feed that could not commit"
    );
    assert_eq!(feed_rows(&app.db, &feed_id).await.0, 0);
    blocker.rollback().await.unwrap();

    let mut through = 0;
    loop {
        match replies.message().await {
            Ok(Some(proto::LiveFeedResponse {
                frame: Some(Reply::Ack(ack)),
            })) => {
                assert_eq!(ack.committed_through, through + 1);
                through = ack.committed_through;
            }
            Ok(Some(proto::LiveFeedResponse {
                frame: Some(Reply::Closed(closed)),
            })) => {
                assert_eq!(closed.items_stored, APPENDS);
                break;
            }
            other => panic!("expected Ack or Closed, got {other:?}"),
        }
    }
    assert_eq!(through, APPENDS);
    let stored = i64::try_from(APPENDS).unwrap();
    assert_eq!(feed_rows(&app.db, &feed_id).await, (stored, stored, stored));
    assert!(
        taken.load(Ordering::SeqCst) > before,
        "the rest was read once writes committed"
    );
}
