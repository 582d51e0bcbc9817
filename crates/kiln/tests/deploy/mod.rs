//! Readers of the deployment examples for `deploy_examples.rs`: systemd
//! units, the Kubernetes manifests (the few shapes the examples use, not
//! general YAML), Prometheus rule selectors, durations and the operations
//! guide's code blocks. Each panics with the file and line it cannot read.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The repository's root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repository root")
}

/// A file of the repository, as text.
pub fn read(rel: &str) -> String {
    let path = repo().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Names of the files directly in a repository directory with the given
/// extension, sorted.
pub fn files(dir: &str, ext: &str) -> Vec<String> {
    let path = repo().join(dir);
    let mut out: Vec<String> = std::fs::read_dir(&path)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", path.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(ext))
        .collect();
    out.sort();
    out
}

/// The `[Service]` section of a systemd unit: key → values in order.
/// Continuation lines (`\` at the end) are joined; comments are skipped.
pub struct Unit {
    pub name: String,
    pub service: BTreeMap<String, Vec<String>>,
}

impl Unit {
    pub fn parse(name: &str, text: &str) -> Unit {
        let mut service = BTreeMap::new();
        let mut section = String::new();
        let mut pending = String::new();
        for raw in text.lines() {
            let line = raw.trim();
            if pending.is_empty() && (line.starts_with('#') || line.starts_with(';') || line.is_empty()) {
                continue;
            }
            if let Some(cont) = line.strip_suffix('\\') {
                pending.push_str(cont);
                pending.push(' ');
                continue;
            }
            let line = std::mem::take(&mut pending) + line;
            if line.starts_with('[') {
                section = line.trim_matches(|c| c == '[' || c == ']').to_string();
                continue;
            }
            let (key, value) = line
                .split_once('=')
                .unwrap_or_else(|| panic!("{name}: not a key=value line: {line:?}"));
            if section == "Service" {
                service
                    .entry(key.trim().to_string())
                    .or_insert_with(Vec::new)
                    .push(value.trim().to_string());
            }
        }
        Unit {
            name: name.to_string(),
            service,
        }
    }

    /// The last value of `key` (systemd: a later assignment wins).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.service.get(key).and_then(|v| v.last()).map(String::as_str)
    }

    pub fn require(&self, key: &str) -> &str {
        self.get(key)
            .unwrap_or_else(|| panic!("{}: no {key}= in [Service]", self.name))
    }

    /// `ExecStart=` split on whitespace (the examples quote nothing).
    pub fn exec_start(&self) -> Vec<String> {
        self.require("ExecStart")
            .split_whitespace()
            .map(str::to_string)
            .collect()
    }

    /// `Environment=NAME=VALUE` assignments.
    pub fn environment(&self) -> Vec<(String, String)> {
        self.service
            .get("Environment")
            .into_iter()
            .flatten()
            .flat_map(|v| v.split_whitespace())
            .map(|kv| {
                let (k, v) = kv.split_once('=').expect("Environment=NAME=VALUE");
                (k.to_string(), v.to_string())
            })
            .collect()
    }
}

/// Every unit in deploy/systemd.
pub fn units() -> Vec<Unit> {
    files("deploy/systemd", ".service")
        .into_iter()
        .map(|n| Unit::parse(&n, &read(&format!("deploy/systemd/{n}"))))
        .collect()
}

/// A duration as systemd or Kiln's configs write it: "45s", "2m", "1min",
/// "1h", "500ms", or a bare number of seconds.
pub fn duration(text: &str) -> Duration {
    let t = text.trim().trim_matches('"');
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let n: u64 = n.parse().unwrap_or_else(|_| panic!("not a duration: {text:?}"));
    match unit.trim() {
        "" | "s" | "sec" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" | "min" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        other => panic!("unknown duration unit {other:?} in {text:?}"),
    }
}

/// One document of a multi-document YAML file (split on `---` lines).
pub struct Doc {
    pub file: String,
    pub text: String,
}

impl Doc {
    /// The top-level `kind:`.
    pub fn kind(&self) -> &str {
        self.text
            .lines()
            .find_map(|l| l.strip_prefix("kind: "))
            .map(str::trim)
            .unwrap_or("")
    }

    /// `metadata.name` (the first `  name:` line after `metadata:`).
    pub fn name(&self) -> String {
        let mut in_meta = false;
        for l in self.text.lines() {
            if l == "metadata:" {
                in_meta = true;
            } else if in_meta && let Some(n) = l.strip_prefix("  name: ") {
                return n.trim().to_string();
            } else if in_meta && !l.starts_with(' ') {
                break;
            }
        }
        panic!("{}: a {} without metadata.name", self.file, self.kind())
    }

