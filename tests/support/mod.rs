//! Shared by the integration tests that run the real `edgerelay edge` binary.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A running `edgerelay edge`, killed when dropped (pass or fail).
pub struct EdgeProcess {
    child: Child,
    /// The key=value fields of its `EDGERELAY_READY` line.
    pub ready: String,
}

impl Drop for EdgeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl EdgeProcess {
    /// Starts the edge on loopback ephemeral ports with `args` added, and waits
    /// for its ready line. Its stderr goes to the test's stderr when `logs`.
    pub fn start(args: &[&str], logs: bool) -> EdgeProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_edgerelay"))
            .args([
                "edge",
                "--http-listen",
                "127.0.0.1:0",
                "--media-listen",
                "127.0.0.1:0",
            ])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(if logs {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .spawn()
            .expect("edge binary starts");
        let stdout = child.stdout.take().expect("stdout piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            // Keep draining stdout so the edge never blocks on a full pipe.
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(rest) = line.strip_prefix("EDGERELAY_READY ") {
                    let _ = tx.send(rest.to_owned());
                }
            }
        });
        let ready = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("edge prints EDGERELAY_READY");
        EdgeProcess { child, ready }
    }

    /// A field of the ready line (`http`, `media`, `media_shards`, ...).
    pub fn field(&self, key: &str) -> Option<&str> {
        self.ready
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
    }

    /// The HTTP base URL, without a trailing slash.
    pub fn http(&self) -> String {
        self.field("http")
            .expect("http= in the ready line")
            .trim_end_matches('/')
            .to_owned()
    }

    /// The process id (for CPU and memory readings).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// Polls `cond` every 50 ms until it holds, failing the test after `timeout`.
pub async fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
