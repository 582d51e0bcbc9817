//! The deployment examples (`deploy/`) and the operations guide
//! (`docs/operations.md`) say only what the code does:
//!
//! * every server config in `deploy/config` passes the real
//!   `kiln check-config`, every config file is used by a systemd unit and a
//!   Kubernetes manifest, and the manifests' ConfigMaps embed those files
//!   verbatim;
//! * every `ExecStart=` of `deploy/systemd` and every container command of
//!   `deploy/kubernetes` runs with the real binary, rewritten only where a
//!   test must differ (the binary's path, `/etc/kiln/X` → `deploy/config/X`,
//!   data directories → a temp dir, listeners → 127.0.0.1:0, the scheduler
//!   URL → that server); the worker runs as the manifest's non-root user
//!   with no capabilities and `no_new_privs` (as both examples run it) when
//!   the test runs as root. The server answers the probes the manifests
//!   use, the worker registers, runs a sandboxed action, lets a running
//!   action finish when it gets SIGTERM and exits within the example's stop
//!   timeout, and the server stops within its own;
//! * ports, data directories, Service names, stop timeouts and the
//!   sandbox-relevant unit settings agree across configs, units and
//!   manifests;
//! * every `kiln_*` metric (and label) of the example alert rules and of
//!   the guide is in a real `/metrics` scrape after that workload;
//! * every `kiln` flag the guide shows exists.

mod common;
mod deploy;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{KilnProcess, line_reader, output_within, sigterm, wait_exit, wait_for_line};
use deploy::{Doc, Unit, duration, manifests, read, repo, units};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const KILN: &str = env!("CARGO_BIN_EXE_kiln");
/// Where the examples install the binary.
const INSTALLED_KILN: &str = "/usr/local/bin/kiln";
/// Where the examples install the config files.
const CONFIG_DIR: &str = "/etc/kiln/";
/// How long a worker may take to register with the scheduler.
const REGISTER_WAIT: Duration = Duration::from_secs(30);
/// Bound of one `kiln exec` or `kiln check-config` run.
const CLIENT_WAIT: Duration = Duration::from_secs(60);

/// What a server config file says about where it listens and stores.
struct ServerFacts {
    grpc_port: u16,
    http_port: u16,
    data_dir: String,
}

fn server_facts(file: &str) -> ServerFacts {
    let v: toml::Table = read(&format!("deploy/config/{file}"))
        .parse()
        .unwrap_or_else(|e| panic!("{file}: {e}"));
    let server = v["server"].as_table().expect("[server]");
    let port = |key: &str| {
        server[key]
            .as_str()
            .and_then(|s| s.parse::<SocketAddr>().ok())
            .unwrap_or_else(|| panic!("{file}: server.{key} is not an address"))
            .port()
    };
    ServerFacts {
        grpc_port: port("listen"),
        http_port: port("http_listen"),
        data_dir: server["data_dir"].as_str().expect("server.data_dir").to_string(),
    }
}

/// The default of a key in the real binary's config reference (e.g.
/// `kill_grace` → "2s").
fn reference_default(key: &str) -> String {
    let out = Command::new(KILN).arg("config-reference").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let row = text
        .lines()
        .find(|l| l.starts_with(&format!("| `{key}` |")))
        .unwrap_or_else(|| panic!("no {key} row in the config reference"));
    row.split('|')
        .nth(3)
        .unwrap()
        .trim()
        .trim_matches('`')
        .trim_matches('"')
        .to_string()
}

/// The worker settings that bound how long it takes to stop.
struct WorkerFacts {
    drain_timeout: Duration,
    kill_grace: Duration,
}

fn worker_facts(file: &str) -> WorkerFacts {
    let v: toml::Table = read(&format!("deploy/config/{file}"))
        .parse()
        .unwrap_or_else(|e| panic!("{file}: {e}"));
    let get = |t: Option<&toml::Table>, key: &str| {
        t.and_then(|t| t.get(key))
            .and_then(|v| v.as_str())
            .map(str::to_string)
            .unwrap_or_else(|| reference_default(key))
    };
    WorkerFacts {
        drain_timeout: duration(&get(Some(&v), "drain_timeout")),
        kill_grace: duration(&get(v.get("sandbox").and_then(|s| s.as_table()), "kill_grace")),
    }
}

