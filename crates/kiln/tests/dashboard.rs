//! The web dashboard end to end in headless Chromium: starts the real
//! `kiln` binary on its embedded default (scheduler and in-process
//! sandboxed worker) with a temporary data directory and ephemeral ports,
//! runs actions over REAPI (one executed with stdout and an output file,
//! the same one again as a cache hit, one failing with a non-zero exit),
//! then runs `tests/dashboard/dashboard.mjs` (playwright-core driving
//! Debian's chromium), which walks every page and checks they show those
//! actions. While the Queue page is open the test runs one sleeping action
//! more than the worker has slots: they must appear live (no reload), one
//! of them queued. At the end the server gets SIGTERM with a dashboard tab
//! open and must exit promptly (live streams end at shutdown).
//!
//! Screenshots: `docs/dashboard/*.png` with `KILN_UPDATE_SCREENSHOTS=1`,
//! else a temporary directory. Node, playwright-core (`npm ci` in
//! tests/dashboard) and chromium are required: scripts/install-deps.sh
//! installs them; the test fails with a clear message when they are missing.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command as Process, Stdio};
use std::time::{Duration, Instant};

use common::{KilnProcess, digest_of, line_reader, sigterm, wait_exit};
use kiln_digest::DigestFunction;
use kiln_proto::longrunning::{Operation, operation};
use kiln_proto::reapi::command::EnvironmentVariable;
use kiln_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use kiln_proto::reapi::execution_client::ExecutionClient;
use kiln_proto::reapi::platform::Property;
use kiln_proto::reapi::{
    Action, BatchUpdateBlobsRequest, Command, Digest, Directory, DirectoryNode, ExecuteRequest,
    ExecuteResponse, FileNode, Platform, RequestMetadata, batch_update_blobs_request,
};
use kiln_proto::request_info::REQUEST_METADATA_HEADER;
use prost::Message;
use serde_json::json;
use tonic::transport::Channel;

const F: DigestFunction = DigestFunction::Sha256;
const CHROMIUM: &str = "/usr/bin/chromium";
/// Bound of the browser script (Chromium's first start can be slow).
const SCRIPT_LIMIT: Duration = Duration::from_secs(240);
/// How long `kiln` may take to exit after SIGTERM with a tab open.
const SHUTDOWN_LIMIT: Duration = Duration::from_secs(15);

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn digest_json(d: &Digest) -> serde_json::Value {
    json!({ "function": "sha256", "hash": d.hash, "size": d.size_bytes })
}

/// Fails with a clear message when a prerequisite is missing: CI installs
/// them (scripts/install-deps.sh), so a silent skip would hide a gap.
fn require_tools(script_dir: &Path) -> PathBuf {
    let chromium = std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(CHROMIUM));
    assert!(
        chromium.exists(),
        "{} is missing: install Debian's chromium package (scripts/install-deps.sh does)",
        chromium.display()
    );
    let node = Process::new("node").arg("--version").output();
    assert!(
        node.as_ref().is_ok_and(|o| o.status.success()),
        "node is missing: the dashboard browser test needs Node.js on PATH"
    );
    assert!(
        script_dir.join("node_modules/playwright-core").exists(),
        "playwright-core is not installed: run `npm ci` in {} (scripts/install-deps.sh does)",
        script_dir.display()
    );
    chromium
}

/// One action's blobs.
struct Built {
    action: Digest,
    input_root: Digest,
    blobs: Vec<(Digest, Vec<u8>)>,
}

