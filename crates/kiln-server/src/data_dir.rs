//! Where disk stores with relative paths live.

use std::path::PathBuf;

/// `server.data_dir` if set, else `$KILN_DATA_DIR`, else
/// `$XDG_DATA_HOME/kiln`, else `~/.local/share/kiln`, else `./kiln-data`.
pub fn resolve(configured: Option<&PathBuf>) -> PathBuf {
    if let Some(p) = configured {
        return p.clone();
    }
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(p) = env("KILN_DATA_DIR") {
        return p;
    }
    if let Some(p) = env("XDG_DATA_HOME") {
        return p.join("kiln");
    }
    if let Some(home) = env("HOME") {
        return home.join(".local/share/kiln");
    }
    PathBuf::from("kiln-data")
}
