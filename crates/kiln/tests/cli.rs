//! The `kiln` binary: embedded default, health endpoints, config checking.

mod common;

use std::process::Command;

use common::KilnProcess;
use kiln_proto::reapi::GetCapabilitiesRequest;
use kiln_proto::reapi::capabilities_client::CapabilitiesClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

#[tokio::test]
async fn embedded_default_serves_health_and_capabilities() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let kiln = KilnProcess::start(&[
        "--listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
        "--data-dir",
        data.to_str().unwrap(),
    ]);
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
    let kiln = KilnProcess::start(&[
        "--listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
        "--data-dir",
        data.to_str().unwrap(),
    ]);
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
        r#"
[server]
dashboard = false

[stores.cas.memory]
capacity = "16 MiB"

[stores.ac.memory]
capacity = "16 MiB"

[[instances]]
name = ""
cas = "cas"
ac = "ac"
"#,
    );
    assert_eq!(off.http_get("/").0, 404);
    assert_eq!(off.http_get("/api/workers").0, 404);
    assert_eq!(off.http_get("/healthz").0, 200);
}
