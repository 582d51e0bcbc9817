//! Harness for tests that run the real `kiln` binary as a child process.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

/// A running `kiln` process; killed with SIGKILL when dropped.
pub struct KilnProcess {
    pub child: Child,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub stdout_lines: Vec<String>,
}

impl KilnProcess {
    /// Starts `kiln ARGS...` and waits (at most 30 s) for both listeners.
    pub fn start(args: &[&str]) -> KilnProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(args)
            .env("KILN_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn kiln");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let (mut grpc, mut http, mut lines) = (None, None, Vec::new());
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while grpc.is_none() || http.is_none() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = match rx.recv_timeout(left) {
                Ok(l) => l,
                Err(_) => {
                    let _ = child.kill();
                    panic!("kiln did not report its listeners within 30 s; stdout so far: {lines:?}");
                }
            };
            if let Some(a) = line.strip_prefix("kiln: grpc listening on ") {
                grpc = Some(a.trim().parse().expect("grpc addr"));
            }
            if let Some(a) = line.strip_prefix("kiln: http listening on ") {
                http = Some(a.trim().parse().expect("http addr"));
            }
            lines.push(line);
        }
        KilnProcess {
            child,
            grpc: grpc.unwrap(),
            http: http.unwrap(),
            stdout_lines: lines,
        }
    }

    /// Starts a server for `config` text written into `dir`, on ephemeral ports.
    pub fn with_config(dir: &Path, config: &str) -> KilnProcess {
        let path = dir.join("kiln.toml");
        std::fs::write(&path, config).unwrap();
        let data = dir.join("data");
        Self::start(&[
            "serve",
            "--config",
            path.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().unwrap(),
        ])
    }

    pub async fn channel(&self) -> Channel {
        Endpoint::from_shared(format!("http://{}", self.grpc))
            .unwrap()
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .expect("connect to kiln")
    }

    /// SIGKILL, no chance to clean up.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Plain HTTP GET on the HTTP port; returns (status, body).
    pub fn http_get(&self, path: &str) -> (u16, String) {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(self.http).expect("connect http");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut buf = String::new();
        s.read_to_string(&mut buf).unwrap();
        let status = buf
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = buf
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (status, body)
    }
}

impl Drop for KilnProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