fn build_action(argv: &[&str], env: &[(&str, &str)], outputs: &[&str], inputs: &[(&str, &[u8])]) -> Built {
    let mut blobs = Vec::new();
    // Inputs: files at the root, or one level down in "src/".
    let mut root = Directory::default();
    let mut sub = Directory::default();
    for (path, content) in inputs {
        let d = digest_of(content);
        blobs.push((d.clone(), content.to_vec()));
        let node = |name: &str| FileNode {
            name: name.to_string(),
            digest: Some(d.clone()),
            is_executable: false,
            node_properties: None,
        };
        match path.split_once('/') {
            Some(("src", name)) => sub.files.push(node(name)),
            _ => root.files.push(node(path)),
        }
    }
    if !sub.files.is_empty() {
        let bytes = sub.encode_to_vec();
        let d = digest_of(&bytes);
        blobs.push((d.clone(), bytes));
        root.directories.push(DirectoryNode {
            name: "src".into(),
            digest: Some(d),
        });
    }
    let root_bytes = root.encode_to_vec();
    let input_root = digest_of(&root_bytes);
    blobs.push((input_root.clone(), root_bytes));
    let platform = Platform {
        properties: vec![Property {
            name: "OSFamily".into(),
            value: "Linux".into(),
        }],
    };
    let command = Command {
        arguments: argv.iter().map(|s| s.to_string()).collect(),
        environment_variables: env
            .iter()
            .map(|(k, v)| EnvironmentVariable {
                name: k.to_string(),
                value: v.to_string(),
            })
            .collect(),
        output_paths: outputs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    let command_bytes = command.encode_to_vec();
    let command_digest = digest_of(&command_bytes);
    blobs.push((command_digest.clone(), command_bytes));
    let action = Action {
        command_digest: Some(command_digest),
        input_root_digest: Some(input_root.clone()),
        platform: Some(platform),
        ..Default::default()
    };
    let action_bytes = action.encode_to_vec();
    let action_digest = digest_of(&action_bytes);
    blobs.push((action_digest.clone(), action_bytes));
    Built {
        action: action_digest,
        input_root,
        blobs,
    }
}

async fn upload(channel: &Channel, blobs: &[(Digest, Vec<u8>)]) {
    let req = BatchUpdateBlobsRequest {
        requests: blobs
            .iter()
            .map(|(d, data)| batch_update_blobs_request::Request {
                digest: Some(d.clone()),
                data: data.clone(),
                compressor: 0,
            })
            .collect(),
        digest_function: F.to_proto() as i32,
        ..Default::default()
    };
    let resp = ContentAddressableStorageClient::new(channel.clone())
        .batch_update_blobs(req)
        .await
        .expect("BatchUpdateBlobs")
        .into_inner();
    for r in resp.responses {
        assert_eq!(r.status.unwrap_or_default().code, 0, "upload failed");
    }
}

/// Executes and waits for the final operation.
async fn execute(channel: &Channel, action: &Digest, mnemonic: &str) -> (Operation, ExecuteResponse) {
    let mut req = tonic::Request::new(ExecuteRequest {
        action_digest: Some(action.clone()),
        digest_function: F.to_proto() as i32,
        ..Default::default()
    });
    let md = RequestMetadata {
        tool_invocation_id: "dashboard-test-invocation".into(),
        action_mnemonic: mnemonic.into(),
        target_id: format!("//dashboard:{}", mnemonic.to_lowercase()),
        ..Default::default()
    };
    req.metadata_mut().insert_bin(
        REQUEST_METADATA_HEADER,
        tonic::metadata::MetadataValue::from_bytes(&md.encode_to_vec()),
    );
    let mut stream = ExecutionClient::new(channel.clone())
        .execute(req)
        .await
        .expect("Execute")
        .into_inner();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let op = tokio::time::timeout(left, stream.message())
            .await
            .expect("the action did not finish within 60 s")
            .expect("Execute stream error")
            .expect("Execute stream ended early");
        if op.done {
            let Some(operation::Result::Response(any)) = &op.result else {
                panic!("operation without a response: {op:?}");
            };
            let resp = ExecuteResponse::decode(any.value.as_slice()).expect("ExecuteResponse");
            return (op, resp);
        }
    }
}

