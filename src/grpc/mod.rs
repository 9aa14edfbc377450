//! The tonic adapter: each handler converts the request, calls the service, and maps the
//! result. No business rules live here.

pub mod convert;
pub mod middleware;

use std::pin::Pin;

use futures_util::{Stream, StreamExt};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::error::Error;
use crate::proto::{self, ingest_service_server::IngestService as IngestApi};
use crate::service::IngestService;
use convert::{StreamFrame, id_field};

/// Implements the generated `IngestService` trait over [`IngestService`].
#[derive(Debug, Clone)]
pub struct IngestGrpcAdapter {
    service: IngestService,
}

impl IngestGrpcAdapter {
    pub fn new(service: IngestService) -> Self {
        Self { service }
    }
}

type ApiResult<T> = Result<Response<T>, Status>;

fn ok<T>(message: T) -> ApiResult<T> {
    Ok(Response::new(message))
}

/// Maps an error of the request stream: a message that does not decode or is too large
/// is the client's to fix; anything else (cancelled, connection lost) broke the stream.
fn stream_error(status: Status) -> Error {
    match status.code() {
        tonic::Code::Internal if status.message().starts_with("failed to decode") => {
            Error::invalid(
                "",
                format!("a stream message does not decode: {}", status.message()),
            )
        }
        tonic::Code::OutOfRange | tonic::Code::ResourceExhausted => Error::ResourceExhausted {
            message: format!("a stream message is too large: {}", status.message()),
            retry_after: None,
        },
        code => Error::StreamBroken(format!("{code:?}: {}", status.message())),
    }
}

#[tonic::async_trait]
impl IngestApi for IngestGrpcAdapter {
    #[tracing::instrument(name = "CreateUser", skip_all)]
    async fn create_user(
        &self,
        request: Request<proto::CreateUserRequest>,
    ) -> ApiResult<proto::CreateUserResponse> {
        let command = convert::new_user(request.into_inner()).map_err(Error::from)?;
        let user = self
            .service
            .create_user(command.user, command.request_id)
            .await?;
        ok(proto::CreateUserResponse {
            user: Some(convert::user_to_proto(user)),
        })
    }

    #[tracing::instrument(name = "GetUser", skip_all)]
    async fn get_user(
        &self,
        request: Request<proto::GetUserRequest>,
    ) -> ApiResult<proto::GetUserResponse> {
        let id = id_field("user_id", &request.into_inner().user_id)?;
        let user = self.service.get_user(id).await?;
        ok(proto::GetUserResponse {
            user: Some(convert::user_to_proto(user)),
        })
    }

    #[tracing::instrument(name = "DeleteUser", skip_all)]
    async fn delete_user(
        &self,
        request: Request<proto::DeleteUserRequest>,
    ) -> ApiResult<proto::DeleteUserResponse> {
        let id = id_field("user_id", &request.into_inner().user_id)?;
        let participations_deleted = self.service.delete_user(id).await?;
        ok(proto::DeleteUserResponse {
            participations_deleted,
        })
    }

    #[tracing::instrument(name = "UpsertTimezone", skip_all)]
    async fn upsert_timezone(
        &self,
        request: Request<proto::UpsertTimezoneRequest>,
    ) -> ApiResult<proto::UpsertTimezoneResponse> {
        let timezone = convert::timezone(request.into_inner().timezone).map_err(Error::from)?;
        let (timezone, created) = self.service.upsert_timezone(timezone).await?;
        ok(proto::UpsertTimezoneResponse {
            timezone: Some(convert::timezone_to_proto(timezone)),
            created,
        })
    }

    #[tracing::instrument(name = "ListTimezones", skip_all)]
    async fn list_timezones(
        &self,
        _request: Request<proto::ListTimezonesRequest>,
    ) -> ApiResult<proto::ListTimezonesResponse> {
        let timezones = self.service.list_timezones().await?;
        ok(proto::ListTimezonesResponse {
            timezones: timezones
                .into_iter()
                .map(convert::timezone_to_proto)
                .collect(),
        })
    }

    #[tracing::instrument(name = "CreateSession", skip_all)]
    async fn create_session(
        &self,
        request: Request<proto::CreateSessionRequest>,
    ) -> ApiResult<proto::CreateSessionResponse> {
        let command = convert::create_session(request.into_inner()).map_err(Error::from)?;
        let session = self
            .service
            .create_session(command.session_type, command.started_at, command.request_id)
            .await?;
        ok(proto::CreateSessionResponse {
            session: Some(convert::session_to_proto(session)),
        })
    }

    #[tracing::instrument(name = "EndSession", skip_all)]
    async fn end_session(
        &self,
        request: Request<proto::EndSessionRequest>,
    ) -> ApiResult<proto::EndSessionResponse> {
        let command = convert::end_session(request.into_inner()).map_err(Error::from)?;
        let session = self
            .service
            .end_session(command.session_id, command.ended_at)
            .await?;
        ok(proto::EndSessionResponse {
            session: Some(convert::session_to_proto(session)),
        })
    }

    #[tracing::instrument(name = "GetSession", skip_all)]
    async fn get_session(
        &self,
        request: Request<proto::GetSessionRequest>,
    ) -> ApiResult<proto::GetSessionResponse> {
        let id = id_field("session_id", &request.into_inner().session_id)?;
        let session = self.service.get_session(id).await?;
        ok(proto::GetSessionResponse {
            session: Some(convert::session_to_proto(session)),
        })
    }

