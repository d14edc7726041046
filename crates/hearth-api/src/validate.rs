//! Parameter rules of the Lambda API (botocore's model plus what Lambda enforces server-side),
//! and parsing of function references (`name`, `name:qualifier`, full and partial ARNs).
//!
//! Each check returns `InvalidParameterValueException` with a message in Lambda's wording, so
//! clients that match on messages keep working.

use std::collections::BTreeMap;

use crate::error::ApiError;

/// Environment variables Lambda sets itself; a function may not override them.
pub const RESERVED_ENV: [&str; 18] = [
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
    "LAMBDA_RUNTIME_DIR",
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

// ---- layers ----------------------------------------------------------------------------------

/// Every `Runtime` value of Lambda's API model (botocore's `Runtime` enum): a layer may declare
/// any of them compatible, whether or not hearth runs it.
pub const LAMBDA_RUNTIMES: &[&str] = &[
    "nodejs",
    "nodejs4.3",
    "nodejs6.10",
    "nodejs8.10",
    "nodejs10.x",
    "nodejs12.x",
    "nodejs14.x",
    "nodejs16.x",
    "java8",
    "java8.al2",
    "java11",
    "python2.7",
    "python3.6",
    "python3.7",
    "python3.8",
    "python3.9",
    "dotnetcore1.0",
    "dotnetcore2.0",
    "dotnetcore2.1",
    "dotnetcore3.1",
    "dotnet6",
    "dotnet8",
    "nodejs4.3-edge",
    "go1.x",
    "ruby2.5",
    "ruby2.7",
    "provided",
    "provided.al2",
    "nodejs18.x",
    "python3.10",
    "java17",
    "ruby3.2",
    "ruby3.3",
    "ruby3.4",
    "python3.11",
    "nodejs20.x",
    "provided.al2023",
    "python3.12",
    "java21",
    "python3.13",
    "nodejs22.x",
    "nodejs24.x",
    "python3.14",
    "java25",
    "dotnet10",
    "ruby4.0",
];
/// `Architecture` values.
pub const LAMBDA_ARCHITECTURES: &[&str] = &["x86_64", "arm64"];
/// A function may use at most this many layers.
pub const MAX_LAYERS: usize = 5;
/// Longest layer name, layer ARN and layer version ARN.
const MAX_LAYER_ARN: usize = 140;
const LAYER_VERSION_ARN_PATTERN: &str =
    "arn:[a-zA-Z0-9-]+:lambda:[a-zA-Z0-9-]+:\\d{12}:layer:[a-zA-Z0-9-_]+:[0-9]+";

/// A layer version ARN, taken apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerVersionRef {
    pub region: String,
    pub account: String,
    pub name: String,
    pub version: u64,
}

/// The region, account and name of a layer ARN
/// (`arn:PARTITION:lambda:REGION:ACCOUNT:layer:NAME`); `None` if `s` is not exactly one.
fn layer_arn_parts(s: &str) -> Option<(&str, &str, &str)> {
    let word = |p: &str| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    match s.split(':').collect::<Vec<_>>()[..] {
        ["arn", partition, "lambda", region, account, "layer", name]
            if word(partition)
                && word(region)
                && is_account(account)
                && !name.is_empty()
                && name.chars().all(is_name_char) =>
        {
            Some((region, account, name))
        }
        _ => None,
    }
}

/// A layer version ARN as `Layers` and `GetLayerVersionByArn` take it.
pub fn layer_version_arn(raw: &str, field: &str) -> Result<LayerVersionRef, ApiError> {
    let bad = || {
        constraint(
            raw,
            field,
            &format!("Member must satisfy regular expression pattern: {LAYER_VERSION_ARN_PATTERN}"),
        )
    };
    if raw.is_empty() || raw.len() > MAX_LAYER_ARN {
        return Err(bad());
    }
    let (base, version) = raw.rsplit_once(':').ok_or_else(bad)?;
    let (region, account, name) = layer_arn_parts(base).ok_or_else(bad)?;
    if version.is_empty() || !version.chars().all(|c| c.is_ascii_digit()) {
        return Err(bad());
    }
    let version = version.parse::<u64>().map_err(|_| bad())?;
    Ok(LayerVersionRef {
        region: region.to_string(),
        account: account.to_string(),
        name: name.to_string(),
        version,
    })
}

/// A `LayerName` path parameter: a name or a layer ARN. Returns the name and, for an ARN, its
/// region and account.
pub fn layer_name(raw: &str) -> Result<(String, Option<(String, String)>), ApiError> {
    let bad = || {
        constraint(
            raw,
            "layerName",
            "Member must satisfy regular expression pattern: \
             (arn:[a-zA-Z0-9-]+:lambda:[a-zA-Z0-9-]+:\\d{12}:layer:[a-zA-Z0-9-_]+)|[a-zA-Z0-9-_]+",
        )
    };
    if raw.is_empty() || raw.len() > MAX_LAYER_ARN {
        return Err(bad());
    }
    if raw.chars().all(is_name_char) {
        return Ok((raw.to_string(), None));
    }
    let (region, account, name) = layer_arn_parts(raw).ok_or_else(bad)?;
    Ok((
        name.to_string(),
        Some((region.to_string(), account.to_string())),
    ))
}

/// A `VersionNumber` path parameter.
pub fn layer_version_number(raw: &str) -> Result<u64, ApiError> {
    raw.parse::<u64>()
        .map_err(|_| constraint(raw, "versionNumber", "Member must be a number"))
}

