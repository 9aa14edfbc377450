//! A TCP path to the test PostgreSQL that loses the answer to a commit: armed, it lets a
//! statement that writes reach PostgreSQL and commit there, then closes the connection
//! instead of passing the answer on, the way a connection dies between a COMMIT and its
//! acknowledgement. It reads the server's side of the protocol only: messages up to
//! `ReadyForQuery` are held, and when they hold a write's `CommandComplete` and end the
//! transaction (status `I`), the commit happened, and its answer is dropped.

use std::sync::{
    Arc,
    atomic::{AtomicBool, AtomicUsize, Ordering},
};

use sqlx::postgres::{PgConnectOptions, PgSslMode};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
};

use crate::helpers::{options_via, server};

/// The commands whose completion is a write.
const WRITES: [&[u8]; 5] = [b"INSERT", b"UPDATE", b"DELETE", b"COMMIT", b"COPY"];

#[derive(Default)]
struct State {
    /// Commits still to cut.
    armed: AtomicUsize,
    /// Commits whose answer was dropped.
    cut: AtomicUsize,
    /// After a cut, refuse every connection (and close those open) until restored.
    dark_after_cut: AtomicBool,
    dark: AtomicBool,
}

pub struct CommitCutter {
    port: u16,
    database: String,
    state: Arc<State>,
    /// Bumped to close every connection through the cutter.
    closing: watch::Sender<u64>,
}

impl CommitCutter {
    /// A path to `database` of the test server.
    pub async fn to(database: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(State::default());
        let (closing, _) = watch::channel(0);
        let (accepting, closing_rx) = (Arc::clone(&state), closing.subscribe());
        let closer = closing.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if accepting.dark.load(Ordering::SeqCst) {
                    continue;
                }
                let state = Arc::clone(&accepting);
                let (closing, closer) = (closing_rx.clone(), closer.clone());
                tokio::spawn(relay(client, state, closing, closer));
            }
        });
        Self {
            port,
            database: database.to_owned(),
            state,
            closing,
        }
    }

    /// Connect options through the cutter (no TLS: the cutter reads the protocol).
    pub async fn options(&self) -> PgConnectOptions {
        options_via(self.port, &self.database)
            .await
            .ssl_mode(PgSslMode::Disable)
    }

    /// Drops the answer of the next committed write; with `dark`, the database is then
    /// out of reach through the cutter until [`Self::restore`].
    pub fn arm(&self, dark: bool) {
        self.state.dark_after_cut.store(dark, Ordering::SeqCst);
        self.state.armed.store(1, Ordering::SeqCst);
    }

    /// Whether the armed cut is still to come.
    pub fn armed(&self) -> bool {
        self.state.armed.load(Ordering::SeqCst) > 0
    }

    /// Commits whose answer was dropped so far.
    pub fn cuts(&self) -> usize {
        self.state.cut.load(Ordering::SeqCst)
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.state.dark.store(false, Ordering::SeqCst);
        self.state.armed.store(0, Ordering::SeqCst);
    }

    /// Closes every connection through the cutter (the database restarted, as the
    /// service sees it).
    pub fn close_all(&self) {
        self.closing.send_modify(|epoch| *epoch += 1);
    }
}

async fn relay(
    mut client: TcpStream,
    state: Arc<State>,
    mut closing: watch::Receiver<u64>,
    closer: watch::Sender<u64>,
) {
    let server = server().await;
    let address = (server.get_host().to_owned(), server.get_port());
    let mut upstream = match server.get_socket() {
        Some(socket) => {
            let path = socket.join(format!(".s.PGSQL.{}", server.get_port()));
            Upstream::Unix(tokio::net::UnixStream::connect(path).await.unwrap())
        }
        None => Upstream::Tcp(TcpStream::connect(address).await.unwrap()),
    };
    closing.mark_unchanged();
    let (mut client_read, mut client_write) = client.split();
    let (mut up_read, mut up_write) = upstream.split();
    let to_server = tokio::io::copy(&mut client_read, &mut up_write);
    let to_client = async {
        let mut held = Vec::new();
        let mut wrote = false;
        let mut buffer = vec![0u8; 64 * 1024];
        let mut pending = Vec::new();
        loop {
            let n = up_read.read(&mut buffer).await?;
            if n == 0 {
                client_write.write_all(&held).await?;
                return Ok::<_, std::io::Error>(());
            }
            pending.extend_from_slice(&buffer[..n]);
            while pending.len() >= 5 {
                let length = u32::from_be_bytes(pending[1..5].try_into().unwrap()) as usize;
                if pending.len() < 1 + length {
                    break;
                }
                let message: Vec<u8> = pending.drain(..1 + length).collect();
                let (kind, body) = (message[0], &message[5..]);
                held.extend_from_slice(&message);
                match kind {
                    b'C' => wrote |= WRITES.iter().any(|tag| body.starts_with(tag)),
                    // CopyInResponse: the client sends its rows now.
                    b'G' => client_write.write_all(&std::mem::take(&mut held)).await?,
                    b'Z' => {
                        let committed = wrote && body.first() == Some(&b'I');
                        wrote = false;
                        let take = committed
                            && state
                                .armed
                                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |armed| {
                                    armed.checked_sub(1)
                                })
                                .is_ok();
                        if take {
                            state.cut.fetch_add(1, Ordering::SeqCst);
                            if state.dark_after_cut.load(Ordering::SeqCst) {
                                state.dark.store(true, Ordering::SeqCst);
                                closer.send_modify(|epoch| *epoch += 1);
                            }
                            return Ok(());
                        }
                        client_write.write_all(&std::mem::take(&mut held)).await?;
                    }
                    _ => {}
                }
            }
        }
    };
    tokio::select! {
        _ = to_server => {}
        _ = to_client => {}
        _ = closing.changed() => {}
    }
}

enum Upstream {
    Unix(tokio::net::UnixStream),
    Tcp(TcpStream),
}

impl Upstream {
    fn split(
        &mut self,
    ) -> (
        Box<dyn tokio::io::AsyncRead + Unpin + Send + '_>,
        Box<dyn tokio::io::AsyncWrite + Unpin + Send + '_>,
    ) {
        match self {
            Self::Unix(stream) => {
                let (read, write) = stream.split();
                (Box::new(read), Box::new(write))
            }
            Self::Tcp(stream) => {
                let (read, write) = stream.split();
                (Box::new(read), Box::new(write))
            }
        }
    }
}