/// The value after `flag` in a command line.
fn arg_of<'a>(argv: &'a [String], flag: &str) -> Option<&'a str> {
    argv.iter().position(|a| a == flag).map(|i| {
        argv.get(i + 1)
            .unwrap_or_else(|| panic!("{flag} without a value in {argv:?}"))
            .as_str()
    })
}

/// `--config /etc/kiln/X` → "X", checking that deploy/config/X exists.
fn config_file(argv: &[String]) -> String {
    let path = arg_of(argv, "--config").unwrap_or_else(|| panic!("no --config in {argv:?}"));
    let name = path
        .strip_prefix(CONFIG_DIR)
        .unwrap_or_else(|| panic!("{path} is not under {CONFIG_DIR}"));
    assert!(
        repo().join("deploy/config").join(name).is_file(),
        "{path}: deploy/config/{name} does not exist"
    );
    name.to_string()
}

/// (host, port) of a `grpc://HOST:PORT` URL.
fn host_port(url: &str) -> (String, u16) {
    let rest = url
        .strip_prefix("grpc://")
        .or_else(|| url.strip_prefix("http://"))
        .unwrap_or_else(|| panic!("{url}: not grpc:// or http://"));
    let (host, port) = rest.rsplit_once(':').unwrap_or_else(|| panic!("{url}: no port"));
    (
        host.to_string(),
        port.parse().unwrap_or_else(|_| panic!("{url}: bad port")),
    )
}

/// The arguments (after the program) with which the test runs an example's
/// command line: paths and addresses the test cannot use are replaced,
/// everything else is passed as the example has it.
fn rewrite(argv: &[String], data_dir: &Path, scheduler: Option<SocketAddr>) -> Vec<String> {
    assert_eq!(
        argv[0], INSTALLED_KILN,
        "the examples install kiln at {INSTALLED_KILN}"
    );
    let serve = argv[1] == "serve";
    let mut out = Vec::new();
    let mut it = argv[1..].iter();
    while let Some(a) = it.next() {
        out.push(a.clone());
        let mut value = || it.next().unwrap_or_else(|| panic!("{a} needs a value")).clone();
        match a.as_str() {
            "--config" => {
                let name = value()
                    .strip_prefix(CONFIG_DIR)
                    .expect("config under /etc/kiln")
                    .to_string();
                out.push(repo().join("deploy/config").join(name).display().to_string());
            }
            "--dir" | "--data-dir" => {
                value();
                out.push(data_dir.display().to_string());
            }
            "--listen" | "--http-listen" => {
                value();
                out.push("127.0.0.1:0".into());
            }
            "--scheduler" | "--cas" => {
                value();
                out.push(format!("grpc://{}", scheduler.expect("a server to connect to")));
            }
            _ => {}
        }
    }
    if serve {
        for (flag, v) in [
            ("--listen", "127.0.0.1:0".to_string()),
            ("--http-listen", "127.0.0.1:0".to_string()),
            ("--data-dir", data_dir.display().to_string()),
        ] {
            if !out.iter().any(|a| a == flag) {
                out.push(flag.into());
                out.push(v);
            }
        }
    }
    out
}

/// Effective uid of this process.
fn euid() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().nth(2).unwrap().parse().unwrap()
}

