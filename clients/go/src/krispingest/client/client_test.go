package client

import (
	"context"
	"path/filepath"
	"reflect"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	ingest "krispingest/ingestv1"
)

func context30s(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func dial(t *testing.T, opts Options) ingest.IngestServiceClient {
	conn, c, err := Dial(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return c
}

func TestUnaryCallsAndAClientStreamRecordASession(t *testing.T) {
	s := start(t, newEnv(t))
	c := dial(t, Options{Address: s.address})
	ctx := context30s(t)
	recorded, err := RecordSession(ctx, c, 1000)
	if err != nil {
		t.Fatal(err)
	}
	if got := recorded.Receipt.GetItemsStored(); got != 1000 {
		t.Fatalf("stored %d of 1000", got)
	}
	if recorded.Participation.GetDisconnectedAt() == nil {
		t.Fatal("the participation did not end")
	}
	user, err := c.GetUser(ctx, &ingest.GetUserRequest{UserId: recorded.User.GetId()})
	if err != nil {
		t.Fatal(err)
	}
	if user.GetUser().GetExternalId() != recorded.User.GetExternalId() {
		t.Fatalf("GetUser answered %v", user.GetUser())
	}
}

func TestFieldViolationsAreDecodedFromTheStatusDetails(t *testing.T) {
	s := start(t, newEnv(t))
	c := dial(t, Options{Address: s.address})
	ctx := context30s(t)
	_, err := c.CreateUser(ctx, &ingest.CreateUserRequest{Country: "usa", NativeLanguage: "english!"})
	if status.Code(err) != codes.InvalidArgument {
		t.Fatalf("expected INVALID_ARGUMENT, got %v", err)
	}
	var fields []string
	for _, v := range Violations(err) {
		fields = append(fields, v.Field)
	}
	if want := []string{"external_id", "country", "native_language"}; !reflect.DeepEqual(fields, want) {
		t.Fatalf("violations %v, want %v", fields, want)
	}

	// An invalid item of a stream is named by its index in the stream; nothing is stored.
	recorded, err := RecordSession(ctx, c, 1)
	if err != nil {
		t.Fatal(err)
	}
	start := recorded.Session.GetStartedAt().AsTime()
	items := Sentiments(start.Add(time.Minute), 500)
	items[437].EndedAt = timestamppb.New(items[437].GetStartedAt().AsTime())
	_, err = StreamSentiments(ctx, c, recorded.Participation.GetId(), items, 100)
	if status.Code(err) != codes.InvalidArgument {
		t.Fatalf("expected INVALID_ARGUMENT, got %v", err)
	}
	violations := Violations(err)
	if len(violations) != 1 || violations[0].Field != "sentiments[437].ended_at" {
		t.Fatalf("violations %+v", violations)
	}
	timeline, err := c.GetTimeline(ctx, &ingest.GetTimelineRequest{ParticipationId: recorded.Participation.GetId()})
	if err != nil {
		t.Fatal(err)
	}
	entries := 0
	for {
		if _, err := timeline.Recv(); err != nil {
			break
		}
		entries++
	}
	if entries != 1 {
		t.Fatalf("the timeline holds %d entries, want the 1 of the first stream", entries)
	}
}

func TestMutualTLSWithAnAPIKey(t *testing.T) {
	dir := pki(t)
	env := newEnv(t)
	key := createKey(t, env)
	s := start(t, env, "--tls-cert", filepath.Join(dir, "server.pem"),
		"--tls-key", filepath.Join(dir, "server.key"),
		"--tls-client-ca", filepath.Join(dir, "ca.pem"))
	opts := Options{
		Address:  s.address,
		CAFile:   filepath.Join(dir, "ca.pem"),
		CertFile: filepath.Join(dir, "client.pem"),
		KeyFile:  filepath.Join(dir, "client.key"),
		APIKey:   key,
	}
	ctx := context30s(t)
	recorded, err := RecordSession(ctx, dial(t, opts), 10)
	if err != nil {
		t.Fatal(err)
	}
	if recorded.Receipt.GetItemsStored() != 10 {
		t.Fatalf("stored %d of 10", recorded.Receipt.GetItemsStored())
	}

	noKey := opts
	noKey.APIKey = ""
	_, err = dial(t, noKey).GetUser(ctx, &ingest.GetUserRequest{UserId: recorded.User.GetId()})
	if status.Code(err) != codes.Unauthenticated {
		t.Fatalf("without the key: expected UNAUTHENTICATED, got %v", err)
	}
	noCert := opts
	noCert.CertFile, noCert.KeyFile = "", ""
	short, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	_, err = dial(t, noCert).GetUser(short, &ingest.GetUserRequest{UserId: recorded.User.GetId()})
	if code := status.Code(err); code != codes.Unavailable && code != codes.DeadlineExceeded {
		t.Fatalf("without a client certificate: expected the handshake to fail, got %v", err)
	}
}
