//! Parameter rules of the Lambda API (botocore's model plus what Lambda enforces server-side),
//! and parsing of function references (`name`, `name:qualifier`, full and partial ARNs).
//!
//! Each check returns `InvalidParameterValueException` with a message in Lambda's wording, so
//! clients that match on messages keep working.

use std::collections::BTreeMap;

use crate::error::ApiError;

/// Environment variables Lambda sets itself; a function may not override them.
pub const RESERVED_ENV: [&str; 17] = [
    "_HANDLER",
    "_X_AMZN_TRACE_ID",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_EXECUTION_ENV",
    "AWS_LAMBDA_FUNCTION_NAME",
    "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
    "AWS_LAMBDA_FUNCTION_VERSION",
    "AWS_LAMBDA_INITIALIZATION_TYPE",
    "AWS_LAMBDA_LOG_GROUP_NAME",
    "AWS_LAMBDA_LOG_STREAM_NAME",
    "AWS_ACCESS_KEY",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_LAMBDA_RUNTIME_API",
    "LAMBDA_TASK_ROOT",
];
/// Lambda's limit on the serialized environment.
pub const MAX_ENV_BYTES: usize = 4096;
/// Longest function name.
pub const MAX_FUNCTION_NAME: usize = 64;

fn constraint(value: impl std::fmt::Display, field: &str, rule: &str) -> ApiError {
    ApiError::invalid(format!(
        "1 validation error detected: Value '{value}' at '{field}' failed to satisfy \
         constraint: {rule}"
    ))
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_'
}

/// A function name as stored: 1–64 of `[a-zA-Z0-9-_]`.
pub fn function_name(name: &str) -> Result<(), ApiError> {
    if name.is_empty() || name.len() > MAX_FUNCTION_NAME || !name.chars().all(is_name_char) {
        return Err(constraint(
            name,
            "functionName",
            "Member must satisfy regular expression pattern: [a-zA-Z0-9-_]+ and have length \
             between 1 and 64",
        ));
    }
    Ok(())
}

/// Which version a qualifier names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Qualifier {
    Latest,
    Version(u64),
    Alias(String),
}

impl Qualifier {
    pub fn parse(q: &str) -> Result<Qualifier, ApiError> {
        if q == "$LATEST" {
            return Ok(Qualifier::Latest);
        }
        if q.is_empty() || q.len() > 128 || !q.chars().all(is_name_char) {
            return Err(constraint(
                q,
                "qualifier",
                "Member must satisfy regular expression pattern: (|[a-zA-Z0-9$_-]+)",
            ));
        }
        if q.chars().all(|c| c.is_ascii_digit()) {
            return q
                .parse()
                .map(Qualifier::Version)
                .map_err(|_| constraint(q, "qualifier", "Member must be a valid version number"));
        }
        Ok(Qualifier::Alias(q.to_string()))
    }
}

/// A reference to a function as a caller wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionRef {
    pub name: String,
    pub qualifier: Option<String>,
}

/// Parse `name`, `name:qualifier`, `arn:aws:lambda:region:account:function:name[:qualifier]`
/// or `account:function:name[:qualifier]`. An ARN for another region or account names no
/// function here (`ResourceNotFoundException`).
pub fn function_ref(raw: &str, region: &str, account: &str) -> Result<FunctionRef, ApiError> {
    let bad = || {
        constraint(
            raw,
            "functionName",
            "Member must satisfy regular expression pattern: \
             (arn:(aws[a-zA-Z-]*)?:lambda:)?([a-z]{2}(-gov)?-[a-z]+-\\d{1}:)?(\\d{12}:)?\
             (function:)?([a-zA-Z0-9-_]+)(:(\\$LATEST|[a-zA-Z0-9-_]+))?",
        )
    };
    let parts: Vec<&str> = raw.split(':').collect();
    let (arn_region, arn_account, rest): (Option<&str>, Option<&str>, &[&str]) =
        if parts[0] == "arn" {
            if parts.len() < 7
                || !parts[1].starts_with("aws")
                || parts[2] != "lambda"
                || parts[5] != "function"
            {
                return Err(bad());
            }
            (Some(parts[3]), Some(parts[4]), &parts[6..])
        } else if parts.len() >= 3 && is_account(parts[0]) && parts[1] == "function" {
            (None, Some(parts[0]), &parts[2..])
        } else if parts.len() >= 2 && parts[0] == "function" {
            (None, None, &parts[1..])
        } else {
            (None, None, &parts[..])
        };
    let (name, qualifier) = match rest {
        [name] => (*name, None),
        [name, qualifier] => (*name, Some(*qualifier)),
        _ => return Err(bad()),
    };
    if name.is_empty() || name.len() > 140 || !name.chars().all(is_name_char) {
        return Err(bad());
    }
    if let Some(q) = qualifier {
        Qualifier::parse(q)?;
    }
    if arn_region.is_some_and(|r| r != region) || arn_account.is_some_and(|a| a != account) {
        return Err(ApiError::not_found(format!("Function not found: {raw}")));
    }
    Ok(FunctionRef {
        name: name.to_string(),
        qualifier: qualifier.map(str::to_string),
    })
}

