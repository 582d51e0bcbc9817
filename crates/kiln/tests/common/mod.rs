//! Harness for tests that run the real `kiln` binary as a child process.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kiln_digest::{BlobKey, DigestFunction};
use kiln_proto::reapi::batch_update_blobs_request::Request as UpdateItem;
use kiln_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use kiln_proto::reapi::{BatchUpdateBlobsRequest, Digest};
use tonic::transport::{Channel, Endpoint};

/// A configuration with a memory CAS and Action Cache for the instance
/// `""`, and nothing else (no scheduler, no workers).
pub const MEMORY_CONFIG: &str = r#"
[stores.cas.memory]
capacity = "64 MiB"

[stores.ac.memory]
capacity = "16 MiB"

[[instances]]
name = ""
cas = "cas"
ac = "ac"
"#;

/// The SHA-256 digest of `data`.
pub fn digest_of(data: &[u8]) -> Digest {
    BlobKey::of(DigestFunction::Sha256, data).to_digest()
}

/// Uploads `blobs` with one BatchUpdateBlobs call; every one must succeed.
pub async fn upload_blobs(cas: &mut ContentAddressableStorageClient<Channel>, blobs: &[&[u8]]) {
    let resp = cas
        .batch_update_blobs(BatchUpdateBlobsRequest {
            requests: blobs
                .iter()
                .map(|b| UpdateItem {
                    digest: Some(digest_of(b)),
                    data: b.to_vec(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
        .await
        .expect("BatchUpdateBlobs")
        .into_inner();
    for r in resp.responses {
        assert_eq!(
            r.status.map(|s| s.code).unwrap_or(0),
            0,
            "upload of {:?}",
            r.digest
        );
    }
}

/// Forwards the lines of `reader` to the returned channel from a thread,
/// echoing each to the test's stderr behind `echo` when given.
pub fn line_reader(
    reader: impl std::io::Read + Send + 'static,
    echo: Option<String>,
) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(reader).lines() {
            let Ok(line) = line else { break };
            if let Some(prefix) = &echo {
                eprintln!("[{prefix}] {line}");
            }
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Waits (at most `limit`) for a line containing `needle`; returns it.
pub fn wait_for_line(
    lines: &mpsc::Receiver<String>,
    needle: &str,
    limit: Duration,
) -> Result<String, Vec<String>> {
    let deadline = Instant::now() + limit;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(l) if l.contains(needle) => return Ok(l),
            Ok(l) => seen.push(l),
            Err(_) => return Err(seen),
        }
    }
}

/// Sends SIGTERM to `pid`.
pub fn sigterm(pid: u32) {
    let ok = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("run kill")
        .success();
    assert!(ok, "kill -TERM {pid}");
}

/// Waits (at most `limit`, else the test fails) for `child` to exit;
/// returns its status and how long that took.
pub fn wait_exit(child: &mut Child, limit: Duration) -> (ExitStatus, Duration) {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return (status, start.elapsed());
        }
        if start.elapsed() >= limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("process {} still running after {limit:?}", child.id());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `cmd` to its end with stdout and stderr captured, failing the
/// test when it takes longer than `limit` (`Command::output` unbounded).
pub fn output_within(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let read_all = |mut r: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            buf
        })
    };
    let stdout = read_all(Box::new(child.stdout.take().expect("stdout")));
    let stderr = read_all(Box::new(child.stderr.take().expect("stderr")));
    let (status, _) = wait_exit(&mut child, limit);
    Output {
        status,
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    }
}

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
        let stderr = child.stderr.take().map(|err| line_reader(err, None));
        let rx = line_reader(child.stdout.take().expect("stdout"), None);
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

    /// Starts the embedded default (no config file) with its data under
    /// `data`, on ephemeral ports.
    pub fn embedded(data: &Path) -> KilnProcess {
        let data = data.to_str().expect("a UTF-8 path");
        Self::start(&[
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--data-dir",
            data,
        ])
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
        let (head, body) = self.http_get_with_head(path, host);
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        (status, body)
    }

    /// Plain HTTP GET returning the response head (status line and
    /// headers) and the body.
    pub fn http_get_with_head(&self, path: &str, host: &str) -> (String, String) {
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
        let (head, body) = buf.split_once("\r\n\r\n").unwrap_or((buf.as_str(), ""));
        (head.to_string(), body.to_string())
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
        let lines = line_reader(child.stderr.take().expect("stderr"), Some(name.to_string()));
        if wait_for_line(&lines, "registered with the scheduler", Duration::from_secs(30)).is_err() {
            let _ = child.kill();
            let _ = child.wait();
            panic!("worker {name} did not register with the scheduler within 30 s");
        }
        // Keep echoing its log.
        std::thread::spawn(move || while lines.recv().is_ok() {});
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
