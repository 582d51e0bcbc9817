//! The configuration reference (docs/configuration.md), generated from the
//! config types and their doc comments so it cannot drift from the code.

use schemars::generate::SchemaSettings;
use serde_json::Value;

use super::Config;

const INTRO: &str = "# Configuration reference

Generated from the config types by `kiln config-reference`; a test fails
when this file is stale (regenerate with `KILN_UPDATE_DOCS=1 cargo test -p kiln-server`).

Kiln reads one TOML file (`kiln serve --config FILE`; `kiln check-config FILE`
validates without starting). Comments are allowed. Unknown keys are rejected
with their line and the keys valid there. Sizes are numbers of bytes or strings
such as `\"4 MiB\"` (binary) or `\"10 GB\"` (decimal); durations are strings such as
`\"30s\"`, `\"10m\"`, `\"1h 30m\"`. `kiln default-config` prints the embedded default.

A store is declared as `[stores.NAME.TYPE]` with exactly one TYPE; decorators
name the stores they wrap, so the file describes a tree:

```toml
[stores.cas-memory.memory]
capacity = \"512 MiB\"

[stores.cas-disk.disk]
path = \"cas\"
capacity = \"20 GiB\"

[stores.cas.tiered]
fast = \"cas-memory\"
slow = \"cas-disk\"

[stores.ac.disk]
path = \"ac\"
capacity = \"1 GiB\"

[[instances]]
name = \"\"
cas = \"cas\"
ac = \"ac\"
```
";

/// Renders the reference as Markdown.
pub fn reference_markdown() -> String {
    let generator = SchemaSettings::draft2020_12().into_generator();
    let schema = generator.into_root_schema_for::<Config>();
    let root = schema.as_value();
    let defs = root.get("$defs").cloned().unwrap_or(Value::Null);
    let mut out = String::from(INTRO);
    let sections = [
        ("server", "## `[server]`", "ServerConfig"),
        ("limits", "## `[limits]`", "LimitsConfig"),
    ];
    for (_, title, def) in sections {
        out.push_str(&format!("\n{title}\n\n"));
        push_description(&mut out, &defs[def]);
        push_table(&mut out, &defs[def], &defs);
    }
    out.push_str("\n## `[stores.NAME.TYPE]`\n\n");
    push_description(&mut out, &defs["StoreConfig"]);
    for variant in defs["StoreConfig"]["oneOf"].as_array().into_iter().flatten() {
        let Some((type_name, inner)) = variant["properties"].as_object().and_then(|p| p.iter().next()) else {
            continue;
        };
        out.push_str(&format!("\n### `{type_name}`\n\n"));
        push_description(&mut out, variant);
        let def = resolve(inner, &defs);
        push_table(&mut out, &def, &defs);
    }
    out.push_str("\n## `[[instances]]`\n\n");
    push_description(&mut out, &defs["InstanceConfig"]);
    push_table(&mut out, &defs["InstanceConfig"], &defs);
    out.push_str("\n## `[scheduler]`\n\n");
    push_description(&mut out, &root["properties"]["scheduler"]);
    push_table(&mut out, &defs["SchedulerConfig"], &defs);
    out.push_str("\nProperty rules: ");
    let rules: Vec<String> = defs["PropertyRule"]["oneOf"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            let name = r["const"]
                .as_str()
                .or_else(|| r["enum"][0].as_str())
                .unwrap_or("?");
            let desc = r["description"].as_str().unwrap_or("").replace('\n', " ");
            format!("`{name}`: {desc}")
        })
        .collect();
    out.push_str(&rules.join("; "));
    out.push('\n');
    out.push_str("\n## `[[workers]]`\n\n");
    push_description(&mut out, &root["properties"]["workers"]);
    push_table(&mut out, &defs["WorkerConfig"], &defs);
    out.push_str("\n### `[workers.sandbox]`\n\n");
    push_description(&mut out, &defs["SandboxConfig"]);
    push_table(&mut out, &defs["SandboxConfig"], &defs);
    out
}

fn resolve(schema: &Value, defs: &Value) -> Value {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(r) => defs[r.trim_start_matches("#/$defs/")].clone(),
        None => schema.clone(),
    }
}

fn push_description(out: &mut String, schema: &Value) {
    if let Some(d) = schema.get("description").and_then(Value::as_str) {
        out.push_str(d);
        out.push_str("\n\n");
    }
}

fn type_name(schema: &Value) -> String {
    if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
        return match r.trim_start_matches("#/$defs/") {
            "ByteSize" => "size".into(),
            "HumanDuration" => "duration".into(),
            other => other.to_string(),
        };
    }
    match schema.get("type") {
        Some(Value::String(t)) if t == "array" => format!("list of {}", type_name(&schema["items"])),
        Some(Value::String(t)) => t.clone(),
        Some(Value::Array(ts)) => ts
            .iter()
            .filter_map(Value::as_str)
            .filter(|t| *t != "null")
            .collect::<Vec<_>>()
            .join(" or "),
        _ => schema
            .get("anyOf")
            .and_then(Value::as_array)
            .and_then(|a| {
                a.iter()
                    .find(|s| s.get("type") != Some(&Value::String("null".into())))
            })
            .map(type_name)
            .unwrap_or_else(|| "value".into()),
    }
}

fn push_table(out: &mut String, schema: &Value, defs: &Value) {
    let required: Vec<&str> = schema["required"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    out.push_str("| key | type | default | meaning |\n| --- | --- | --- | --- |\n");
    for (key, prop) in schema["properties"].as_object().into_iter().flatten() {
        let default = match prop.get("default") {
            Some(Value::Null) | None if required.contains(&key.as_str()) => "required".to_string(),
            Some(Value::Null) | None => "—".to_string(),
            Some(v) => format!("`{v}`"),
        };
        let desc = prop
            .get("description")
            .and_then(Value::as_str)
            .map(|d| d.replace('\n', " "))
            .unwrap_or_default();
        let _ = defs;
        out.push_str(&format!(
            "| `{key}` | {} | {default} | {desc} |\n",
            type_name(prop)
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/configuration.md must equal what the code generates.
    #[test]
    fn configuration_reference_is_current() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/configuration.md");
        let generated = reference_markdown();
        if std::env::var_os("KILN_UPDATE_DOCS").is_some() {
            std::fs::write(&path, &generated).unwrap();
        }
        let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            on_disk == generated,
            "docs/configuration.md is stale: run `KILN_UPDATE_DOCS=1 cargo test -p kiln-server` and commit it"
        );
    }

    #[test]
    fn reference_covers_every_store_type_and_default() {
        let md = reference_markdown();
        for t in [
            "`memory`",
            "`disk`",
            "`tiered`",
            "`compressed`",
            "`existence_cache`",
        ] {
            assert!(md.contains(t), "{t} missing");
        }
        assert!(md.contains("`\"4 MiB\"`"), "batch default shown");
        assert!(md.contains("| `capacity` | size | required |"), "{md}");
    }
}
