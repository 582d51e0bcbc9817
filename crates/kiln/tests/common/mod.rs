//! Harness for tests that run the real `kiln` binary as a child process.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
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
    /// The process's stderr lines, when started with `capture_stderr`.
    pub stderr: Option<mpsc::Receiver<String>>,
}

impl KilnProcess {
    /// Starts `kiln ARGS...` and waits (at most 30 s) for both listeners.
    pub fn start(args: &[&str]) -> KilnProcess {
        Self::start_with(args, &[], false)
    }

    /// Like [`Self::start`], with extra environment variables, and with
    /// stderr captured line by line into [`Self::stderr`] when asked
    /// (otherwise inherited).
    pub fn start_with(args: &[&str], env: &[(&str, &str)], capture_stderr: bool) -> KilnProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(args)
            .env("KILN_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(if capture_stderr {
                Stdio::piped()
            } else {
                Stdio::inherit()
            })
            .spawn()
            .expect("spawn kiln");
        let stderr = child.stderr.take().map(|err| {
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                for line in BufReader::new(err).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
            rx
        });
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
            stderr,
        }
    }

    /// Starts a server for `config` text written into `dir`, on ephemeral ports.
    pub fn with_config(dir: &Path, config: &str) -> KilnProcess {
        Self::with_config_and(dir, config, &[], &[], false)
    }

    /// [`Self::with_config`] with extra arguments and environment
    /// variables, optionally capturing stderr (see [`Self::start_with`]).
    pub fn with_config_and(
        dir: &Path,
        config: &str,
        extra_args: &[&str],
        env: &[(&str, &str)],
        capture_stderr: bool,
    ) -> KilnProcess {
        let path = dir.join("kiln.toml");
        std::fs::write(&path, config).unwrap();
        let data = dir.join("data");
        let mut args = vec![
            "serve",
            "--config",
            path.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().unwrap(),
        ];
        args.extend_from_slice(extra_args);
        Self::start_with(&args, env, capture_stderr)
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
        self.http_get_host(path, "localhost")
    }

    /// [`Self::http_get`] with the given `Host` header.
    pub fn http_get_host(&self, path: &str, host: &str) -> (u16, String) {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(self.http).expect("connect http");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
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

/// A running `kiln worker` process connected to a scheduler; killed with
/// SIGKILL when dropped. Its log lines are echoed to the test's stderr,
/// prefixed with the worker's name.
pub struct WorkerProcess {
    pub child: Child,
    pub name: String,
    /// The worker's base directory (work and cache directories).
    pub dir: PathBuf,
}

impl WorkerProcess {
    /// Starts `kiln worker` named `name` with `slots` slots against the
    /// scheduler on `scheduler` (which also serves the CAS), its
    /// directories under `base/name`, and waits (at most 30 s) until it has
    /// registered with the scheduler. `extra_config` is appended to the
    /// worker's TOML configuration (keys of a `[[workers]]` table).
    pub fn start(
        scheduler: SocketAddr,
        base: &Path,
        name: &str,
        slots: u32,
        extra_config: &str,
    ) -> WorkerProcess {
        let dir = base.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("worker.toml");
        std::fs::write(
            &config,
            format!("name = {name:?}\nslots = {slots}\n{extra_config}\n[sandbox]\nkill_grace = \"500ms\"\n"),
        )
        .unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args([
                "worker",
                "--scheduler",
                &format!("http://{scheduler}"),
                "--config",
                config.to_str().unwrap(),
                "--dir",
                dir.to_str().unwrap(),
            ])
            .env("KILN_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn kiln worker");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        let prefix = name.to_string();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("[{prefix}] {line}");
                let _ = tx.send(line);
            }
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.contains("registered with the scheduler") => break,
                Ok(_) => {}
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("worker {name} did not register with the scheduler within 30 s");
                }
            }
        }
        WorkerProcess {
            child,
            name: name.to_string(),
            dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, no chance to clean up or drain.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Processes on this machine (the host's /proc) whose command line
/// contains `token`; zombies (empty command line) are not listed.
pub fn processes_with(token: &str) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(token) {
                out.push(pid);
            }
        }
    }
    out
}
