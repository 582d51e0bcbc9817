//! Reading and checking a config file.

use std::path::Path;

use thiserror::Error;

use super::Config;

/// A config that could not be used. The message names the line and says
/// what would be accepted.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{origin}: {message}")]
    Invalid { origin: String, message: String },
}

/// The embedded default configuration (what `kiln` runs with no arguments).
pub fn default_config_text() -> &'static str {
    include_str!("default.toml")
}

/// Reads and validates a config file.
pub fn load_file(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse(&text, &path.display().to_string())
}

/// Parses and validates config text; `origin` names it in errors.
pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
    let config: Config = toml::from_str(text).map_err(|e| ConfigError::Invalid {
        origin: origin.to_string(),
        message: with_hint(e),
    })?;
    super::validate::validate(&config, text).map_err(|message| ConfigError::Invalid {
        origin: origin.to_string(),
        message,
    })?;
    Ok(config)
}

/// toml's message already shows the line, a caret and, for unknown keys,
/// the keys that are valid there; add where the reference is.
fn with_hint(e: toml::de::Error) -> String {
    format!("{e}(see docs/configuration.md for every key and its default)")
}

/// 1-based line number of a byte offset in `text`.
pub(super) fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())]
        .bytes()
        .filter(|b| *b == b'\n')
        .count()
        + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_is_valid() {
        let c = parse(default_config_text(), "default").unwrap();
        assert_eq!(c.instances.len(), 1);
        assert_eq!(c.server.listen.port(), 50051);
    }

    #[test]
    fn unknown_key_reports_line_and_valid_keys() {
        let text = "[server]\nlisten = \"127.0.0.1:1\"\n\n[stores.a.memory]\ncapacty = \"1 MiB\"\n\n[[instances]]\ncas = \"a\"\nac = \"a\"\n";
        let err = parse(text, "test.toml").unwrap_err().to_string();
        assert!(err.contains("line 5"), "{err}");
        assert!(err.contains("capacty"), "{err}");
        assert!(err.contains("capacity"), "hint lists the valid key: {err}");
    }

    #[test]
    fn bad_size_reports_line_and_hint() {
        let text = "[stores.a.memory]\ncapacity = \"ten gigs\"\n\n[[instances]]\ncas = \"a\"\nac = \"a\"\n";
        let err = parse(text, "t").unwrap_err().to_string();
        assert!(err.contains("line 2"), "{err}");
        assert!(err.contains("MiB"), "{err}");
    }

    #[test]
    fn unknown_store_type_lists_types() {
        let text = "[stores.a.ssd]\ncapacity = \"1 GiB\"\n\n[[instances]]\ncas = \"a\"\nac = \"a\"\n";
        let err = parse(text, "t").unwrap_err().to_string();
        assert!(err.contains("line 1"), "{err}");
        assert!(err.contains("disk") && err.contains("memory"), "{err}");
    }

    #[test]
    fn dangling_reference_reports_line() {
        let text = "[stores.a.memory]\ncapacity = \"1 MiB\"\n\n[[instances]]\ncas = \"a\"\nac = \"nope\"\n";
        let err = parse(text, "t").unwrap_err().to_string();
        assert!(err.contains("line 6") && err.contains("nope"), "{err}");
    }

    #[test]
    fn cycles_rejected() {
        let text = "[stores.a.compressed]\ninner = \"b\"\n[stores.b.compressed]\ninner = \"a\"\n\n[[instances]]\ncas = \"a\"\nac = \"a\"\n";
        let err = parse(text, "t").unwrap_err().to_string();
        assert!(err.contains("cycle"), "{err}");
    }
}