    #[tracing::instrument(name = "JoinSession", skip_all)]
    async fn join_session(
        &self,
        request: Request<proto::JoinSessionRequest>,
    ) -> ApiResult<proto::JoinSessionResponse> {
        let command = convert::join(request.into_inner()).map_err(Error::from)?;
        let participation = self
            .service
            .join_session(command.participation, command.request_id)
            .await?;
        ok(proto::JoinSessionResponse {
            participation: Some(convert::participation_to_proto(participation)),
        })
    }

    #[tracing::instrument(name = "LeaveSession", skip_all)]
    async fn leave_session(
        &self,
        request: Request<proto::LeaveSessionRequest>,
    ) -> ApiResult<proto::LeaveSessionResponse> {
        let leave = convert::leave(request.into_inner()).map_err(Error::from)?;
        let participation = self.service.leave_session(leave).await?;
        ok(proto::LeaveSessionResponse {
            participation: Some(convert::participation_to_proto(participation)),
        })
    }

    #[tracing::instrument(name = "GetParticipation", skip_all)]
    async fn get_participation(
        &self,
        request: Request<proto::GetParticipationRequest>,
    ) -> ApiResult<proto::GetParticipationResponse> {
        let id = id_field("participation_id", &request.into_inner().participation_id)?;
        let participation = self.service.get_participation(id).await?;
        ok(proto::GetParticipationResponse {
            participation: Some(convert::participation_to_proto(participation)),
        })
    }

    #[tracing::instrument(name = "RecordSentiment", skip_all)]
    async fn record_sentiment(
        &self,
        request: Request<proto::RecordSentimentRequest>,
    ) -> ApiResult<proto::RecordSentimentResponse> {
        let command = convert::record_sentiment(request.into_inner()).map_err(Error::from)?;
        let sentiment = self
            .service
            .record(
                command.participation_id,
                command.sentiment,
                command.request_id,
            )
            .await?;
        ok(proto::RecordSentimentResponse {
            sentiment: Some(convert::sentiment_to_proto(sentiment)),
        })
    }

    #[tracing::instrument(name = "RecordEvent", skip_all)]
    async fn record_event(
        &self,
        request: Request<proto::RecordEventRequest>,
    ) -> ApiResult<proto::RecordEventResponse> {
        let command = convert::record_event(request.into_inner()).map_err(Error::from)?;
        let event = self
            .service
            .record(command.participation_id, command.event, command.request_id)
            .await?;
        ok(proto::RecordEventResponse {
            event: Some(convert::event_to_proto(event)),
        })
    }

    type GetTimelineStream =
        Pin<Box<dyn Stream<Item = Result<proto::GetTimelineResponse, Status>> + Send>>;

    #[tracing::instrument(name = "GetTimeline", skip_all)]
    async fn get_timeline(
        &self,
        request: Request<proto::GetTimelineRequest>,
    ) -> ApiResult<Self::GetTimelineStream> {
        let read = convert::get_timeline(request.get_ref()).map_err(Error::from)?;
        let chunks = self
            .service
            .timeline(read.participation_id, read.range)
            .await?;
        let stream = ReceiverStream::new(chunks).flat_map(move |chunk| {
            let messages: Vec<Result<proto::GetTimelineResponse, Status>> = match chunk {
                Ok(entries) => convert::timeline_messages(entries, read.chunked)
                    .into_iter()
                    .map(Ok)
                    .collect(),
                Err(error) => vec![Err(Status::from(error))],
            };
            tokio_stream::iter(messages)
        });
        Ok(Response::new(Box::pin(stream)))
    }

    type LiveFeedStream =
        Pin<Box<dyn Stream<Item = Result<proto::LiveFeedResponse, Status>> + Send>>;

    #[tracing::instrument(name = "LiveFeed", skip_all)]
    async fn live_feed(
        &self,
        request: Request<Streaming<proto::LiveFeedRequest>>,
    ) -> ApiResult<Self::LiveFeedStream> {
        let messages = request
            .into_inner()
            .map(|message| convert::feed_message(message.map_err(stream_error)?));
        let replies = self.service.live_feed(messages).map(|reply| {
            reply
                .map(convert::feed_reply_to_proto)
                .map_err(Status::from)
        });
        Ok(Response::new(Box::pin(replies)))
    }

    #[tracing::instrument(name = "StreamSentiments", skip_all)]
    async fn stream_sentiments(
        &self,
        request: Request<Streaming<proto::StreamSentimentsRequest>>,
    ) -> ApiResult<proto::StreamSentimentsResponse> {
        let mut seen = 0;
        let frames = request.into_inner().map(move |message| {
            let message = message.map_err(stream_error)?;
            convert::frame(
                message.frame.map(StreamFrame::from),
                &mut seen,
                "sentiments",
                |b: proto::SentimentBatch| b.sentiments,
                |s| convert::new_sentiment(&s),
            )
        });
        let receipt = self.service.ingest_stream(frames).await?;
        ok(proto::StreamSentimentsResponse {
            receipt: Some(convert::receipt_to_proto(receipt)),
        })
    }

    #[tracing::instrument(name = "StreamEvents", skip_all)]
    async fn stream_events(
        &self,
        request: Request<Streaming<proto::StreamEventsRequest>>,
    ) -> ApiResult<proto::StreamEventsResponse> {
        let mut seen = 0;
        let frames = request.into_inner().map(move |message| {
            let message = message.map_err(stream_error)?;
            convert::frame(
                message.frame.map(StreamFrame::from),
                &mut seen,
                "events",
                |b: proto::EventBatch| b.events,
                convert::new_event,
            )
        });
        let receipt = self.service.ingest_stream(frames).await?;
        ok(proto::StreamEventsResponse {
            receipt: Some(convert::receipt_to_proto(receipt)),
        })
    }
}
