//! The runtime catalogue: the `Runtime` values hearth accepts, the image each runs in, and what
//! the front end and the worker need to know about them.

/// One runtime a function can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Runtime {
    /// The `Runtime` value (`python3.11`, `provided.al2023`, ...).
    pub name: &'static str,
    /// The runtime image it runs in.
    pub image: &'static str,
    /// `AWS_EXECUTION_ENV` as Lambda sets it; `None` for OS-only (custom) runtimes.
    pub execution_env: Option<&'static str>,
    /// Whether a function must give a `Handler` (managed language runtimes).
    pub needs_handler: bool,
}

/// Every runtime hearth accepts, in the order error messages list them.
pub const RUNTIMES: &[Runtime] = &[
    Runtime {
        name: "python3.11",
        image: "python3.11",
        execution_env: Some("AWS_Lambda_python3.11"),
        needs_handler: true,
    },
    Runtime {
        name: "python3.13",
        image: "python3.13",
        execution_env: Some("AWS_Lambda_python3.13"),
        needs_handler: true,
    },
    Runtime {
        name: "nodejs22.x",
        image: "nodejs22.x",
        execution_env: Some("AWS_Lambda_nodejs22.x"),
        needs_handler: true,
    },
    Runtime {
        name: "nodejs24.x",
        image: "nodejs24.x",
        execution_env: Some("AWS_Lambda_nodejs24.x"),
        needs_handler: true,
    },
    Runtime {
        name: "provided",
        image: "provided",
        execution_env: None,
        needs_handler: false,
    },
    Runtime {
        name: "provided.al2",
        image: "provided",
        execution_env: None,
        needs_handler: false,
    },
    Runtime {
        name: "provided.al2023",
        image: "provided",
        execution_env: None,
        needs_handler: false,
    },
];

/// The catalogue entry for `name`.
pub fn lookup(name: &str) -> Option<&'static Runtime> {
    RUNTIMES.iter().find(|r| r.name == name)
}

/// The runtime names, in catalogue order.
pub fn names() -> impl Iterator<Item = &'static str> {
    RUNTIMES.iter().map(|r| r.name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_finds_each_runtime_and_only_those() {
        for r in RUNTIMES {
            assert_eq!(lookup(r.name), Some(r));
        }
        // Only the Node.js majors hearth has an image for: no nodejs20.x, no future one.
        assert_eq!(lookup("nodejs20.x"), None);
        assert_eq!(lookup("nodejs99.x"), None);
        assert_eq!(lookup("nodejs22.x").map(|r| r.image), Some("nodejs22.x"));
        assert_eq!(
            lookup("nodejs24.x").and_then(|r| r.execution_env),
            Some("AWS_Lambda_nodejs24.x")
        );
        assert_eq!(lookup("provided.al2023").map(|r| r.image), Some("provided"));
        assert!(
            RUNTIMES
                .iter()
                .all(|r| r.needs_handler == r.execution_env.is_some())
        );
    }
}
