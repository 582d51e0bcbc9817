//! Validating a Command before anything runs: arguments, environment,
//! working directory and outputs (v2.1 `output_paths`, else the legacy
//! `output_files`/`output_directories`). Everything is checked lexically:
//! absolute paths and paths leaving the input root are INVALID_ARGUMENT.

use kiln_proto::reapi::{Command, Platform};

use crate::error::{WorkerError, WorkerResult};
use crate::materialize::{DeclaredOutput, OutputKind, OutputLayout};
use crate::paths::{RelPath, resolve};

/// A command ready to run.
#[derive(Debug, Clone)]
pub struct CheckedCommand {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub layout: OutputLayout,
}

/// Checks `command`.
pub fn check(command: &Command) -> WorkerResult<CheckedCommand> {
    if command.arguments.is_empty() || command.arguments[0].is_empty() {
        return Err(WorkerError::invalid(
            "the command has no program (arguments is empty)",
        ));
    }
    if command.arguments.iter().any(|a| a.contains('\0')) {
        return Err(WorkerError::invalid("a command argument contains NUL"));
    }
    let mut env = Vec::with_capacity(command.environment_variables.len());
    for v in &command.environment_variables {
        if v.name.is_empty() || v.name.contains('=') || v.name.contains('\0') || v.value.contains('\0') {
            return Err(WorkerError::invalid(format!(
                "invalid environment variable name {:?}",
                v.name
            )));
        }
        env.push((v.name.clone(), v.value.clone()));
    }
    let working_dir = resolve(&RelPath::root(), &command.working_directory, "working_directory")?;
    let mut outputs = Vec::new();
    let add = |outputs: &mut Vec<DeclaredOutput>, p: &String, kind: OutputKind| -> WorkerResult<()> {
        let what = match kind {
            OutputKind::Path => "output path",
            OutputKind::File => "output file",
            OutputKind::Directory => "output directory",
        };
        if p.starts_with('/') {
            return Err(WorkerError::invalid(format!(
                "{what} {p:?} is absolute; outputs are relative to the working directory"
            )));
        }
        let path = resolve(&working_dir, p, what)?;
        if path.is_root() && kind == OutputKind::File {
            return Err(WorkerError::invalid(format!("{what} {p:?} names the input root")));
        }
        outputs.push(DeclaredOutput {
            declared: p.clone(),
            path,
            kind,
        });
        Ok(())
    };
    if !command.output_paths.is_empty() {
        for p in &command.output_paths {
            add(&mut outputs, p, OutputKind::Path)?;
        }
    } else {
        #[allow(deprecated)]
        for p in &command.output_files {
            add(&mut outputs, p, OutputKind::File)?;
        }
        #[allow(deprecated)]
        for p in &command.output_directories {
            add(&mut outputs, p, OutputKind::Directory)?;
        }
    }
    Ok(CheckedCommand {
        argv: command.arguments.clone(),
        env,
        layout: OutputLayout { working_dir, outputs },
    })
}

/// Whether the platform asks for network access (`network` = `on`/`true`,
/// case-insensitive).
pub fn wants_network(platform: Option<&Platform>) -> bool {
    platform.is_some_and(|p| {
        p.properties.iter().any(|prop| {
            prop.name == "network" && matches!(prop.value.to_ascii_lowercase().as_str(), "on" | "true")
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::reapi::platform::Property;

    fn cmd(wd: &str, outputs: &[&str]) -> Command {
        Command {
            arguments: vec!["true".into()],
            working_directory: wd.into(),
            output_paths: outputs.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn escapes_rejected() {
        assert!(check(&cmd("", &["a/b"])).is_ok());
        assert!(check(&cmd("w", &["../x"])).is_ok());
        assert!(check(&cmd("w", &["../../x"])).is_err());
        assert!(check(&cmd("", &["/etc/passwd"])).is_err());
        assert!(check(&cmd("..", &[])).is_err());
        assert!(check(&cmd("/abs", &[])).is_err());
        assert!(check(&Command::default()).is_err());
    }

    #[test]
    fn network_property() {
        let p = |v: &str| Platform {
            properties: vec![Property {
                name: "network".into(),
                value: v.into(),
            }],
        };
        assert!(wants_network(Some(&p("on"))));
        assert!(wants_network(Some(&p("TRUE"))));
        assert!(!wants_network(Some(&p("off"))));
        assert!(!wants_network(None));
    }
}