    /// Values of every `key: value` line, at any depth (a leading `- ` is
    /// allowed), quotes removed.
    pub fn values(&self, key: &str) -> Vec<String> {
        let prefix = format!("{key}: ");
        self.text
            .lines()
            .map(|l| l.trim_start().trim_start_matches("- "))
            .filter_map(|l| l.strip_prefix(&prefix))
            .map(|v| v.trim().trim_matches('"').to_string())
            .collect()
    }

    /// The single value of `key`, which must occur once.
    pub fn value(&self, key: &str) -> String {
        let v = self.values(key);
        assert_eq!(
            v.len(),
            1,
            "{}: expected one {key:?} in the {}, got {v:?}",
            self.file,
            self.kind()
        );
        v.into_iter().next().unwrap()
    }

    /// Container environment entries (`- name: N` followed by `value: V`).
    pub fn env(&self) -> Vec<(String, String)> {
        let lines: Vec<&str> = self.text.lines().map(str::trim).collect();
        lines
            .windows(2)
            .filter_map(|w| {
                let name = w[0].strip_prefix("- name: ")?;
                let value = w[1].strip_prefix("value: ")?;
                Some((name.to_string(), value.trim_matches('"').to_string()))
            })
            .collect()
    }

    /// A ConfigMap's `data` entries written as literal blocks (`KEY: |`),
    /// with the block's indentation removed (YAML's "clip" chomping: one
    /// final newline).
    pub fn configmap_data(&self) -> Vec<(String, String)> {
        let lines: Vec<&str> = self.text.lines().collect();
        let start = lines
            .iter()
            .position(|l| *l == "data:")
            .unwrap_or_else(|| panic!("{}: ConfigMap without data:", self.file));
        let mut out = Vec::new();
        let mut i = start + 1;
        while i < lines.len() && (lines[i].starts_with("  ") || lines[i].is_empty()) {
            let key = lines[i]
                .strip_prefix("  ")
                .and_then(|l| l.strip_suffix(": |"))
                .unwrap_or_else(|| panic!("{}: expected `  KEY: |`, got {:?}", self.file, lines[i]));
            i += 1;
            let mut block = Vec::new();
            while i < lines.len() && (lines[i].starts_with("    ") || lines[i].is_empty()) {
                block.push(lines[i].strip_prefix("    ").unwrap_or(""));
                i += 1;
            }
            while block.last() == Some(&"") {
                block.pop();
            }
            out.push((key.to_string(), block.join("\n") + "\n"));
        }
        out
    }

    /// Each container's `command` + `args`, both written as one-line flow
    /// sequences of double-quoted strings (valid JSON).
    pub fn container_commands(&self) -> Vec<Vec<String>> {
        let mut out = Vec::new();
        let mut current: Option<Vec<String>> = None;
        for l in self.text.lines() {
            let t = l.trim_start().trim_start_matches("- ");
            let json = |v: &str| -> Vec<String> {
                serde_json::from_str(v.trim())
                    .unwrap_or_else(|e| panic!("{}: {t:?} is not a one-line list of strings: {e}", self.file))
            };
            if let Some(v) = t.strip_prefix("command: ") {
                if let Some(done) = current.take() {
                    out.push(done);
                }
                current = Some(json(v));
            } else if let Some(v) = t.strip_prefix("args: ") {
                let mut cmd = current
                    .take()
                    .unwrap_or_else(|| panic!("{}: args without a command", self.file));
                cmd.extend(json(v));
                out.push(cmd);
            }
        }
        out.extend(current);
        out
    }
}

/// Every document of every manifest in deploy/kubernetes.
pub fn manifests() -> Vec<Doc> {
    let mut docs = Vec::new();
    for f in files("deploy/kubernetes", ".yaml") {
        let text = read(&format!("deploy/kubernetes/{f}"));
        let mut cur = String::new();
        for line in text.lines().chain(std::iter::once("---")) {
            if line == "---" {
                if cur.lines().any(|l| l.starts_with("kind: ")) {
                    docs.push(Doc {
                        file: f.clone(),
                        text: std::mem::take(&mut cur),
                    });
                }
                cur.clear();
            } else {
                cur.push_str(line);
                cur.push('\n');
            }
        }
    }
    docs
}

