//! Command-line clients: `demo` (what the original pipeline's main.py did, over gRPC)
//! and `feed` (a simulated voice service streaming sentiments). Their output is for
//! people, on standard output.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use chrono::{TimeDelta, Utc};
use indicatif::{ProgressBar, ProgressStyle};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use uuid::Uuid;

use crate::cli::{ClientArgs, FeedArgs};
use crate::connection::{Client, connect, sentiment};
use krisp_ingest::proto::to_timestamp;
use krisp_ingest::proto::{self, stream_sentiments_request::Frame};

fn status_error(what: &str) -> impl FnOnce(tonic::Status) -> anyhow::Error + '_ {
    move |status| anyhow::anyhow!("{what} failed: {:?}: {}", status.code(), status.message())
}

/// A participation to demonstrate with: a new user, timezone, session and join.
async fn new_participation(
    client: &mut Client,
    started: chrono::DateTime<Utc>,
) -> anyhow::Result<(
    proto::User,
    proto::Timezone,
    proto::Session,
    proto::Participation,
)> {
    let user = client
        .create_user(proto::CreateUserRequest {
            request_id: Uuid::new_v4().to_string(),
            external_id: format!("demo-{}", Uuid::new_v4()),
            country: "AM".into(),
            native_language: "hy".into(),
            region: "Yerevan".into(),
        })
        .await
        .map_err(status_error("CreateUser"))?
        .into_inner()
        .user
        .context("CreateUser returned no user")?;
    let timezone = client
        .upsert_timezone(proto::UpsertTimezoneRequest {
            timezone: Some(proto::Timezone {
                code: "Asia/Yerevan".into(),
                utc_offset: Some(prost_types::Duration {
                    seconds: 4 * 3600,
                    nanos: 0,
                }),
            }),
        })
        .await
        .map_err(status_error("UpsertTimezone"))?
        .into_inner()
        .timezone
        .context("UpsertTimezone returned no timezone")?;
    let session = client
        .create_session(proto::CreateSessionRequest {
            request_id: Uuid::new_v4().to_string(),
            session_type: proto::SessionType::Meeting as i32,
            started_at: Some(to_timestamp(started)),
        })
        .await
        .map_err(status_error("CreateSession"))?
        .into_inner()
        .session
        .context("CreateSession returned no session")?;
    let participation = client
        .join_session(proto::JoinSessionRequest {
            request_id: Uuid::new_v4().to_string(),
            user_id: user.id.clone(),
            session_id: session.id.clone(),
            timezone_code: timezone.code.clone(),
            connected_at: Some(to_timestamp(started)),
        })
        .await
        .map_err(status_error("JoinSession"))?
        .into_inner()
        .participation
        .context("JoinSession returned no participation")?;
    Ok((user, timezone, session, participation))
}

/// Does what the original pipeline's main.py did, through the API, and prints it back.
pub async fn demo(args: &ClientArgs) -> anyhow::Result<()> {
    let mut client = connect(args).await?;
    let started = Utc::now() - TimeDelta::minutes(10);
    let (user, timezone, session, participation) = new_participation(&mut client, started).await?;
    let sentiment = client
        .record_sentiment(proto::RecordSentimentRequest {
            request_id: Uuid::new_v4().to_string(),
            participation_id: participation.id.clone(),
            sentiment: Some(proto::NewSentiment {
                started_at: Some(to_timestamp(started + TimeDelta::seconds(30))),
                ended_at: Some(to_timestamp(started + TimeDelta::seconds(45))),
                label: proto::SentimentLabel::Positive as i32,
                score: Some(0.82),
            }),
        })
        .await
        .map_err(status_error("RecordSentiment"))?
        .into_inner()
        .sentiment;
    let event = client
        .record_event(proto::RecordEventRequest {
            request_id: Uuid::new_v4().to_string(),
            participation_id: participation.id.clone(),
            event: Some(proto::NewEvent {
                occurred_at: Some(to_timestamp(started + TimeDelta::seconds(5))),
                kind: proto::EventKind::MicrophoneUnmuted as i32,
                attributes: [("device".to_owned(), "built-in microphone".to_owned())].into(),
            }),
        })
        .await
        .map_err(status_error("RecordEvent"))?
        .into_inner()
        .event;
    let left = client
        .leave_session(proto::LeaveSessionRequest {
            participation_id: participation.id.clone(),
            disconnected_at: Some(to_timestamp(started + TimeDelta::minutes(5))),
            talked_time: Some(prost_types::Duration {
                seconds: 95,
                nanos: 0,
            }),
            microphone_used: true,
            speaker_used: true,
        })
        .await
        .map_err(status_error("LeaveSession"))?
        .into_inner()
        .participation;
    let ended = client
        .end_session(proto::EndSessionRequest {
            session_id: session.id.clone(),
            ended_at: Some(to_timestamp(started + TimeDelta::minutes(6))),
        })
        .await
        .map_err(status_error("EndSession"))?
        .into_inner()
        .session;

    let (Some(sentiment), Some(event), Some(left), Some(ended)) = (sentiment, event, left, ended)
    else {
        bail!("the server answered without the created resources");
    };
    println!("user           {}", describe_user(&user));
    println!("timezone       {}", describe_timezone(&timezone));
    println!("session        {}", describe_session(&ended));
    println!("participation  {}", describe_participation(&left));
    println!("sentiment      {}", describe_sentiment(&sentiment));
    println!("event          {}", describe_event(&event));
    println!("timeline of participation {}:", participation.id);
    let mut timeline = client
        .get_timeline(proto::GetTimelineRequest {
            participation_id: participation.id.clone(),
            ..Default::default()
        })
        .await
        .map_err(status_error("GetTimeline"))?
        .into_inner();
    while let Some(entry) = timeline
        .message()
        .await
        .map_err(status_error("GetTimeline"))?
    {
        match entry.entry.and_then(|e| e.entry) {
            Some(proto::timeline_entry::Entry::Event(e)) => {
                println!("  event      {}", describe_event(&e))
            }
            Some(proto::timeline_entry::Entry::Sentiment(s)) => {
                println!("  sentiment  {}", describe_sentiment(&s));
            }
            None => {}
        }
    }
    Ok(())
}

