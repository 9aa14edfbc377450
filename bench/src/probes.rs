//! Process probes from /proc: CPU seconds of the client, the server and PostgreSQL, and
//! resident memory.

/// CPU seconds (user + system) a process has used, from /proc.
pub(crate) fn cpu_seconds(pid: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the parenthesised command name; utime and stime are 14th and 15th.
    let Some(rest) = stat.rsplit_once(')').map(|(_, rest)| rest) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields
        .get(11..13)
        .map(|f| f.iter().filter_map(|v| v.parse::<f64>().ok()).sum())
        .unwrap_or(0.0);
    ticks / 100.0
}

/// CPU seconds of each PostgreSQL process on the machine, by pid.
pub(crate) fn postgres_cpu_seconds() -> std::collections::HashMap<String, f64> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Default::default();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|pid| pid.bytes().all(|b| b.is_ascii_digit()))
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm.starts_with("postgres"))
        })
        .map(|pid| {
            // schedstat: nanoseconds on CPU (PostgreSQL processes are single-threaded).
            let seconds = std::fs::read_to_string(format!("/proc/{pid}/schedstat"))
                .ok()
                .and_then(|s| {
                    s.split_whitespace()
                        .next()
                        .and_then(|ns| ns.parse::<f64>().ok())
                })
                .map_or_else(|| cpu_seconds(&pid), |ns| ns / 1e9);
            (pid, seconds)
        })
        .collect()
}

pub(crate) fn rss_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// CPU used by the client (this process), the server and PostgreSQL during a measurement.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Cpu {
    pub(crate) client: f64,
    pub(crate) server: f64,
    pub(crate) postgres: f64,
}

pub(crate) struct CpuProbe {
    server_pid: Option<u32>,
    start: Cpu,
    pub(crate) postgres: std::collections::HashMap<String, f64>,
}

impl CpuProbe {
    fn now(server_pid: Option<u32>) -> Cpu {
        Cpu {
            client: cpu_seconds("self"),
            server: server_pid.map_or(0.0, |pid| cpu_seconds(&pid.to_string())),
            postgres: 0.0,
        }
    }

    pub(crate) fn start(server_pid: Option<u32>) -> Self {
        Self {
            server_pid,
            start: Self::now(server_pid),
            postgres: postgres_cpu_seconds(),
        }
    }

    /// CPU used since start. PostgreSQL processes that exited in between are not counted.
    pub(crate) fn stop(&self) -> Cpu {
        let end = Self::now(self.server_pid);
        let postgres = postgres_cpu_seconds()
            .into_iter()
            .map(|(pid, seconds)| seconds - self.postgres.get(&pid).copied().unwrap_or(0.0))
            .sum();
        Cpu {
            client: end.client - self.start.client,
            server: end.server - self.start.server,
            postgres,
        }
    }
}