/// A `kiln_*` metric named in a text, with the label matchers of its
/// selector when it has one (`name{label="v", other=~"re"}`).
#[derive(Debug)]
pub struct MetricRef {
    pub name: String,
    /// (label, operator, value)
    pub matchers: Vec<(String, String, String)>,
}

/// The `kiln_*` identifiers of `text` that are metrics: not crate names
/// (`kiln_store::...`, `kiln_worker=debug` log filters), not part of a
/// longer identifier or path.
pub fn metric_refs(text: &str, crate_names: &[String]) -> Vec<MetricRef> {
    let bytes = text.as_bytes();
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(pos) = text[i..].find("kiln_") {
        let start = i + pos;
        let mut end = start;
        while end < bytes.len() && ident(bytes[end]) {
            end += 1;
        }
        i = end.max(start + 1);
        let before = if start == 0 { b' ' } else { bytes[start - 1] };
        if ident(before) || before == b'/' || before == b'.' || before == b'-' {
            continue;
        }
        let name = &text[start..end];
        let after = &text[end..];
        // `kiln_*`, `kiln_store_*`: a family named by its prefix.
        if name.ends_with('_') {
            continue;
        }
        if crate_names.iter().any(|c| c == name) || after.starts_with("::") || after.starts_with('=') {
            continue;
        }
        let mut matchers = Vec::new();
        if let Some(sel) = after.strip_prefix('{') {
            let body = &sel[..sel
                .find('}')
                .unwrap_or_else(|| panic!("unclosed selector after {name}"))];
            for m in body.split(',').map(str::trim).filter(|m| !m.is_empty()) {
                let op_at = m.find(['=', '!']).unwrap_or_else(|| panic!("bad matcher {m:?}"));
                let (label, rest) = m.split_at(op_at);
                let op_len = if rest.starts_with("=~") || rest.starts_with("!=") || rest.starts_with("!~") {
                    2
                } else {
                    1
                };
                let (op, value) = rest.split_at(op_len);
                matchers.push((
                    label.trim().to_string(),
                    op.to_string(),
                    value.trim().trim_matches('"').to_string(),
                ));
            }
        }
        out.push(MetricRef {
            name: name.to_string(),
            matchers,
        });
    }
    out
}

/// The workspace's crate names as Rust spells them (`kiln_store`, ...).
pub fn crate_names() -> Vec<String> {
    let dir = repo().join("crates");
    std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().replace('-', "_"))
        .collect()
}

/// The lines inside the fenced code blocks of a Markdown text.
pub fn code_lines(markdown: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut inside = false;
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            inside = !inside;
        } else if inside {
            out.push(line.to_string());
        }
    }
    out
}

/// The inline code spans (`...`) of a Markdown text outside code blocks,
/// with line breaks inside a span read as spaces.
pub fn inline_code(markdown: &str) -> Vec<String> {
    let mut prose = String::new();
    let mut inside = false;
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            inside = !inside;
        } else if !inside {
            prose.push_str(line);
            prose.push(' ');
        }
    }
    prose
        .split('`')
        .skip(1)
        .step_by(2)
        .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect()
}

/// A sample of a Prometheus/OpenMetrics text: metric name and labels.
#[derive(Debug)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
}

/// The names a `/metrics` text defines: every family of its `# TYPE`
/// lines (even one with no sample yet, e.g. a gauge per platform with
/// nothing queued) and the sample names its type gives it (`_total` for a
/// counter, `_bucket`, `_sum`, `_count` for a histogram).
pub fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut parts = rest.split_whitespace();
        let (Some(family), Some(kind)) = (parts.next(), parts.next()) else {
            continue;
        };
        out.insert(family.to_string());
        let suffixes: &[&str] = match kind {
            "counter" => &["_total"],
            "histogram" => &["_bucket", "_sum", "_count"],
            _ => &[],
        };
        for s in suffixes {
            out.insert(format!("{family}{s}"));
        }
    }
    out.extend(samples(text).into_iter().map(|s| s.name));
    out
}

/// The samples of a `/metrics` text (comment lines skipped).
pub fn samples(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let series = line.rsplit_once(' ').map(|(s, _)| s).unwrap_or(line);
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        let mut pairs = Vec::new();
        // Label values here never contain `",` (method names, stores, codes...).
        for kv in labels.split("\",").filter(|s| !s.is_empty()) {
            if let Some((k, v)) = kv.split_once("=\"") {
                pairs.push((k.to_string(), v.trim_end_matches('"').to_string()));
            }
        }
        out.push(Sample {
            name: name.to_string(),
            labels: pairs,
        });
    }
    out
}
