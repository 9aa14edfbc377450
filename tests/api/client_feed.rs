//! The client crate's live-feed helper against a real server: appends pipelined within
//! the window, a cut mid-feed resumed without losing or repeating an item, an invalid
//! item returned with its sequence number, resends checked (the same items acknowledged,
//! other content ALREADY_EXISTS naming the item, nothing of it stored).

use krisp_ingest_client::{FeedOptions, LiveFeed, field_violations, with_channel};
use tonic::Code;
use uuid::Uuid;

use crate::helpers::{TestApp, spawn_app};
use crate::live::{feed_rows, item};
use krisp_ingest::proto;

fn items(first: u64, last: u64) -> Vec<proto::FeedItem> {
    (first..=last).map(item).collect()
}

/// The client crate's live feed `feed_id` of `participation_id` over `app`'s channel.
pub(crate) fn feed(
    app: &TestApp,
    feed_id: &str,
    participation_id: &str,
    options: FeedOptions,
) -> LiveFeed {
    let client = with_channel(app.channel.clone(), None).unwrap();
    LiveFeed::new(client, feed_id, participation_id, options)
}

/// A live feed of `participation_id` through the client crate's helper: `appends` one
/// after the other, then the close; panics unless every append is acknowledged.
pub(crate) async fn feed_through(
    app: &TestApp,
    participation_id: &str,
    appends: Vec<Vec<proto::FeedItem>>,
) -> proto::FeedClosed {
    let feed_id = Uuid::new_v4().to_string();
    let mut live = feed(app, &feed_id, participation_id, FeedOptions::default());
    for items in appends {
        live.append(items).await.unwrap();
    }
    live.close().await.unwrap()
}

#[tokio::test]
async fn a_pipelined_feed_cut_mid_way_stores_every_item_once() {
    let app = spawn_app().await;
    let participation = app.participation().await;
    let feed_id = Uuid::new_v4().to_string();
    let options = FeedOptions {
        window_appends: 4,
        ..FeedOptions::default()
    };
    let mut live = feed(&app, &feed_id, &participation.id, options);
    let mut most_in_flight = 0;
    for first in (1..200).step_by(10) {
        live.append(items(first, first + 9)).await.unwrap();
        most_in_flight = most_in_flight.max(live.in_flight());
    }
    // Pipelined: appends were in flight together, never as many as the window.
    assert!((1..4).contains(&most_in_flight), "{most_in_flight}");
    live.cut(); // the appends in flight go with the stream, and are resent
    live.append(items(201, 210)).await.unwrap();
    assert_eq!(live.flush().await.unwrap(), 210);
    assert_eq!(live.sessions(), 2);
    let closed = live.close().await.unwrap();
    assert_eq!(closed.items_stored, 210);
    assert_eq!(feed_rows(&app.db, &feed_id).await, (210, 210, 210));
}

#[tokio::test]
async fn an_invalid_item_is_returned_with_its_sequence_number() {
    let app = spawn_app().await;
    let participation = app.participation().await;
    let feed_id = Uuid::new_v4().to_string();
    let mut live = feed(&app, &feed_id, &participation.id, FeedOptions::default());
    live.append(items(1, 3)).await.unwrap();
    let mut bad = item(5);
    if let Some(proto::feed_item::Item::Event(event)) = bad.item.as_mut() {
        event.kind = proto::EventKind::Unspecified as i32;
    }
    live.append(vec![item(4), bad]).await.unwrap();
    let status = live.flush().await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let fields: Vec<_> = field_violations(&status)
        .into_iter()
        .map(|v| v.field)
        .collect();
    assert_eq!(fields, ["items[5].kind"]);
    assert_eq!(feed_rows(&app.db, &feed_id).await, (3, 3, 3));
}

#[tokio::test]
async fn resends_are_acknowledged_when_identical_and_refused_otherwise() {
    let app = spawn_app().await;
    let participation = app.participation().await;
    let feed_id = Uuid::new_v4().to_string();
    let mut first = feed(&app, &feed_id, &participation.id, FeedOptions::default());
    first.append(items(1, 5)).await.unwrap();
    assert_eq!(first.flush().await.unwrap(), 5);
    drop(first);
    // A process that numbers its items itself resends 3..6 after a restart.
    let from = |seq| FeedOptions {
        first_seq: Some(seq),
        ..FeedOptions::default()
    };
    let mut again = feed(&app, &feed_id, &participation.id, from(3));
    again.append(items(3, 6)).await.unwrap();
    assert_eq!(again.flush().await.unwrap(), 6);
    drop(again);
    let mut other = feed(&app, &feed_id, &participation.id, from(4));
    let mut renumbered = items(4, 8);
    renumbered[0] = item(9); // item 4 carries another item's content
    other.append(renumbered).await.unwrap();
    let status = other.flush().await.unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    assert!(status.message().contains("item 4 of feed"), "{status:?}");
    assert_eq!(feed_rows(&app.db, &feed_id).await, (6, 6, 6));
}