fn is_account(s: &str) -> bool {
    s.len() == 12 && s.chars().all(|c| c.is_ascii_digit())
}

/// Combine a qualifier from the function name with one from `?Qualifier=`.
pub fn merge_qualifier(
    from_name: Option<String>,
    from_query: Option<String>,
) -> Result<Option<String>, ApiError> {
    match (from_name, from_query) {
        (Some(a), Some(b)) if a != b => Err(ApiError::invalid(
            "The derived qualifier from the function name does not match the specified \
             qualifier.",
        )),
        (a, b) => Ok(a.or(b)),
    }
}

pub fn runtime(runtime: &str) -> Result<(), ApiError> {
    if hearth_core::runtimes::lookup(runtime).is_none() {
        return Err(ApiError::invalid(format!(
            "Value {runtime} at 'runtime' failed to satisfy constraint: Member must satisfy \
             enum value set: [{}] or be a valid ARN",
            hearth_core::runtimes::names()
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    Ok(())
}

/// Handler: `[^\s]+`, at most 128 characters.
pub fn handler(handler: &str) -> Result<(), ApiError> {
    if handler.is_empty() || handler.len() > 128 || handler.chars().any(char::is_whitespace) {
        return Err(constraint(
            handler,
            "handler",
            "Member must satisfy regular expression pattern: [^\\s]+ and have length less \
             than or equal to 128",
        ));
    }
    Ok(())
}

/// A role ARN: `arn:aws[...]:iam::<12 digits>:role/<path and name>`. hearth does not assume
/// roles; the value is kept and shown, as Lambda does.
pub fn role(role: &str) -> Result<(), ApiError> {
    let ok = (|| {
        let rest = role.strip_prefix("arn:")?;
        let (partition, rest) = rest.split_once(':')?;
        if !(partition.is_empty() || partition.starts_with("aws")) {
            return None;
        }
        let rest = rest.strip_prefix("iam::")?;
        let (account, rest) = rest.split_once(':')?;
        let name = rest.strip_prefix("role")?;
        let name = name.strip_prefix('/').unwrap_or(name);
        let valid = is_account(account)
            && !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+=,.@-_/".contains(c));
        valid.then_some(())
    })();
    ok.ok_or_else(|| {
        constraint(
            role,
            "role",
            "Member must satisfy regular expression pattern: \
             arn:(aws[a-zA-Z-]*)?:iam::\\d{12}:role/?[a-zA-Z_0-9+=,.@\\-_/]+",
        )
    })
}

pub fn memory_size(mb: i64) -> Result<u32, ApiError> {
    if mb < 128 {
        return Err(constraint(
            mb,
            "memorySize",
            "Member must have value greater than or equal to 128",
        ));
    }
    if mb > 10240 {
        return Err(constraint(
            mb,
            "memorySize",
            "Member must have value less than or equal to 10240",
        ));
    }
    Ok(mb as u32)
}

pub fn timeout(s: i64) -> Result<u32, ApiError> {
    if s < 1 {
        return Err(constraint(
            s,
            "timeout",
            "Member must have value greater than or equal to 1",
        ));
    }
    if s > 900 {
        return Err(constraint(
            s,
            "timeout",
            "Member must have value less than or equal to 900",
        ));
    }
    Ok(s as u32)
}

pub fn description(d: &str) -> Result<(), ApiError> {
    if d.chars().count() > 256 {
        return Err(constraint(
            "...",
            "description",
            "Member must have length less than or equal to 256",
        ));
    }
    Ok(())
}

pub fn ephemeral_storage(mb: i64) -> Result<u32, ApiError> {
    if !(512..=10240).contains(&mb) {
        return Err(constraint(
            mb,
            "ephemeralStorage.size",
            "Member must have value between 512 and 10240",
        ));
    }
    Ok(mb as u32)
}

pub fn snap_start(apply_on: &str) -> Result<(), ApiError> {
    if apply_on != "None" && apply_on != "PublishedVersions" {
        return Err(constraint(
            apply_on,
            "snapStart.applyOn",
            "Member must satisfy enum value set: [PublishedVersions, None]",
        ));
    }
    Ok(())
}

pub fn architectures(archs: &[String]) -> Result<(), ApiError> {
    if archs.len() != 1 || archs[0] != "x86_64" {
        return Err(ApiError::invalid(format!(
            "Unsupported architectures {archs:?}: hearth runs x86_64 only"
        )));
    }
    Ok(())
}

/// Keys `[a-zA-Z][a-zA-Z0-9_]*`, none of Lambda's reserved keys, at most 4 KB serialized.
pub fn environment(vars: &BTreeMap<String, String>) -> Result<(), ApiError> {
    for key in vars.keys() {
        let mut chars = key.chars();
        let valid = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(constraint(
                key,
                "environment.variables",
                "Member must satisfy regular expression pattern: [a-zA-Z]([a-zA-Z0-9_])+",
            ));
        }
    }
    let reserved: Vec<&str> = vars
        .keys()
        .map(String::as_str)
        .filter(|k| RESERVED_ENV.contains(k))
        .collect();
    if !reserved.is_empty() {
        return Err(ApiError::invalid(format!(
            "Lambda was unable to configure your environment variables because the environment \
             variables you have provided contains reserved keys that are currently not \
             supported for modification. Reserved keys used in this request: {}",
            reserved.join(", ")
        )));
    }
    let size = serde_json::to_string(vars)
        .map(|s| s.len())
        .unwrap_or(usize::MAX);
    if size > MAX_ENV_BYTES {
        return Err(ApiError::invalid(format!(
            "Lambda was unable to configure your environment variables because the environment \
             variables you have provided exceeded the 4KB limit. String measured: {size} bytes"
        )));
    }
    Ok(())
}

/// Alias names: 1–128 of `[a-zA-Z0-9-_]`, not all digits (that would be a version).
pub fn alias_name(name: &str) -> Result<(), ApiError> {
    let valid = !name.is_empty()
        && name.len() <= 128
        && name.chars().all(is_name_char)
        && !name.chars().all(|c| c.is_ascii_digit());
    if !valid {
        return Err(constraint(
            name,
            "name",
            "Member must satisfy regular expression pattern: (?!^[0-9]+$)([a-zA-Z0-9-_]+)",
        ));
    }
    Ok(())
}

/// Tags: at most 50, keys 1–128 and values up to 256 characters.
pub fn tags(tags: &BTreeMap<String, String>) -> Result<(), ApiError> {
    if tags.len() > 50 {
        return Err(ApiError::invalid("A function can have at most 50 tags"));
    }
    for (k, v) in tags {
        if k.is_empty() || k.chars().count() > 128 || v.chars().count() > 256 {
            return Err(ApiError::invalid(format!("Invalid tag {k:?}")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const R: &str = "us-east-1";
    const A: &str = "000000000000";

    fn parse(raw: &str) -> Result<FunctionRef, ApiError> {
        function_ref(raw, R, A)
    }

    #[test]
    fn function_refs() {
        let f = |name: &str, q: Option<&str>| FunctionRef {
            name: name.into(),
            qualifier: q.map(Into::into),
        };
        assert_eq!(parse("my-fn").expect("name"), f("my-fn", None));
        assert_eq!(parse("my-fn:3").expect("name:v"), f("my-fn", Some("3")));
        assert_eq!(
            parse("my-fn:$LATEST").expect("latest"),
            f("my-fn", Some("$LATEST"))
        );
        assert_eq!(
            parse("arn:aws:lambda:us-east-1:000000000000:function:my-fn").expect("arn"),
            f("my-fn", None)
        );
        assert_eq!(
            parse("arn:aws:lambda:us-east-1:000000000000:function:my-fn:live").expect("arn"),
            f("my-fn", Some("live"))
        );
        assert_eq!(
            parse("000000000000:function:my-fn:2").expect("partial"),
            f("my-fn", Some("2"))
        );
        for bad in [
            "",
            "a b",
            "a:b:c",
            "arn:aws:lambda:us-east-1",
            "arn:aws:s3:us-east-1:000000000000:function:x",
            "f:a.b",
        ] {
            let e = parse(bad).expect_err(bad);
            assert_eq!(
                e.kind,
                crate::error::ErrorKind::InvalidParameterValue,
                "{bad}"
            );
        }
        let other = parse("arn:aws:lambda:eu-west-1:000000000000:function:x").expect_err("region");
        assert_eq!(other.kind, crate::error::ErrorKind::ResourceNotFound);
        let other = parse("arn:aws:lambda:us-east-1:111111111111:function:x").expect_err("acct");
        assert_eq!(other.kind, crate::error::ErrorKind::ResourceNotFound);
    }

    #[test]
    fn qualifiers() {
        assert_eq!(Qualifier::parse("$LATEST").expect("q"), Qualifier::Latest);
        assert_eq!(Qualifier::parse("12").expect("q"), Qualifier::Version(12));
        assert_eq!(
            Qualifier::parse("live").expect("q"),
            Qualifier::Alias("live".into())
        );
        assert!(Qualifier::parse("a b").is_err());
        assert!(Qualifier::parse("99999999999999999999999").is_err());
        assert!(merge_qualifier(Some("1".into()), Some("2".into())).is_err());
        assert_eq!(
            merge_qualifier(None, Some("2".into())).expect("m"),
            Some("2".into())
        );
    }

    #[test]
    fn rules() {
        assert!(role("arn:aws:iam::123456789012:role/lambda-role").is_ok());
        assert!(role("arn:aws:iam::123456789012:role/path/x+y=z").is_ok());
        assert!(role("lambda-role").is_err());
        assert!(role("arn:aws:iam::12345:role/x").is_err());
        assert!(role("arn:aws:s3:::bucket").is_err());
        assert!(handler("app.handler").is_ok());
        assert!(handler("app handler").is_err());
        assert!(handler("").is_err());
        assert!(memory_size(127).is_err() && memory_size(10241).is_err());
        assert_eq!(memory_size(128).expect("m"), 128);
        assert!(timeout(0).is_err() && timeout(901).is_err() && timeout(900).is_ok());
        assert!(runtime("python3.11").is_ok() && runtime("nodejs20.x").is_err());
        assert!(
            alias_name("live").is_ok() && alias_name("123").is_err() && alias_name("a.b").is_err()
        );
        assert!(architectures(&["x86_64".into()]).is_ok());
        assert!(architectures(&["arm64".into()]).is_err());
        assert!(function_name(&"a".repeat(64)).is_ok());
        assert!(function_name(&"a".repeat(65)).is_err());
    }

    #[test]
    fn environment_rules() {
        let env = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>()
        };
        assert!(environment(&env(&[("A", "1"), ("B_2", "x")])).is_ok());
        assert!(environment(&env(&[("1A", "1")])).is_err());
        assert!(environment(&env(&[("A-B", "1")])).is_err());
        assert!(environment(&env(&[("_A", "1")])).is_err());
        let e = environment(&env(&[("AWS_REGION", "x")])).expect_err("reserved");
        assert!(e.message.contains("AWS_REGION"));
        let big = "x".repeat(5000);
        assert!(environment(&env(&[("BIG", &big)])).is_err());
    }
}