/// Streams `count` sentiments for a participation in one stream, with a progress bar.
pub async fn feed(args: &FeedArgs) -> anyhow::Result<()> {
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let mut client = connect(&args.client).await?;
    // A new participation starts early enough for the last 100 ms segment to end a minute
    // ago: the server refuses items dated ahead of its clock (--max-future-skew-seconds).
    let span = TimeDelta::milliseconds(i64::try_from(args.count).unwrap_or(i64::MAX / 200) * 100);
    let start = Utc::now() - span - TimeDelta::minutes(1);
    let participation_id = match &args.participation_id {
        Some(id) => id.clone(),
        None => new_participation(&mut client, start).await?.3.id,
    };
    let participation = client
        .get_participation(proto::GetParticipationRequest {
            participation_id: participation_id.clone(),
        })
        .await
        .map_err(status_error("GetParticipation"))?
        .into_inner()
        .participation
        .context("GetParticipation returned no participation")?;
    let connected = participation
        .connected_at
        .and_then(|t| chrono::DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).ok()?))
        .context("participation has no connected_at")?;
    let bar = ProgressBar::new(args.count);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} sentiments {per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    if args.live {
        return crate::live::feed(args, &participation_id, connected, &bar).await;
    }
    let stream_id = Uuid::new_v4();

    let (tx, rx) = mpsc::channel(8);
    let (count, batch_size, progress) = (args.count, args.batch_size as u64, bar.clone());
    let header = proto::StreamHeader {
        stream_id: stream_id.to_string(),
        participation_id: participation_id.clone(),
    };
    let producer = tokio::spawn(async move {
        let frame = |f| proto::StreamSentimentsRequest { frame: Some(f) };
        if tx.send(frame(Frame::Header(header))).await.is_err() {
            return;
        }
        let mut sent = 0;
        while sent < count {
            let n = batch_size.min(count - sent);
            let sentiments = (sent..sent + n).map(|i| sentiment(connected, i)).collect();
            if tx
                .send(frame(Frame::Batch(proto::SentimentBatch { sentiments })))
                .await
                .is_err()
            {
                return;
            }
            sent += n;
            progress.set_position(sent);
        }
        let _ = tx
            .send(frame(Frame::Trailer(proto::StreamTrailer {
                item_count: count,
            })))
            .await;
    });

    let started = Instant::now();
    let response = client.stream_sentiments(ReceiverStream::new(rx)).await;
    let _ = producer.await;
    bar.finish();
    let receipt = response
        .map_err(status_error("StreamSentiments"))?
        .into_inner()
        .receipt
        .context("StreamSentiments returned no receipt")?;
    let elapsed = started.elapsed().max(Duration::from_millis(1));
    println!(
        "stream {} committed: {} sentiments for participation {participation_id} in {:.2?} \
         ({:.0} sentiments/s)",
        receipt.stream_id,
        receipt.items_stored,
        elapsed,
        receipt.items_stored as f64 / elapsed.as_secs_f64()
    );
    Ok(())
}

fn time(value: Option<&prost_types::Timestamp>) -> String {
    value
        .and_then(|t| chrono::DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).ok()?))
        .map_or_else(
            || "-".to_owned(),
            |t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        )
}

fn seconds(value: Option<&prost_types::Duration>) -> String {
    value.map_or_else(
        || "-".to_owned(),
        |d| format!("{}s", d.seconds as f64 + f64::from(d.nanos) / 1e9),
    )
}

fn describe_user(user: &proto::User) -> String {
    format!(
        "{} external_id={} country={} native_language={} region={}",
        user.id, user.external_id, user.country, user.native_language, user.region
    )
}

fn describe_timezone(tz: &proto::Timezone) -> String {
    format!("{} utc_offset={}", tz.code, seconds(tz.utc_offset.as_ref()))
}

fn describe_session(session: &proto::Session) -> String {
    format!(
        "{} {:?} {} .. {} duration={}",
        session.id,
        session.session_type(),
        time(session.started_at.as_ref()),
        time(session.ended_at.as_ref()),
        seconds(session.duration.as_ref())
    )
}

fn describe_participation(p: &proto::Participation) -> String {
    format!(
        "{} user={} session={} timezone={} {} .. {} talked={} microphone_used={:?} speaker_used={:?}",
        p.id,
        p.user_id,
        p.session_id,
        p.timezone_code,
        time(p.connected_at.as_ref()),
        time(p.disconnected_at.as_ref()),
        seconds(p.talked_time.as_ref()),
        p.microphone_used.unwrap_or_default(),
        p.speaker_used.unwrap_or_default()
    )
}

fn describe_sentiment(s: &proto::Sentiment) -> String {
    format!(
        "{} {:?} score={} {} .. {}",
        s.id,
        s.label(),
        s.score.map_or_else(|| "-".to_owned(), |x| x.to_string()),
        time(s.started_at.as_ref()),
        time(s.ended_at.as_ref())
    )
}

fn describe_event(e: &proto::Event) -> String {
    let mut attributes: Vec<_> = e
        .attributes
        .iter()
        .map(|(k, v)| format!("{k}={v:?}"))
        .collect();
    attributes.sort();
    format!(
        "{} {:?} at {} {{{}}}",
        e.id,
        e.kind(),
        time(e.occurred_at.as_ref()),
        attributes.join(", ")
    )
}