/// Waits until the embedded default's in-process worker has registered;
/// returns the execution slots the dashboard counts.
fn wait_for_worker(server: &KilnProcess) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = server.http_get("/api/workers");
        if status == 200
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(&body)
            && v["workers"]
                .as_array()
                .is_some_and(|w| w.iter().any(|w| w["connected"] == true))
            && let Some(slots) = v["slots"].as_u64().filter(|&s| s > 0)
        {
            return slots;
        }
        assert!(
            Instant::now() < deadline,
            "no worker registered within 30 s: {body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_pages_show_the_actions_in_headless_chromium() {
    let script_dir = repo_root().join("tests/dashboard");
    let chromium = require_tools(&script_dir);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut server = KilnProcess::embedded(&data);
    let slots = wait_for_worker(&server);
    let channel = server.channel().await;

    // 1. Executed, with stdout, an environment variable, an output file and
    //    an input tree with a subdirectory.
    let output_content = "report: 42 widgets\n";
    let ok = build_action(
        &[
            "/bin/sh",
            "-c",
            "echo \"hello from the kiln dashboard test ($GREETING)\"; cat input.txt src/lib.txt > /dev/null; printf 'report: 42 widgets\\n' > report.txt",
        ],
        &[("GREETING", "kiln-env-value")],
        &["report.txt"],
        &[("input.txt", b"input data\n"), ("src/lib.txt", b"nested input\n")],
    );
    upload(&channel, &ok.blobs).await;
    let (_, ok_resp) = execute(&channel, &ok.action, "Genrule").await;
    let ok_result = ok_resp.result.clone().expect("result");
    assert_eq!(ok_result.exit_code, 0, "{ok_resp:?}");
    assert!(!ok_resp.cached_result);
    let worker = ok_result
        .execution_metadata
        .as_ref()
        .map(|m| m.worker.clone())
        .unwrap_or_default();
    assert!(!worker.is_empty(), "the result names its worker");
    let output = ok_result
        .output_files
        .iter()
        .find(|f| f.path == "report.txt")
        .and_then(|f| f.digest.clone())
        .expect("report.txt output");

    // 2. The same action again: a cache hit.
    let (_, hit) = execute(&channel, &ok.action, "Genrule").await;
    assert!(hit.cached_result, "second Execute is a cache hit");

    // 3. A failing action (non-zero exit, stderr).
    let fail = build_action(
        &["/bin/sh", "-c", "echo 'this action fails on purpose' >&2; exit 3"],
        &[],
        &[],
        &[("input.txt", b"other input\n")],
    );
    upload(&channel, &fail.blobs).await;
    let (fail_op, fail_resp) = execute(&channel, &fail.action, "TestFail").await;
    assert_eq!(fail_resp.result.as_ref().map(|r| r.exit_code), Some(3));

    // 4. Prepared now, run while the Queue page is open: one more than the
    //    worker has slots, so one waits in the queue while the others sleep.
    let live: Vec<Built> = (0..=slots)
        .map(|i| {
            build_action(
                &["/bin/sh", "-c", &format!("sleep 6; echo live {i}")],
                &[],
                &[],
                &[("input.txt", b"live input\n")],
            )
        })
        .collect();
    for l in &live {
        upload(&channel, &l.blobs).await;
    }

    let update = std::env::var("KILN_UPDATE_SCREENSHOTS").is_ok_and(|v| v == "1");
    let shots_tmp = tempfile::tempdir().unwrap();
    let shots = if update {
        let d = repo_root().join("docs/dashboard");
        std::fs::create_dir_all(&d).unwrap();
        d
    } else {
        shots_tmp.path().to_path_buf()
    };
    let facts = json!({
        "worker": worker,
        "executed": 2,
        "cached": 1,
        "stores": ["cas", "ac"],
        "ok": {
            "mnemonic": "Genrule",
            "digest": digest_json(&ok.action),
            "command_snippet": "hello from the kiln dashboard test",
            "stdout": "hello from the kiln dashboard test (kiln-env-value)",
            "env_name": "GREETING",
            "env_value": "kiln-env-value",
            "output_file": "report.txt",
            "output_digest": digest_json(&output),
            "output_content": output_content,
            "input_root": digest_json(&ok.input_root),
            "input_file": "input.txt",
            "input_dir": "src",
            "nested_file": "lib.txt",
        },
        "fail": {
            "mnemonic": "TestFail",
            "exit_code": 3,
            "operation": fail_op.name,
            "stderr": "this action fails on purpose",
        },
        "live": { "mnemonic": "LiveSleep", "count": live.len() },
    });
    let facts_path = dir.path().join("facts.json");
    std::fs::write(&facts_path, facts.to_string()).unwrap();

    let mut node = Process::new("node")
        .arg(script_dir.join("dashboard.mjs"))
        .current_dir(&script_dir)
        .env("KILN_URL", format!("http://{}", server.http))
        .env("KILN_FACTS", &facts_path)
        .env("SCREENSHOT_DIR", &shots)
        .env("CHROMIUM", &chromium)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn node");
    let mut to_node = node.stdin.take().expect("stdin");
    let rx = line_reader(node.stdout.take().expect("stdout"), Some("browser".into()));

    let deadline = Instant::now() + SCRIPT_LIMIT;
    let mut live_run = None;
    let mut outcome = None;
    let mut stopped_in = None;
    while outcome.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = match rx.recv_timeout(left) {
            Ok(l) => l,
            Err(_) => {
                let _ = node.kill();
                panic!("the browser script did not finish within {SCRIPT_LIMIT:?}");
            }
        };
        let Some(event) = line.strip_prefix("KILN-TEST ") else {
            continue;
        };
        match event {
            "run-live-action" => {
                let runs = live.iter().map(|l| {
                    let ch = channel.clone();
                    let action = l.action.clone();
                    tokio::spawn(async move { execute(&ch, &action, "LiveSleep").await })
                });
                live_run = Some(runs.collect::<Vec<_>>());
                writeln!(to_node, "go").unwrap();
            }
            "stop-server" => {
                // SIGTERM with a dashboard tab open (its SSE stream live).
                sigterm(server.child.id());
                let (st, took) = wait_exit(&mut server.child, SHUTDOWN_LIMIT);
                assert!(st.success(), "kiln exited with {st} after SIGTERM");
                stopped_in = Some(took);
                writeln!(to_node, "go").unwrap();
            }
            "passed" => outcome = Some(Ok(())),
            other if other.starts_with("failed") => outcome = Some(Err(other.to_string())),
            _ => {}
        }
    }
    // The script said it is done: it exits at once.
    let (status, _) = wait_exit(&mut node, Duration::from_secs(30));
    if let Err(e) = outcome.unwrap() {
        panic!("browser checks failed (screenshots in {}): {e}", shots.display());
    }
    assert!(status.success(), "node exited with {status}");
    let stopped_in = stopped_in.expect("the server was stopped with a tab open");
    eprintln!("kiln exited {stopped_in:?} after SIGTERM with a dashboard tab open");
    let live_run = live_run.expect("the live actions ran");
    assert_eq!(live_run.len(), live.len());
    for run in live_run {
        let (_, live_resp) = tokio::time::timeout(Duration::from_secs(5), run)
            .await
            .expect("the live action finished before the server stopped")
            .unwrap();
        assert_eq!(live_resp.result.map(|r| r.exit_code), Some(0));
    }
    for page in [
        "overview",
        "workers",
        "queue",
        "actions",
        "action",
        "action-failed",
        "cas",
        "overview-dark",
    ] {
        let png = shots.join(format!("{page}.png"));
        let bytes = std::fs::read(&png).unwrap_or_else(|e| panic!("{}: {e}", png.display()));
        assert!(bytes.starts_with(b"\x89PNG"), "{} is a PNG", png.display());
    }
}