fn has_setpriv() -> bool {
    Command::new("setpriv")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A running `kiln worker`; SIGKILLed when dropped.
struct Worker {
    child: Child,
}

impl Worker {
    /// Starts `args` (after the program), as `uid` without capabilities and
    /// with `no_new_privs` when given, and waits until it has registered.
    fn start(args: &[String], env: &[(String, String)], uid: Option<u32>) -> Worker {
        let mut cmd = match uid {
            Some(uid) => {
                let mut c = Command::new("setpriv");
                c.args([
                    format!("--reuid={uid}"),
                    format!("--regid={uid}"),
                    "--clear-groups".into(),
                    "--inh-caps=-all".into(),
                    "--bounding-set=-all".into(),
                    "--no-new-privs".into(),
                    KILN.into(),
                ]);
                c
            }
            None => Command::new(KILN),
        };
        let mut child = cmd
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn kiln worker");
        let lines = line_reader(child.stderr.take().unwrap(), Some("worker".into()));
        if let Err(seen) = wait_for_line(&lines, "registered with the scheduler", REGISTER_WAIT) {
            let _ = child.kill();
            panic!("the worker did not register within {REGISTER_WAIT:?}: {seen:?}");
        }
        // Keep reading (and echoing) its log, so it never blocks on stderr.
        std::thread::spawn(move || while lines.recv().is_ok() {});
        Worker { child }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a client command to its end (bounded); returns (success, stderr).
fn client(args: &[&str], cwd: &Path) -> (bool, String) {
    let out = output_within(Command::new(KILN).args(args).current_dir(cwd), CLIENT_WAIT);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn check_config(path: &Path) {
    let (ok, err) = client(&["check-config", path.to_str().unwrap()], &repo());
    assert!(ok, "kiln check-config {}: {err}", path.display());
}

fn is_server_config(name: &str) -> bool {
    read(&format!("deploy/config/{name}")).contains("[[instances]]")
}

/// One way of running the two roles: a serve and a worker command line,
/// with the environment and stop timeouts the example gives them.
struct Example {
    what: &'static str,
    serve: Vec<String>,
    serve_env: Vec<(String, String)>,
    serve_stop: Duration,
    worker: Vec<String>,
    worker_env: Vec<(String, String)>,
    worker_stop: Duration,
}

fn unit_by_command(sub: &str) -> Unit {
    let mut found: Vec<Unit> = units().into_iter().filter(|u| u.exec_start()[1] == sub).collect();
    assert_eq!(found.len(), 1, "expected one unit running `kiln {sub}`");
    found.pop().unwrap()
}

fn doc_by_command(sub: &str) -> (Doc, Vec<String>) {
    let mut found = Vec::new();
    for doc in manifests() {
        for cmd in doc.container_commands() {
            if cmd.get(1).is_some_and(|s| s == sub) {
                found.push(cmd);
            }
        }
    }
    assert_eq!(
        found.len(),
        1,
        "expected one container running `kiln {sub}`: {found:?}"
    );
    let cmd = found.pop().unwrap();
    let doc = manifests()
        .into_iter()
        .find(|d| d.container_commands().contains(&cmd))
        .unwrap();
    (doc, cmd)
}

fn examples() -> Vec<Example> {
    let serve_unit = unit_by_command("serve");
    let worker_unit = unit_by_command("worker");
    let (serve_doc, serve_cmd) = doc_by_command("serve");
    let (worker_doc, worker_cmd) = doc_by_command("worker");
    let grace = |d: &Doc| Duration::from_secs(d.value("terminationGracePeriodSeconds").parse().unwrap());
    vec![
        Example {
            what: "systemd",
            serve: serve_unit.exec_start(),
            serve_env: serve_unit.environment(),
            serve_stop: duration(serve_unit.require("TimeoutStopSec")),
            worker: worker_unit.exec_start(),
            worker_env: worker_unit.environment(),
            worker_stop: duration(worker_unit.require("TimeoutStopSec")),
        },
        Example {
            what: "kubernetes",
            serve: serve_cmd,
            serve_env: serve_doc.env(),
            serve_stop: grace(&serve_doc),
            worker: worker_cmd,
            worker_env: worker_doc.env(),
            worker_stop: grace(&worker_doc),
        },
    ]
}

#[test]
fn every_config_is_valid_and_used_by_a_unit_and_a_manifest() {
    let configs = deploy::files("deploy/config", ".toml");
    assert!(!configs.is_empty());
    for name in &configs {
        if is_server_config(name) {
            check_config(&repo().join("deploy/config").join(name));
        }
        // Worker configs are checked by starting a real worker with them
        // (examples_run_with_the_real_binary).
    }
    let by_units: BTreeSet<String> = units().iter().map(|u| config_file(&u.exec_start())).collect();
    let by_manifests: BTreeSet<String> = manifests()
        .iter()
        .flat_map(|d| d.container_commands())
        .map(|c| config_file(&c))
        .collect();
    let all: BTreeSet<String> = configs.into_iter().collect();
    assert_eq!(by_units, all, "deploy/config files vs the units' --config");
    assert_eq!(
        by_manifests, all,
        "deploy/config files vs the manifests' --config"
    );
}

#[test]
fn configmaps_embed_the_deploy_configs_verbatim() {
    let tmp = tempfile::tempdir().unwrap();
    let docs = manifests();
    let mut embedded = BTreeMap::new();
    for doc in docs.iter().filter(|d| d.kind() == "ConfigMap") {
        for (key, text) in doc.configmap_data() {
            let file = read(&format!("deploy/config/{key}"));
            assert_eq!(
                text,
                file,
                "{}: ConfigMap {} key {key} differs from deploy/config/{key}",
                doc.file,
                doc.name()
            );
            if is_server_config(&key) {
                // The embedded text itself, as Kubernetes would mount it.
                let path = tmp.path().join(&key);
                std::fs::write(&path, &text).unwrap();
                check_config(&path);
            }
            embedded.insert(key, (doc.file.clone(), doc.name()));
        }
    }
    // Every container's --config is a key of a ConfigMap of its file,
    // mounted at the config directory.
    for doc in &docs {
        for cmd in doc.container_commands() {
            let key = config_file(&cmd);
            let (file, map) = embedded
                .get(&key)
                .unwrap_or_else(|| panic!("{}: no ConfigMap holds {key}", doc.file));
            assert_eq!(file, &doc.file, "{key} comes from a ConfigMap of another file");
            assert!(
                doc.values("name").contains(map),
                "{}: ConfigMap {map} is not used",
                doc.file
            );
            assert!(
                doc.values("mountPath")
                    .iter()
                    .any(|p| p == CONFIG_DIR.trim_end_matches('/')),
                "{}: nothing mounted at {CONFIG_DIR}",
                doc.file
            );
        }
    }
}

#[test]
fn ports_directories_and_names_agree() {
    let serve_unit = unit_by_command("serve");
    let worker_unit = unit_by_command("worker");
    let server = server_facts(&config_file(&serve_unit.exec_start()));

    // systemd: the data directory is the unit's state directory and the
    // only writable path; the worker's --dir likewise.
    let state = |u: &Unit| format!("/var/lib/{}", u.require("StateDirectory"));
    assert_eq!(server.data_dir, state(&serve_unit));
    assert_eq!(serve_unit.require("ReadWritePaths"), server.data_dir);
    let worker_dir = arg_of(&worker_unit.exec_start(), "--dir").unwrap().to_string();
    assert_eq!(worker_dir, state(&worker_unit));
    assert_eq!(worker_unit.require("ReadWritePaths"), worker_dir);
    let (_, port) = host_port(arg_of(&worker_unit.exec_start(), "--scheduler").unwrap());
    assert_eq!(port, server.grpc_port, "the worker unit's --scheduler port");

    // Kubernetes: the volume is mounted at the data directory, the
    // container and the Service expose the config's ports, the worker
    // reaches the scheduler through that Service.
    let (serve_doc, serve_cmd) = doc_by_command("serve");
    let (worker_doc, worker_cmd) = doc_by_command("worker");
    assert_eq!(server_facts(&config_file(&serve_cmd)).data_dir, server.data_dir);
    assert!(serve_doc.values("mountPath").contains(&server.data_dir));
    let ports: Vec<u16> = serve_doc
        .values("containerPort")
        .iter()
        .map(|p| p.parse().unwrap())
        .collect();
    assert!(
        ports.contains(&server.grpc_port) && ports.contains(&server.http_port),
        "{ports:?}"
    );
    let k8s_dir = arg_of(&worker_cmd, "--dir").unwrap().to_string();
    assert!(
        worker_doc.values("mountPath").contains(&k8s_dir),
        "{k8s_dir} is not a volume"
    );
    let (host, port) = host_port(arg_of(&worker_cmd, "--scheduler").unwrap());
    assert_eq!(port, server.grpc_port);
    let service = manifests()
        .into_iter()
        .find(|d| d.kind() == "Service" && d.name() == host)
        .unwrap_or_else(|| panic!("the worker's scheduler host {host} is not a Service"));
    let service_ports: Vec<u16> = service
        .values("port")
        .iter()
        .map(|p| p.parse().unwrap())
        .collect();
    assert!(service_ports.contains(&server.grpc_port), "{service_ports:?}");
    assert!(service_ports.contains(&server.http_port), "{service_ports:?}");
    // The liveness probe's gRPC port is the listener's.
    let probe_ports: Vec<u16> = serve_doc
        .values("port")
        .iter()
        .filter_map(|p| p.parse().ok())
        .collect();
    assert!(probe_ports.contains(&server.grpc_port), "{probe_ports:?}");
}

#[test]
fn stop_timeouts_cover_the_drain_and_units_keep_the_sandbox_working() {
    let worker_unit = unit_by_command("worker");
    let serve_unit = unit_by_command("serve");
    let facts = worker_facts(&config_file(&worker_unit.exec_start()));
    let needed = facts.drain_timeout + facts.kill_grace;
    let stop = duration(worker_unit.require("TimeoutStopSec"));
    assert!(
        stop > needed,
        "TimeoutStopSec {stop:?} <= drain_timeout + kill_grace {needed:?}"
    );
    let (worker_doc, worker_cmd) = doc_by_command("worker");
    let facts = worker_facts(&config_file(&worker_cmd));
    let grace = Duration::from_secs(worker_doc.value("terminationGracePeriodSeconds").parse().unwrap());
    assert!(
        grace > facts.drain_timeout + facts.kill_grace,
        "terminationGracePeriodSeconds {grace:?}"
    );

    // `kiln serve` gives in-flight calls 30 s after SIGTERM (crates/kiln/src/main.rs).
    let serve_bound = Duration::from_secs(30);
    assert!(duration(serve_unit.require("TimeoutStopSec")) > serve_bound);
    let (serve_doc, _) = doc_by_command("serve");
    let serve_grace = Duration::from_secs(serve_doc.value("terminationGracePeriodSeconds").parse().unwrap());
    assert!(serve_grace > serve_bound);

    // SIGTERM must reach the worker alone: with KillMode=control-group the
    // sandbox helpers and the actions would get it too and the running
    // actions would die instead of draining.
    assert_eq!(worker_unit.get("KillSignal"), Some("SIGTERM"));
    assert_eq!(worker_unit.get("KillMode"), Some("mixed"));
    // The sandbox creates these namespaces and needs every system call its
    // actions make.
    if let Some(allowed) = worker_unit.get("RestrictNamespaces") {
        let allowed: Vec<&str> = allowed.split_whitespace().collect();
        for ns in ["user", "mnt", "net", "pid", "ipc", "uts"] {
            assert!(allowed.contains(&ns), "RestrictNamespaces={allowed:?} lacks {ns}");
        }
    }
    for key in ["PrivateUsers", "SystemCallFilter", "MemoryDenyWriteExecute"] {
        assert!(
            worker_unit.get(key).is_none(),
            "{key}= breaks actions in the sandbox"
        );
    }
    // Not root, no capabilities: the worker needs none.
    assert_ne!(worker_unit.get("User"), Some("root"));
    assert_eq!(worker_unit.get("CapabilityBoundingSet"), Some(""));
    assert!(!worker_doc.text.contains("privileged: true"));
    assert_eq!(worker_doc.value("runAsNonRoot"), "true");
    assert_eq!(worker_doc.value("allowPrivilegeEscalation"), "false");
}

/// Checks every `kiln_*` metric named in `text` against a scrape: the
/// name must be one the scrape defines (a sample name, or a family of its
/// `# TYPE` lines, which prose may name), and every label matcher must fit
/// the samples of that name (`job` and `instance` are Prometheus' target
/// labels). Returns how many references were checked.
fn check_metric_refs(what: &str, text: &str, scrape: &str) -> usize {
    let names = deploy::metric_names(scrape);
    let samples = deploy::samples(scrape);
    let refs = deploy::metric_refs(text, &deploy::crate_names());
    for r in &refs {
        assert!(
            names.contains(&r.name),
            "{what}: {} is not in the /metrics scrape",
            r.name
        );
        let of_name: Vec<&deploy::Sample> = samples.iter().filter(|s| s.name == r.name).collect();
        for (label, op, value) in &r.matchers {
            if label == "job" || label == "instance" {
                continue;
            }
            assert!(
                of_name.iter().any(|s| s.labels.iter().any(|(k, _)| k == label)),
                "{what}: no sample of {} has the label {label}",
                r.name
            );
            if op == "=" {
                assert!(
                    of_name
                        .iter()
                        .any(|s| s.labels.iter().any(|(k, v)| k == label && v == value)),
                    "{what}: no {}{{{label}=\"{value}\"}} in the scrape",
                    r.name
                );
            }
        }
    }
    refs.len()
}

/// Fully qualified gRPC service names in the guide's inline code
/// (`google.bytestream.ByteStream`), except the health service itself.
fn guide_service_names() -> Vec<String> {
    let mut names: Vec<String> = deploy::inline_code(&read("docs/operations.md"))
        .into_iter()
        .filter(|s| {
            let last = s.rsplit('.').next().unwrap_or("");
            s.contains('.')
                && s.starts_with(|c: char| c.is_ascii_lowercase())
                && last.starts_with(|c: char| c.is_ascii_uppercase())
                && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '.')
                && s != "grpc.health.v1.Health"
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Runs one example's two commands against each other and returns the
/// server's `/metrics` text after the workload.
async fn run_example(ex: &Example) -> String {
    eprintln!("--- {} example", ex.what);
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(base, std::fs::Permissions::from_mode(0o755)).unwrap();

    // The server, as the example starts it.
    let data = base.join("data");
    let args = rewrite(&ex.serve, &data, None);
    let env: Vec<(&str, &str)> = ex
        .serve_env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut kiln = KilnProcess::start_with(&arg_refs, &env, false);

    // The probes of the manifest: GET /healthz, grpc.health.v1 "".
    for path in doc_by_command("serve").0.values("path") {
        let (status, body) = kiln.http_get(&path);
        assert_eq!(status, 200, "{path}: {body}");
    }
    let health = HealthClient::new(kiln.channel().await)
        .check(HealthCheckRequest { service: "".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(health.status, ServingStatus::Serving as i32);
    // Every gRPC service the guide names is served (this server has a
    // scheduler, so all of them).
    let mut health = HealthClient::new(kiln.channel().await);
    let services = guide_service_names();
    assert!(services.len() >= 8, "{services:?}");
    for service in services {
        let r = health
            .check(HealthCheckRequest {
                service: service.clone(),
            })
            .await
            .unwrap_or_else(|e| panic!("docs/operations.md names {service}, which is not served: {e}"))
            .into_inner();
        assert_eq!(r.status, ServingStatus::Serving as i32, "{service}");
    }

    // The worker, as the example starts it; as the manifest's non-root
    // user when we are root (systemd's User= is a system user alike).
    let worker_dir = base.join("worker");
    std::fs::create_dir(&worker_dir).unwrap();
    let uid = if euid() == 0 && has_setpriv() {
        let uid: u32 = doc_by_command("worker").0.value("runAsUser").parse().unwrap();
        std::os::unix::fs::chown(&worker_dir, Some(uid), Some(uid)).unwrap();
        Some(uid)
    } else {
        eprintln!("(running the worker as uid {} without setpriv)", euid());
        None
    };
    let mut worker_env = ex.worker_env.clone();
    if !worker_env.iter().any(|(k, _)| k == "KILN_LOG") {
        worker_env.push(("KILN_LOG".into(), "info".into()));
    }
    let worker_args = rewrite(&ex.worker, &worker_dir, Some(kiln.grpc));
    let mut worker = Worker::start(&worker_args, &worker_env, uid);
    let endpoint = format!("grpc://{}", kiln.grpc);

    // A sandboxed action; it runs as the worker's own (non-root) user.
    let input = base.join("in1");
    std::fs::create_dir(&input).unwrap();
    let (ok, err) = client(
        &[
            "exec",
            "--endpoint",
            &endpoint,
            "--output",
            "out",
            "--",
            "sh",
            "-c",
            "echo hi > out; id -u >> out",
        ],
        &input,
    );
    assert!(ok, "kiln exec: {err}");
    let out = std::fs::read_to_string(input.join("out")).unwrap();
    let expected_uid = uid.unwrap_or_else(euid);
    assert_eq!(
        out,
        format!("hi\n{expected_uid}\n"),
        "the action's output and user id"
    );

    // A cache miss (NotFound), so the error counters have a sample.
    let (ok, _) = client(
        &[
            "ac",
            "get",
            "--endpoint",
            &endpoint,
            "0000000000000000000000000000000000000000000000000000000000000000/1",
        ],
        base,
    );
    assert!(!ok, "kiln ac get of an unknown action must fail");

    // SIGTERM while an action runs: it finishes, then the worker leaves
    // within the example's stop timeout.
    let input = base.join("in2");
    std::fs::create_dir(&input).unwrap();
    let mut exec = Command::new(KILN)
        .args([
            "exec",
            "--endpoint",
            &endpoint,
            "--no-cache",
            "--output",
            "out",
            "--",
            "sh",
            "-c",
            "sleep 2; echo drained > out",
        ])
        .current_dir(&input)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let rx = line_reader(exec.stderr.take().unwrap(), None);
    wait_for_line(&rx, "EXECUTING", CLIENT_WAIT).expect("kiln exec did not report EXECUTING");
    let signalled = Instant::now();
    sigterm(worker.child.id());
    let (status, _) = wait_exit(&mut exec, CLIENT_WAIT);
    assert!(
        status.success(),
        "the action running when the worker got SIGTERM did not complete"
    );
    assert_eq!(std::fs::read_to_string(input.join("out")).unwrap(), "drained\n");
    let (status, _) = wait_exit(&mut worker.child, ex.worker_stop);
    assert!(status.success(), "the worker exited with an error after SIGTERM");
    let took = signalled.elapsed();
    assert!(took < ex.worker_stop, "the worker took {took:?} to stop");
    eprintln!("{}: worker drained and exited {took:?} after SIGTERM", ex.what);

    let (status, scrape) = kiln.http_get("/metrics");
    assert_eq!(status, 200);

    // The server stops within its stop timeout.
    sigterm(kiln.child.id());
    let (status, took) = wait_exit(&mut kiln.child, ex.serve_stop);
    assert!(status.success(), "kiln serve exited with an error after SIGTERM");
    eprintln!("{}: server exited {took:?} after SIGTERM", ex.what);
    scrape
}

#[tokio::test(flavor = "multi_thread")]
async fn examples_run_with_the_real_binary() {
    let mut scrapes = Vec::new();
    for ex in examples() {
        scrapes.push(run_example(&ex).await);
    }
    let mut checked = 0;
    // Both runs (systemd units, Kubernetes manifests) expose the metrics
    // the alerts and the docs name.
    for scrape in &scrapes {
        for f in deploy::files("deploy/prometheus", ".yml") {
            checked += check_metric_refs(&f, &read(&format!("deploy/prometheus/{f}")), scrape);
        }
        for doc in ["docs/operations.md", "docs/metrics.md"] {
            checked += check_metric_refs(doc, &read(doc), scrape);
        }
    }
    assert!(checked >= 20, "only {checked} metric references found");
}

/// Every `kiln` subcommand path (`kiln cas put` → ["cas", "put"]).
const SUBCOMMANDS: [&str; 9] = [
    "serve",
    "worker",
    "check-config",
    "default-config",
    "cas",
    "ac",
    "exec",
    "status",
    "config-reference",
];

/// Kiln's flags the guide uses: from `kiln ...` command lines (code blocks
/// and inline code), as (subcommand path, flags); and inline code that is
/// a Kiln flag on its own (`--log-format json`), as (None, flag). Bazel's
/// flags (`--remote_executor`, with underscores) are not Kiln's.
fn guide_flags() -> Vec<(Option<Vec<String>>, Vec<String>)> {
    let guide = read("docs/operations.md");
    let mut out = Vec::new();
    let flag_name = |t: &str| format!("--{}", t.trim_start_matches('-').split('=').next().unwrap());
    let spans = deploy::code_lines(&guide)
        .into_iter()
        .chain(deploy::inline_code(&guide));
    for line in spans {
        let tokens: Vec<&str> = line.split_whitespace().collect();
        let Some(at) = tokens.iter().position(|t| *t == "kiln" || t.ends_with("/kiln")) else {
            if let Some(first) = tokens.first()
                && first.starts_with("--")
                && first.len() > 2
                && !first.contains('_')
            {
                out.push((None, vec![flag_name(first)]));
            }
            continue;
        };
        let mut path: Vec<String> = Vec::new();
        let mut flags = Vec::new();
        for t in &tokens[at + 1..] {
            if ["--", "|", "&&", ";", ">", "&", "\\"].contains(t) {
                break;
            }
            if t.starts_with("--") {
                flags.push(flag_name(t));
            } else if flags.is_empty()
                && (SUBCOMMANDS.contains(t) && path.is_empty()
                    || path.len() == 1 && ["cas", "ac"].contains(&path[0].as_str()))
            {
                path.push(t.to_string());
            }
        }
        out.push((Some(path), flags));
    }
    out
}

fn help_of(path: &[String]) -> String {
    let out = Command::new(KILN).args(path).arg("--help").output().unwrap();
    assert!(out.status.success(), "kiln {path:?} --help");
    String::from_utf8(out.stdout).unwrap()
}

fn lists_flag(help: &str, flag: &str) -> bool {
    help.contains(&format!("{flag} ")) || help.contains(&format!("{flag}\n"))
}

#[test]
fn operations_guide_uses_real_flags() {
    let used = guide_flags();
    let commands = used.iter().filter(|(p, _)| p.is_some()).count();
    let flags: usize = used.iter().map(|(_, f)| f.len()).sum();
    assert!(commands >= 5 && flags >= 10, "{used:?}");
    let every_help: String = std::iter::once(Vec::new())
        .chain(SUBCOMMANDS.iter().map(|s| vec![s.to_string()]))
        .map(|p| help_of(&p))
        .collect();
    let mut helps: BTreeMap<Vec<String>, String> = BTreeMap::new();
    for (path, flags) in used {
        let help = match &path {
            Some(p) => helps.entry(p.clone()).or_insert_with(|| help_of(p)),
            None => &every_help,
        };
        for flag in flags {
            assert!(
                lists_flag(help, &flag),
                "docs/operations.md: `kiln {}` has no flag {flag}",
                path.map(|p| p.join(" ")).unwrap_or_else(|| "(any)".into())
            );
        }
    }
}

#[test]
fn durations_parse_like_systemd_and_kiln() {
    assert_eq!(duration("45s"), Duration::from_secs(45));
    assert_eq!(duration("2m"), Duration::from_secs(120));
    assert_eq!(duration("\"1min\""), Duration::from_secs(60));
    assert_eq!(duration("150"), Duration::from_secs(150));
    assert_eq!(duration("500ms"), Duration::from_millis(500));
}
