// Records a session end to end and streams sentiments, with stubs generated from the
// protos (see ../../../README.md):
//
//	./generate.sh && source env.sh && go run krispingest/example -server 127.0.0.1:50051 \
//	    [-ca-file ca.pem [-cert-file client.pem -key-file client.key]] [-api-key KEY]
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"time"

	"krispingest/client"
)

func main() {
	var opts client.Options
	flag.StringVar(&opts.Address, "server", "127.0.0.1:50051", "krisp-ingest host:port")
	flag.StringVar(&opts.CAFile, "ca-file", "", "PEM CA of the server's certificate (TLS); empty: plaintext")
	flag.StringVar(&opts.CertFile, "cert-file", "", "client certificate (mutual TLS)")
	flag.StringVar(&opts.KeyFile, "key-file", "", "client certificate's key (mutual TLS)")
	flag.StringVar(&opts.APIKey, "api-key", "", "API key (needed once the server has keys)")
	count := flag.Int("count", 1000, "sentiments to stream")
	flag.Parse()

	conn, c, err := client.Dial(opts)
	if err != nil {
		log.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	recorded, err := client.RecordSession(ctx, c, *count)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("user %s, session %s, participation %s: %d sentiments stored (stream %s)\n",
		recorded.User.GetId(), recorded.Session.GetId(), recorded.Participation.GetId(),
		recorded.Receipt.GetItemsStored(), recorded.Receipt.GetStreamId())
}
