//! How the runtime is started: where to look for `bootstrap`, whether this is a SnapStart
//! init, and the runtime's environment.
//!
//! All of it comes from one environment: the agent's own process environment, or, for a
//! sandbox created before its function was known (`HEARTH_AGENT_DEFER=1`), the environment the
//! worker's `Configure` frame carries. Both go through [`RuntimeConfig::from_vars`], so a
//! deferred start derives exactly what a direct one does.

use std::ffi::OsString;
use std::fmt;
use std::path::PathBuf;

/// Variables with this prefix are the agent's own and never reach the runtime.
const OWN_PREFIX: &[u8] = b"HEARTH_";

/// What the agent needs to start the runtime.
#[derive(Debug)]
pub struct RuntimeConfig {
    pub task_root: PathBuf,
    pub runtime_dir: PathBuf,
    /// `AWS_LAMBDA_INITIALIZATION_TYPE=snap-start`: `restore/next` is available.
    pub snap_start: bool,
    /// The runtime's environment.
    pub env: Vec<(OsString, OsString)>,
}

impl RuntimeConfig {
    /// The configuration an environment describes. The runtime gets that environment minus
    /// `HEARTH_*` variables, plus `AWS_LAMBDA_RUNTIME_API=api_addr`. A variable that is unset,
    /// empty or not UTF-8 takes its default (`/var/task`, `/var/runtime`, not SnapStart); of
    /// repeated variables the last counts, as it is the one the runtime sees.
    pub fn from_vars(vars: impl IntoIterator<Item = (OsString, OsString)>, api_addr: &str) -> Self {
        let mut env: Vec<(OsString, OsString)> = vars
            .into_iter()
            .filter(|(k, _)| !k.as_encoded_bytes().starts_with(OWN_PREFIX))
            .collect();
        let lookup = |name: &str| {
            env.iter()
                .rev()
                .find(|(k, _)| k == name)
                .and_then(|(_, v)| v.to_str())
                .filter(|v| !v.is_empty())
        };
        let task_root = PathBuf::from(lookup("LAMBDA_TASK_ROOT").unwrap_or("/var/task"));
        let runtime_dir = PathBuf::from(lookup("LAMBDA_RUNTIME_DIR").unwrap_or("/var/runtime"));
        let snap_start = lookup("AWS_LAMBDA_INITIALIZATION_TYPE") == Some("snap-start");
        env.push(("AWS_LAMBDA_RUNTIME_API".into(), api_addr.into()));
        RuntimeConfig {
            task_root,
            runtime_dir,
            snap_start,
            env,
        }
    }
}

/// A `Configure` environment entry that cannot be a process environment variable.
#[derive(Debug, PartialEq, Eq)]
pub struct BadEntry(usize);

impl fmt::Display for BadEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The entry itself is not shown: it may hold a secret.
        write!(
            f,
            "environment entry {} is not KEY=VALUE (non-empty key, no NUL)",
            self.0
        )
    }
}

/// Split `Configure`'s `KEY=VALUE` entries (the value may be empty and may contain `=`).
pub fn parse_env(entries: Vec<String>) -> Result<Vec<(OsString, OsString)>, BadEntry> {
    entries
        .into_iter()
        .enumerate()
        .map(|(i, entry)| match entry.split_once('=') {
            Some((k, v)) if !k.is_empty() && !entry.contains('\0') => Ok((k.into(), v.into())),
            _ => Err(BadEntry(i)),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(list: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
        list.iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect()
    }

    #[test]
    fn defaults_and_lambda_variables() {
        let c = RuntimeConfig::from_vars(vars(&[("LAMBDA_TASK_ROOT", "")]), "127.0.0.1:9001");
        assert_eq!(c.task_root, PathBuf::from("/var/task"));
        assert_eq!(c.runtime_dir, PathBuf::from("/var/runtime"));
        assert!(!c.snap_start);

        let c = RuntimeConfig::from_vars(
            vars(&[
                ("LAMBDA_TASK_ROOT", "/old"),
                ("LAMBDA_TASK_ROOT", "/code"),
                ("LAMBDA_RUNTIME_DIR", "/rt"),
                ("AWS_LAMBDA_INITIALIZATION_TYPE", "snap-start"),
            ]),
            "a:1",
        );
        assert_eq!(
            (c.task_root, c.runtime_dir, c.snap_start),
            (PathBuf::from("/code"), PathBuf::from("/rt"), true)
        );
    }

    #[test]
    fn own_variables_are_dropped_and_the_api_address_added() {
        let c = RuntimeConfig::from_vars(
            vars(&[("HEARTH_AGENT_DEFER", "1"), ("GREETING", "hi")]),
            "127.0.0.1:9001",
        );
        assert_eq!(
            c.env,
            vars(&[
                ("GREETING", "hi"),
                ("AWS_LAMBDA_RUNTIME_API", "127.0.0.1:9001")
            ])
        );
    }

    #[test]
    fn configure_entries_are_key_value() {
        let env = parse_env(vec!["A=1".into(), "B=".into(), "C=x=y".into()]);
        assert_eq!(env, Ok(vars(&[("A", "1"), ("B", ""), ("C", "x=y")])));
        assert_eq!(
            parse_env(vec!["A=1".into(), "NOVALUE".into()]),
            Err(BadEntry(1))
        );
        assert_eq!(parse_env(vec!["=secret".into()]), Err(BadEntry(0)));
        assert_eq!(parse_env(vec!["A=x\0y".into()]), Err(BadEntry(0)));
        assert!(!BadEntry(0).to_string().contains("secret"));
    }
}
