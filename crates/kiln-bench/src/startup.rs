//! `startup`: spawns `--server-cmd` (via `sh -c 'exec CMD'`, so the child
//! is the server itself), polls GetCapabilities on `--endpoint` every 1 ms
//! and reports the time from spawn to the first answer, then stops the
//! server (SIGTERM, SIGKILL after 15 s). With `--populate N` the server is
//! first started once, given N tiny blobs through BatchUpdateBlobs and
//! stopped, so the timed starts open a store that holds them.

use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln_proto::reapi::GetCapabilitiesRequest;
use kiln_proto::reapi::capabilities_client::CapabilitiesClient;

use crate::Ctx;
use crate::client::{self, ConnSpec};
use crate::error::{BenchError, Context as _, Result};
use crate::procstat::ProcWatch;
use crate::report::{Row, ScenarioReport, Target};

const NAME: &str = "startup";
/// NativeLink 1.6.6 with a memory store: ms from spawn to first answer.
const REF_MS: f64 = 32.0;
/// Kiln's target, with a disk store holding a million blobs.
const TARGET_MS: f64 = 100.0;
const POLL: Duration = Duration::from_millis(1);
const STOP_GRACE: Duration = Duration::from_secs(15);

/// A spawned server, killed on drop if still running.
struct Server {
    child: Child,
    log: PathBuf,
}

impl Server {
    fn spawn(cmd: &str, log: PathBuf) -> Result<Server> {
        let out = File::create(&log).ctx(format!("creating {}", log.display()))?;
        let err = out.try_clone().ctx("duplicating the log file")?;
        let child = Command::new("sh")
            .arg("-c")
            .arg(format!("exec {cmd}"))
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .ctx(format!("spawning {cmd:?}"))?;
        Ok(Server { child, log })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The end of the server's output, for error messages.
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let start = text.len().saturating_sub(2000);
        let start = (start..text.len())
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(text.len());
        text[start..].trim().to_string()
    }