/// `CompatibleRuntimes`: at most 15 of Lambda's runtime names.
pub fn compatible_runtimes(runtimes: &[String]) -> Result<(), ApiError> {
    if runtimes.len() > 15 {
        return Err(constraint(
            format!("{runtimes:?}"),
            "compatibleRuntimes",
            "Member must have length less than or equal to 15",
        ));
    }
    for r in runtimes {
        compatible_runtime(r, "compatibleRuntimes")?;
    }
    Ok(())
}

/// One runtime name of Lambda's model (a `CompatibleRuntime` filter or list member).
pub fn compatible_runtime(runtime: &str, field: &str) -> Result<(), ApiError> {
    if LAMBDA_RUNTIMES.contains(&runtime) {
        return Ok(());
    }
    Err(constraint(
        runtime,
        field,
        &format!(
            "Member must satisfy enum value set: [{}]",
            LAMBDA_RUNTIMES.join(", ")
        ),
    ))
}

/// `CompatibleArchitectures`: at most 2 of `x86_64`, `arm64`.
pub fn compatible_architectures(archs: &[String]) -> Result<(), ApiError> {
    if archs.len() > 2 {
        return Err(constraint(
            format!("{archs:?}"),
            "compatibleArchitectures",
            "Member must have length less than or equal to 2",
        ));
    }
    for a in archs {
        compatible_architecture(a, "compatibleArchitectures")?;
    }
    Ok(())
}

/// One architecture name of Lambda's model.
pub fn compatible_architecture(arch: &str, field: &str) -> Result<(), ApiError> {
    if LAMBDA_ARCHITECTURES.contains(&arch) {
        return Ok(());
    }
    Err(constraint(
        arch,
        field,
        "Member must satisfy enum value set: [x86_64, arm64]",
    ))
}

/// `LicenseInfo`: at most 512 characters.
pub fn license_info(info: &str) -> Result<(), ApiError> {
    if info.chars().count() > 512 {
        return Err(constraint(
            info,
            "licenseInfo",
            "Member must have length less than or equal to 512",
        ));
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
    fn layer_arns_and_names() {
        let v = layer_version_arn(
            "arn:aws:lambda:us-east-1:000000000000:layer:my-lib_2:7",
            "layers",
        )
        .expect("valid");
        assert_eq!(
            v,
            LayerVersionRef {
                region: "us-east-1".into(),
                account: "000000000000".into(),
                name: "my-lib_2".into(),
                version: 7,
            }
        );
        for bad in [
            "",
            "arn:aws:lambda:us-east-1:000000000000:layer:x",
            "arn:aws:lambda:us-east-1:000000000000:layer:x:",
            "arn:aws:lambda:us-east-1:000000000000:layer:x:1a",
            "arn:aws:lambda:us-east-1:00000000000:layer:x:1",
            "arn:aws:lambda:us-east-1:000000000000:function:x:1",
            "arn:aws:s3:us-east-1:000000000000:layer:x:1",
            "arn:aws:lambda:us-east-1:000000000000:layer:a.b:1",
            "arn:aws:lambda:us-east-1:000000000000:layer:x:1:2",
            "x:1",
        ] {
            let e = layer_version_arn(bad, "layers").expect_err(bad);
            assert!(e.message.contains("'layers'"), "{bad}: {}", e.message);
        }
        let long = format!(
            "arn:aws:lambda:us-east-1:000000000000:layer:{}:1",
            "n".repeat(140)
        );
        assert!(layer_version_arn(&long, "layers").is_err());
        assert_eq!(layer_name("lib").expect("name"), ("lib".to_string(), None));
        assert_eq!(
            layer_name("arn:aws:lambda:eu-west-1:111111111111:layer:lib").expect("arn"),
            (
                "lib".to_string(),
                Some(("eu-west-1".to_string(), "111111111111".to_string()))
            )
        );
        for bad in [
            "",
            "a.b",
            "arn:aws:lambda:eu-west-1:111111111111:layer:lib:1",
        ] {
            assert!(layer_name(bad).is_err(), "{bad}");
        }
        assert_eq!(layer_version_number("12").expect("n"), 12);
        assert!(layer_version_number("x").is_err() && layer_version_number("-1").is_err());
    }

    #[test]
    fn layer_metadata_rules() {
        let v = |xs: &[&str]| xs.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert!(compatible_runtimes(&v(&["python3.11", "nodejs20.x", "java21"])).is_ok());
        assert!(compatible_runtimes(&v(&["python9"])).is_err());
        assert!(compatible_runtimes(&vec!["python3.11".to_string(); 16]).is_err());
        assert!(compatible_architectures(&v(&["x86_64", "arm64"])).is_ok());
        assert!(compatible_architectures(&v(&["sparc"])).is_err());
        assert!(compatible_architectures(&v(&["x86_64", "arm64", "x86_64"])).is_err());
        assert!(license_info(&"l".repeat(512)).is_ok());
        assert!(license_info(&"l".repeat(513)).is_err());
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
        let e = environment(&env(&[("LAMBDA_RUNTIME_DIR", "/x")])).expect_err("reserved");
        assert!(e.message.contains("LAMBDA_RUNTIME_DIR"));
        // Lambda's defaults a function may replace.
        assert!(
            environment(&env(&[
                ("TZ", "Europe/Paris"),
                ("PATH", "/bin"),
                ("LANG", "C")
            ]))
            .is_ok()
        );
        let big = "x".repeat(5000);
        assert!(environment(&env(&[("BIG", &big)])).is_err());
    }
}
