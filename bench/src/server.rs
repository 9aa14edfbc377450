//! The server under test: this binary's hidden `serve` subcommand in a child process, so
//! that its CPU and memory are measured on their own.

use std::process::Stdio;

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, BufReader};
use tonic::transport::{Channel, Endpoint};

use crate::Args;

/// A sentiment server child process.
pub(crate) struct Server {
    pub(crate) child: tokio::process::Child,
    pub(crate) address: std::net::SocketAddr,
    pub(crate) pid: u32,
}

impl Server {
    /// Starts a server whose pool holds up to `max_connections` connections.
    pub(crate) async fn start(args: &Args, max_connections: usize) -> anyhow::Result<Self> {
        let mut command = tokio::process::Command::new(std::env::current_exe()?);
        if let Some(url) = &args.database_url {
            command.arg("--database-url").arg(url);
        }
        if let Some(dir) = &args.data_dir {
            command.arg("--data-dir").arg(dir);
        }
        if args.server_metrics {
            command.arg("--server-metrics");
        }
        if let Some(endpoint) = &args.otlp_endpoint {
            command.arg("--otlp-endpoint").arg(endpoint);
            command
                .arg("--trace-sample-ratio")
                .arg(args.trace_sample_ratio.to_string());
        }
        let mut child = command
            .arg("serve")
            .arg("--max-connections")
            .arg(max_connections.to_string())
            // KRISP_BENCH_SERVER_LOG=info shows each stream's commit with its timings.
            .env(
                "RUST_LOG",
                std::env::var("KRISP_BENCH_SERVER_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let address = loop {
            let line = lines
                .next_line()
                .await?
                .context("server exited before listening")?;
            if let Some(address) = line.strip_prefix("listening on ") {
                break address.trim().parse()?;
            }
        };
        let pid = child.id().context("server has no pid")?;
        Ok(Self {
            child,
            address,
            pid,
        })
    }

    pub(crate) async fn channel(&self) -> anyhow::Result<Channel> {
        Ok(Endpoint::from_shared(format!("http://{}", self.address))?
            .tcp_nodelay(true)
            .initial_stream_window_size(Some(4 << 20))
            .initial_connection_window_size(Some(8 << 20))
            // A timeline read to its first entry resets the rest of its stream; the
            // server's frames still in flight for it count as local errors, and h2 closes
            // the connection after 1,024 of them (GOAWAY ENHANCE_YOUR_CALM). The benchmark
            // trusts its own server.
            .http2_max_local_error_reset_streams(None)
            .connect()
            .await?)
    }

    /// Stops the server as Ctrl-C would (it exports its last spans), killing it when it
    /// has not ended within 10 s.
    pub(crate) async fn stop(mut self) -> anyhow::Result<()> {
        let interrupted = std::process::Command::new("kill")
            .args(["-INT", &self.pid.to_string()])
            .status()
            .is_ok_and(|s| s.success());
        let ended = interrupted
            && tokio::time::timeout(std::time::Duration::from_secs(10), self.child.wait())
                .await
                .is_ok();
        if !ended {
            let _ = self.child.start_kill();
            self.child.wait().await?;
        }
        Ok(())
    }
}
