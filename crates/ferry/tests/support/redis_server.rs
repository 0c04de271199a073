//! A private `redis-server` a test can stop and restart, without touching the shared one.
#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A private `redis-server`, killed (SIGKILL) when stopped or dropped.
pub(crate) struct PrivateRedis {
    pub(crate) port: u16,
    child: Child,
}

impl PrivateRedis {
    /// Without persistence: a restart starts empty.
    pub(crate) fn start(port: u16) -> std::io::Result<Self> {
        Self::spawn(port, &["--appendonly", "no"])
    }

    /// With an append-only file in `dir`, fsynced before every reply: a kill loses
    /// nothing the server acknowledged.
    pub(crate) fn start_durable(port: u16, dir: &std::path::Path) -> std::io::Result<Self> {
        let dir = dir.to_string_lossy();
        Self::spawn(
            port,
            &[
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--dir",
                &dir,
            ],
        )
    }

    fn spawn(port: u16, persistence: &[&str]) -> std::io::Result<Self> {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--save", ""])
            .args(persistence)
            .stdout(Stdio::null())
            .spawn()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not start on {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Self { port, child })
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub(crate) fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