    /// Polls until the server answers GetCapabilities; returns the time
    /// since `t0`.
    async fn wait_ready(&mut self, conn: &ConnSpec, t0: Instant, timeout: Duration) -> Result<Duration> {
        let endpoint = conn
            .endpoint()?
            .connect_timeout(Duration::from_millis(200))
            .timeout(Duration::from_secs(5));
        loop {
            if let Some(status) = self.child.try_wait().ctx("checking the server process")? {
                return Err(BenchError::new(format!(
                    "server exited ({status}) before answering; its output ends with:\n{}",
                    self.log_tail()
                )));
            }
            if let Ok(ch) = endpoint.connect().await {
                let answer = CapabilitiesClient::new(ch)
                    .get_capabilities(GetCapabilitiesRequest {
                        instance_name: conn.instance.clone(),
                    })
                    .await;
                match answer {
                    Ok(_) => return Ok(t0.elapsed()),
                    // Any real gRPC answer means it is serving.
                    Err(s) if s.code() != tonic::Code::Unavailable && s.code() != tonic::Code::Unknown => {
                        return Ok(t0.elapsed());
                    }
                    Err(_) => {}
                }
            }
            if t0.elapsed() > timeout {
                return Err(BenchError::new(format!(
                    "server did not answer within {timeout:?}; its output ends with:\n{}",
                    self.log_tail()
                )));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited within the grace period.
    async fn stop(mut self) -> Result<()> {
        let pid = self.pid().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let t0 = Instant::now();
        while t0.elapsed() < STOP_GRACE {
            if self.child.try_wait().ctx("waiting for the server")?.is_some() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.child.kill().ctx("killing the server")?;
        self.child.wait().ctx("waiting for the killed server")?;
        Err(BenchError::new(format!(
            "server ignored SIGTERM for {STOP_GRACE:?} and was killed"
        )))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn median_ms(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[(v.len() - 1) / 2])
}

pub async fn run(ctx: &Ctx) -> Result<ScenarioReport> {
    let a = &ctx.args;
    let cmd = a
        .server_cmd
        .clone()
        .ok_or_else(|| BenchError::new("startup needs --server-cmd"))?;
    let log = std::env::temp_dir().join(format!("kiln-bench-startup-{}.log", std::process::id()));
    let mut rep = ScenarioReport::new(NAME);
    let mut sample = Vec::new();

    if a.populate > 0 {
        let mut server = Server::spawn(&cmd, log.clone())?;
        server
            .wait_ready(&ctx.conn, Instant::now(), a.startup_timeout)
            .await?;
        let pool = ctx.conn.channels(4).await?;
        let caps = client::capabilities(&pool, &ctx.conn.instance).await?;
        let per_call = client::blobs_per_batch(
            client::max_batch_bytes(&caps),
            a.populate_blob_size,
            a.populate_batch,
        );
        let t0 = Instant::now();
        let (stored, populated_sample) = client::upload_generated(
            &pool,
            &ctx.conn.instance,
            a.populate,
            a.populate_blob_size,
            ctx.seed_for("populate"),
            per_call,
            4,
        )
        .await
        .ctx("populating the store")?;
        let took = t0.elapsed();
        sample = populated_sample;
        drop(pool);
        let t1 = Instant::now();
        server.stop().await.ctx("stopping the populated server")?;
        rep.note(format!(
            "populated {stored} blobs of {} B ({per_call} per call) in {:.1} s; shutdown took {:.2} s",
            a.populate_blob_size,
            took.as_secs_f64(),
            t1.elapsed().as_secs_f64()
        ));
    }

    let mut times = Vec::new();
    let mut rss = Vec::new();
    let runs = a.startup_runs.max(1);
    for run in 0..runs {
        let t0 = Instant::now();
        let mut server = Server::spawn(&cmd, log.clone())?;
        let ready = server.wait_ready(&ctx.conn, t0, a.startup_timeout).await?;
        times.push(ready.as_secs_f64() * 1e3);
        let watch = ProcWatch::pid(server.pid(), crate::procstat::clock_ticks_per_sec());
        if let Ok(r) = watch.rss_bytes() {
            rss.push(r);
        }
        if run + 1 == runs && !sample.is_empty() {
            // After the last start: are the populated blobs still there?
            let pool = ctx.conn.channels(1).await?;
            let t = Instant::now();
            let missing = client::count_missing(&pool, &ctx.conn.instance, &sample).await?;
            rep.note(format!(
                "after restart {} of {} sampled populated blobs were found (FindMissingBlobs took {:.1} ms)",
                sample.len() - missing,
                sample.len(),
                t.elapsed().as_secs_f64() * 1e3
            ));
        }
        server.stop().await?;
    }
    let _ = std::fs::remove_file(&log);

    let label = if a.populate > 0 {
        format!("spawn to first answer, {} blobs stored", a.populate)
    } else {
        "spawn to first answer".to_string()
    };
    rep.row(
        Row::new(
            NAME,
            &format!("{label} (median of {})", times.len()),
            "ms",
            median_ms(times.clone()),
        )
        .reference(REF_MS)
        .target(Target::AtMost(TARGET_MS)),
    );
    let runs: Vec<String> = times.iter().map(|t| format!("{t:.1}")).collect();
    let rss: Vec<String> = rss
        .iter()
        .map(|r| format!("{:.1}", *r as f64 / 1048576.0))
        .collect();
    rep.note(format!(
        "command {cmd:?}; runs (ms): {}; RSS at first answer (MiB): {}; reference {REF_MS} ms is a memory store",
        runs.join(", "),
        rss.join(", ")
    ));
    Ok(rep)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median() {
        assert_eq!(median_ms(vec![]), None);
        assert_eq!(median_ms(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median_ms(vec![4.0, 1.0]), Some(1.0));
    }

    #[tokio::test]
    async fn exited_server_is_reported() {
        let log = std::env::temp_dir().join(format!("kiln-bench-test-{}.log", std::process::id()));
        let mut s = Server::spawn("sh -c 'echo boom >&2; exit 3'", log.clone()).unwrap();
        let conn = ConnSpec {
            // Port 9 (discard) is closed on loopback here; we only need a refusal.
            url: "http://127.0.0.1:9".into(),
            instance: String::new(),
            stream_window: 1 << 20,
            conn_window: 1 << 20,
            workers_per_conn: 4,
        };
        let err = s
            .wait_ready(&conn, Instant::now(), Duration::from_secs(10))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("exited"), "{err}");
        assert!(err.contains("boom"), "{err}");
        let _ = std::fs::remove_file(log);
    }
}
