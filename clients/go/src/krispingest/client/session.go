package client

import (
	"context"
	"crypto/rand"
	"fmt"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	ingest "krispingest/ingestv1"
)

// Recorded is what RecordSession stored.
type Recorded struct {
	User          *ingest.User
	Session       *ingest.Session
	Participation *ingest.Participation
	Receipt       *ingest.StreamReceipt
}

// RecordSession records a call end to end, as a voice service would: a user, the UTC
// timezone, a session an hour ago, the user joining it, `count` one-second sentiments in
// one client stream (all or nothing, committed at the trailer), and the user leaving.
func RecordSession(ctx context.Context, c ingest.IngestServiceClient, count int) (*Recorded, error) {
	start := time.Now().UTC().Truncate(time.Second).Add(-time.Hour)
	user, err := c.CreateUser(ctx, &ingest.CreateUserRequest{
		ExternalId: "go-" + NewID(), Country: "AM", RequestId: NewID(),
	})
	if err != nil {
		return nil, fmt.Errorf("CreateUser: %w", err)
	}
	if _, err := c.UpsertTimezone(ctx, &ingest.UpsertTimezoneRequest{
		Timezone: &ingest.Timezone{Code: "UTC", UtcOffset: durationpb.New(0)},
	}); err != nil {
		return nil, fmt.Errorf("UpsertTimezone: %w", err)
	}
	session, err := c.CreateSession(ctx, &ingest.CreateSessionRequest{
		SessionType: ingest.SessionType_SESSION_TYPE_CALL, StartedAt: timestamppb.New(start),
	})
	if err != nil {
		return nil, fmt.Errorf("CreateSession: %w", err)
	}
	joined, err := c.JoinSession(ctx, &ingest.JoinSessionRequest{
		UserId: user.GetUser().GetId(), SessionId: session.GetSession().GetId(),
		TimezoneCode: "UTC", ConnectedAt: timestamppb.New(start),
	})
	if err != nil {
		return nil, fmt.Errorf("JoinSession: %w", err)
	}
	participation := joined.GetParticipation()
	receipt, err := StreamSentiments(ctx, c, participation.GetId(), Sentiments(start, count), 250)
	if err != nil {
		return nil, fmt.Errorf("StreamSentiments: %w", err)
	}
	left, err := c.LeaveSession(ctx, &ingest.LeaveSessionRequest{
		ParticipationId: participation.GetId(),
		DisconnectedAt:  timestamppb.New(start.Add(time.Hour)),
		TalkedTime:      durationpb.New(10 * time.Minute),
		MicrophoneUsed:  true,
		SpeakerUsed:     true,
	})
	if err != nil {
		return nil, fmt.Errorf("LeaveSession: %w", err)
	}
	return &Recorded{user.GetUser(), session.GetSession(), left.GetParticipation(), receipt}, nil
}

// Sentiments returns `count` one-second sentiments from `start` on.
func Sentiments(start time.Time, count int) []*ingest.NewSentiment {
	items := make([]*ingest.NewSentiment, count)
	for i := range items {
		label := ingest.SentimentLabel_SENTIMENT_LABEL_NEUTRAL
		if i%2 == 1 {
			label = ingest.SentimentLabel_SENTIMENT_LABEL_POSITIVE
		}
		score := 0.5
		items[i] = &ingest.NewSentiment{
			StartedAt: timestamppb.New(start.Add(time.Duration(i) * time.Second)),
			EndedAt:   timestamppb.New(start.Add(time.Duration(i+1) * time.Second)),
			Label:     label,
			Score:     &score,
		}
	}
	return items
}

// StreamSentiments sends `items` in one StreamSentiments call, `batch` a message, under a
// new stream id, and returns the receipt.
func StreamSentiments(ctx context.Context, c ingest.IngestServiceClient, participationID string,
	items []*ingest.NewSentiment, batch int) (*ingest.StreamReceipt, error) {
	stream, err := c.StreamSentiments(ctx)
	if err != nil {
		return nil, err
	}
	header := &ingest.StreamHeader{StreamId: NewID(), ParticipationId: participationID}
	if err := stream.Send(&ingest.StreamSentimentsRequest{
		Frame: &ingest.StreamSentimentsRequest_Header{Header: header},
	}); err != nil {
		return nil, closeAndRecv(stream, err)
	}
	for first := 0; first < len(items); first += batch {
		last := first + batch
		if last > len(items) {
			last = len(items)
		}
		if err := stream.Send(&ingest.StreamSentimentsRequest{
			Frame: &ingest.StreamSentimentsRequest_Batch{
				Batch: &ingest.SentimentBatch{Sentiments: items[first:last]},
			},
		}); err != nil {
			return nil, closeAndRecv(stream, err)
		}
	}
	if err := stream.Send(&ingest.StreamSentimentsRequest{
		Frame: &ingest.StreamSentimentsRequest_Trailer{
			Trailer: &ingest.StreamTrailer{ItemCount: uint64(len(items))},
		},
	}); err != nil {
		return nil, closeAndRecv(stream, err)
	}
	response, err := stream.CloseAndRecv()
	if err != nil {
		return nil, err
	}
	return response.GetReceipt(), nil
}

// closeAndRecv: a Send that fails with io.EOF means the server ended the call; its
// status is what CloseAndRecv returns.
func closeAndRecv(stream ingest.IngestService_StreamSentimentsClient, sendErr error) error {
	if _, err := stream.CloseAndRecv(); err != nil {
		return err
	}
	return sendErr
}

// NewID returns a random (version 4) UUID.
func NewID() string {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(err)
	}
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}
