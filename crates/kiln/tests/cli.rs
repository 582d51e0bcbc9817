//! The `kiln` binary: embedded default, health endpoints, config checking,
//! and its client sub-commands against a real server.

mod common;

use std::process::Command;

use common::{KilnProcess, MEMORY_CONFIG, output_within};
use kiln_digest::{BlobKey, DigestFunction};
use kiln_proto::reapi::GetCapabilitiesRequest;
use kiln_proto::reapi::capabilities_client::CapabilitiesClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

#[tokio::test]
async fn embedded_default_serves_health_and_capabilities() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let kiln = KilnProcess::embedded(&data);
    // The default prints its data directory and the Bazel flags.
    assert!(
        kiln.stdout_lines
            .iter()
            .any(|l| l.contains(data.to_str().unwrap())),
        "{:?}",
        kiln.stdout_lines
    );
    let channel = kiln.channel().await;
    let mut health = HealthClient::new(channel.clone());
    for service in ["", "build.bazel.remote.execution.v2.ContentAddressableStorage"] {
        let r = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.status, ServingStatus::Serving as i32, "{service}");
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);

    let (status, body) = kiln.http_get("/healthz");
    assert_eq!(status, 200);
    assert!(body.starts_with("ok"), "{body}");
    let (status, _) = kiln.http_get("/nope");
    assert_eq!(status, 404);

    let caps = CapabilitiesClient::new(channel)
        .get_capabilities(GetCapabilitiesRequest::default())
        .await
        .unwrap()
        .into_inner();
    let cache = caps.cache_capabilities.unwrap();
    assert_eq!(cache.max_batch_total_size_bytes, 4 << 20);
    // Disk stores were created under the printed data directory.
    assert!(data.join("cas").is_dir() && data.join("ac").is_dir());
}

fn check_config(text: &str) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.toml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["check-config", path.to_str().unwrap()])
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn check_config_accepts_the_default_and_rejects_mistakes_with_line_and_hint() {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("default-config")
        .output()
        .unwrap();
    let (code, stdout, _) = check_config(&String::from_utf8(out.stdout).unwrap());
    assert_eq!(code, 0, "{stdout}");

    let (code, _, err) = check_config(
        "[stores.a.memory]\ncapacity = \"1 GiB\"\nevict = \"lru\"\n\n[[instances]]\ncas = \"a\"\nac = \"a\"\n",
    );
    assert_eq!(code, 2);
    assert!(
        err.contains("line 3") && err.contains("evict") && err.contains("capacity"),
        "{err}"
    );

    let (code, _, err) = check_config(
        "[stores.a.disk]\npath = \"x\"\ncapacity = \"-5\"\n\n[[instances]]\ncas = \"a\"\nac = \"a\"\n",
    );
    assert_eq!(code, 2);
    assert!(err.contains("line 3"), "{err}");

    let (code, _, err) = check_config("[[instances]]\ncas = \"a\"\nac = \"a\"\n");
    assert_eq!(code, 2);
    assert!(err.contains("stores"), "{err}");
}

#[test]
fn serve_refuses_a_bad_config_without_starting() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.toml");
    std::fs::write(&path, "[server]\nlisten = \"not an address\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["serve", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 2"), "{err}");
}

/// On a loopback address the dashboard answers only requests whose Host
/// is that loopback address (a DNS-rebinding page gets 403); /metrics and
/// /healthz answer any Host; `[server] dashboard = false` turns it off.
#[test]
fn the_dashboard_is_guarded_on_loopback_and_can_be_turned_off() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let kiln = KilnProcess::embedded(&data);
    let port = kiln.http.port();
    for host in [
        "localhost",
        &format!("127.0.0.1:{port}"),
        &format!("localhost:{port}"),
    ] {
        assert_eq!(kiln.http_get_host("/", host).0, 200, "Host {host}");
        assert_eq!(kiln.http_get_host("/api/workers", host).0, 200, "Host {host}");
    }
    for host in [
        "evil.example",
        &format!("evil.example:{port}"),
        &format!("127.0.0.2:{port}"),
    ] {
        let (status, body) = kiln.http_get_host("/api/workers", host);
        assert_eq!(status, 403, "Host {host}: {body}");
        assert!(body.contains("the dashboard answers only"), "{body}");
        assert_eq!(kiln.http_get_host("/", host).0, 403, "Host {host}");
        assert_eq!(kiln.http_get_host("/metrics", host).0, 200, "Host {host}");
        assert_eq!(kiln.http_get_host("/healthz", host).0, 200, "Host {host}");
    }
    drop(kiln);

    let off = KilnProcess::with_config(
        dir.path(),
        &format!("[server]\ndashboard = false\n{MEMORY_CONFIG}"),
    );
    assert_eq!(off.http_get("/").0, 404);
    assert_eq!(off.http_get("/api/workers").0, 404);
    assert_eq!(off.http_get("/healthz").0, 200);
}

/// Runs `kiln ARGS...` (the client sub-commands) to its end, bounded.
fn client(args: &[&str]) -> std::process::Output {
    output_within(
        Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(args)
            .env_remove("KILN_ENDPOINT")
            .env_remove("KILN_INSTANCE"),
        std::time::Duration::from_secs(120),
    )
}

/// The single `kiln: ...` line a failing client command prints.
fn one_error_line(out: &std::process::Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line on stderr, got {err:?}");
    assert!(lines[0].starts_with("kiln: "), "{err:?}");
    lines[0].to_string()
}

/// The client commands through the real binary against the embedded
/// default (real scheduler and sandboxed worker): a file goes up and comes
/// back byte-identical, `kiln exec -- sh -c 'echo hi > out'` downloads
/// `hi`, and a missing digest and an unreachable server fail with one
/// clear line and their documented exit codes (1 and 3).
#[test]
fn client_commands_through_the_binary() {
    let dir = tempfile::tempdir().unwrap();
    let kiln = KilnProcess::embedded(&dir.path().join("data"));
    let ep = format!("grpc://{}", kiln.grpc);
    let content: Vec<u8> = (0..150_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let file = dir.path().join("blob");
    std::fs::write(&file, &content).unwrap();
    let key = BlobKey::of(DigestFunction::Sha256, &content);
    let want = format!("{}/{}", key.hash_hex(), key.size());

    // Global options after the sub-command.
    let put = client(&["cas", "put", file.to_str().unwrap(), "--endpoint", &ep]);
    assert!(put.status.success(), "{}", String::from_utf8_lossy(&put.stderr));
    assert_eq!(String::from_utf8_lossy(&put.stdout).trim(), want);
    let got = client(&["cas", "get", &want, "--endpoint", &ep]);
    assert!(got.status.success(), "{}", String::from_utf8_lossy(&got.stderr));
    assert!(got.stdout == content, "the blob came back different");

    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let out = client(&[
        "exec",
        "--endpoint",
        &ep,
        "--input-root",
        root.to_str().unwrap(),
        "--output",
        "out",
        "--",
        "sh",
        "-c",
        "echo hi > out",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read_to_string(root.join("out")).unwrap(), "hi\n");

    let absent = BlobKey::of(DigestFunction::Sha256, b"nope");
    let missing = client(&[
        "cas",
        "get",
        &format!("{}/{}", absent.hash_hex(), absent.size()),
        "--endpoint",
        &ep,
    ]);
    assert_eq!(missing.status.code(), Some(1));
    one_error_line(&missing);

    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let unreachable = client(&["status", "--endpoint", &dead]);
    assert_eq!(unreachable.status.code(), Some(3));
    assert!(one_error_line(&unreachable).contains(&dead));
}
