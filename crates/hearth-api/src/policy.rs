//! A function's resource-based policy: `AddPermission`, `RemovePermission`, `GetPolicy`.
//!
//! Kept so that the calls boto3 users, SAM, CDK and Terraform make when they set a function
//! up work unchanged (most often the statement that opens a `NONE` function URL to everyone:
//! `Action: lambda:InvokeFunctionUrl, Principal: *, FunctionUrlAuthType: NONE`). The statements
//! are stored and returned in Lambda's shapes, per qualifier, but hearth does not evaluate
//! them: it has a single account and one set of credentials, so there is no other principal a
//! statement could admit or keep out. A `NONE` URL is public without a statement; an `AWS_IAM`
//! URL and the Lambda API need hearth's credentials with or without one.

use serde::Deserialize;
use serde_json::{Value, json};

use crate::error::{ApiError, ErrorKind};
use crate::state::AppState;
use crate::store::FunctionRecord;
use crate::validate::Qualifier;

/// The key of the unqualified function's policy in [`FunctionRecord::policy`].
const UNQUALIFIED: &str = "$LATEST";

/// `AddPermission`'s body.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct AddPermissionIn {
    pub statement_id: Option<String>,
    pub action: Option<String>,
    pub principal: Option<String>,
    pub source_arn: Option<String>,
    pub source_account: Option<String>,
    pub event_source_token: Option<String>,
    pub revision_id: Option<String>,
    #[serde(rename = "PrincipalOrgID")]
    pub principal_org_id: Option<String>,
    pub function_url_auth_type: Option<String>,
    pub invoked_via_function_url: Option<bool>,
}

fn required<'a>(field: &str, v: &'a Option<String>) -> Result<&'a str, ApiError> {
    v.as_deref().ok_or_else(|| {
        ApiError::invalid(format!(
            "1 validation error detected: Value null at '{field}' failed to satisfy constraint: \
             Member must not be null"
        ))
    })
}

fn statement_id(sid: &str) -> Result<(), ApiError> {
    let ok = !sid.is_empty()
        && sid.len() <= 100
        && sid
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(format!(
            "1 validation error detected: Value '{sid}' at 'statementId' failed to satisfy \
             constraint: Member must satisfy regular expression pattern: ([a-zA-Z0-9-_]+)"
        )))
    }
}

/// `lambda:*`, `lambda:<Operation>` or `*`.
fn action(a: &str) -> Result<(), ApiError> {
    let ok = a == "*"
        || a.strip_prefix("lambda:").is_some_and(|op| {
            op == "*" || (!op.is_empty() && op.chars().all(|c| c.is_ascii_alphabetic()))
        });
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(format!(
            "1 validation error detected: Value '{a}' at 'action' failed to satisfy \
             constraint: Member must satisfy regular expression pattern: \
             (lambda:[*]|lambda:[a-zA-Z]+|[*])"
        )))
    }
}

/// The `Principal` of a statement, as Lambda writes it.
fn principal(p: &str) -> Result<Value, ApiError> {
    if p.is_empty() || p.chars().any(char::is_whitespace) {
        return Err(ApiError::invalid(format!(
            "1 validation error detected: Value '{p}' at 'principal' failed to satisfy \
             constraint: Member must satisfy regular expression pattern: [^\\s]+"
        )));
    }
    Ok(if p == "*" {
        json!("*")
    } else if p.len() == 12 && p.chars().all(|c| c.is_ascii_digit()) {
        json!({ "AWS": format!("arn:aws:iam::{p}:root") })
    } else if p.starts_with("arn:") {
        json!({ "AWS": p })
    } else {
        json!({ "Service": p })
    })
}

/// The function and the qualifier key a request names.
fn target(
    state: &AppState,
    function: &str,
    query: Option<String>,
) -> Result<(String, String), ApiError> {
    state.name_and_qualifier(function, query, UNQUALIFIED)
}

/// The qualifier must exist; returns its revision id.
fn revision(state: &AppState, rec: &FunctionRecord, key: &str) -> Result<String, ApiError> {
    let found = match Qualifier::parse(key)? {
        Qualifier::Latest => Some(rec.latest.revision_id.clone()),
        Qualifier::Version(n) => rec.versions.get(&n).map(|v| v.revision_id.clone()),
        Qualifier::Alias(a) => rec.aliases.get(&a).map(|a| a.revision_id.clone()),
    };
    let q = (key != UNQUALIFIED).then_some(key);
    found.ok_or_else(|| state.function_not_found(&rec.name, q))
}

fn resource_arn(state: &AppState, name: &str, key: &str) -> String {
    let c = state.config();
    if key == UNQUALIFIED {
        c.function_arn(name)
    } else {
        c.qualified_arn(name, key)
    }
}

/// `AddPermission`: returns the statement as JSON text (`Statement`).
pub async fn add(
    state: &AppState,
    function: &str,
    qualifier: Option<String>,
    req: AddPermissionIn,
) -> Result<String, ApiError> {
    let (name, key) = target(state, function, qualifier)?;
    let sid = required("statementId", &req.statement_id)?.to_string();
    statement_id(&sid)?;
    let act = required("action", &req.action)?.to_string();
    action(&act)?;
    let who = principal(required("principal", &req.principal)?)?;
    let mut conditions = serde_json::Map::new();
    let mut condition = |op: &str, key: &str, value: Value| {
        let entry = conditions
            .entry(op.to_string())
            .or_insert_with(|| json!({}));
        entry[key] = value;
    };
    if let Some(arn) = &req.source_arn {
        condition("ArnLike", "AWS:SourceArn", json!(arn));
    }
    if let Some(account) = &req.source_account {
        condition("StringEquals", "AWS:SourceAccount", json!(account));
    }
    if let Some(org) = &req.principal_org_id {
        condition("StringEquals", "aws:PrincipalOrgID", json!(org));
    }
    if let Some(token) = &req.event_source_token {
        condition("StringEquals", "lambda:EventSourceToken", json!(token));
    }
    if let Some(auth) = &req.function_url_auth_type {
        if auth != "NONE" && auth != "AWS_IAM" {
            return Err(ApiError::invalid(format!(
                "1 validation error detected: Value '{auth}' at 'functionUrlAuthType' failed to \
                 satisfy constraint: Member must satisfy enum value set: [NONE, AWS_IAM]"
            )));
        }
        condition("StringEquals", "lambda:FunctionUrlAuthType", json!(auth));
    }
    if req.invoked_via_function_url == Some(true) {
        condition("Bool", "lambda:InvokedViaFunctionUrl", json!("true"));
    }
    let (k, st) = (key.clone(), state.clone());
    let saved = state
        .blocking(move |s| {
            s.store().update(&name, |rec, _| {
                let current = revision(&st, rec, &k)?;
                if req.revision_id.as_deref().is_some_and(|r| r != current) {
                    return Err(ApiError::revision_mismatch());
                }
                let statements = rec.policy.entry(k.clone()).or_default();
                if statements.iter().any(|s| s["Sid"] == sid.as_str()) {
                    return Err(ApiError::new(
                        ErrorKind::ResourceConflict,
                        format!(
                            "The statement id ({sid}) provided already exists. Please provide a \
                             new statement id, or remove the existing statement."
                        ),
                    ));
                }
                let mut statement = json!({
                    "Sid": sid,
                    "Effect": "Allow",
                    "Principal": who,
                    "Action": act,
                    "Resource": resource_arn(&st, &rec.name, &k),
                });
                if !conditions.is_empty() {
                    statement["Condition"] = Value::Object(conditions);
                }
                statements.push(statement.clone());
                Ok(statement)
            })
        })
        .await?;
    match saved {
        Some(statement) => Ok(statement.to_string()),
        None => Err(state.function_not_found(&state.parse_ref(function)?.name, None)),
    }
}

/// `RemovePermission`.
pub async fn remove(
    state: &AppState,
    function: &str,
    sid: &str,
    qualifier: Option<String>,
    revision_id: Option<String>,
) -> Result<(), ApiError> {
    let (name, key) = target(state, function, qualifier)?;
    statement_id(sid)?;
    let (k, st, sid) = (key, state.clone(), sid.to_string());
    let done = state
        .blocking(move |s| {
            s.store().update(&name, |rec, _| {
                let current = revision(&st, rec, &k)?;
                if revision_id.as_deref().is_some_and(|r| r != current) {
                    return Err(ApiError::revision_mismatch());
                }
                let Some(statements) = rec.policy.get_mut(&k) else {
                    return Err(ApiError::not_found(
                        "No policy is associated with the given resource.",
                    ));
                };
                let before = statements.len();
                statements.retain(|s| s["Sid"] != sid.as_str());
                if statements.len() == before {
                    return Err(ApiError::not_found(format!(
                        "Statement {sid} is not found in resource policy."
                    )));
                }
                if statements.is_empty() {
                    rec.policy.remove(&k);
                }
                Ok(())
            })
        })
        .await?;
    match done {
        Some(()) => Ok(()),
        None => Err(state.function_not_found(&state.parse_ref(function)?.name, None)),
    }
}

/// `GetPolicy`: (`Policy` as JSON text, `RevisionId`).
pub async fn get(
    state: &AppState,
    function: &str,
    qualifier: Option<String>,
) -> Result<Value, ApiError> {
    let (name, key) = target(state, function, qualifier)?;
    let rec = state.load(&name).await?;
    let revision_id = revision(state, &rec, &key)?;
    let statements = rec
        .policy
        .get(&key)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| ApiError::not_found("The resource you requested does not exist."))?;
    let policy = json!({
        "Version": "2012-10-17",
        "Id": "default",
        "Statement": statements,
    });
    Ok(json!({ "Policy": policy.to_string(), "RevisionId": revision_id }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn principals_as_lambda_writes_them() {
        assert_eq!(principal("*").expect("ok"), json!("*"));
        assert_eq!(
            principal("123456789012").expect("ok"),
            json!({"AWS": "arn:aws:iam::123456789012:root"})
        );
        assert_eq!(
            principal("s3.amazonaws.com").expect("ok"),
            json!({"Service": "s3.amazonaws.com"})
        );
        assert!(principal("a b").is_err());
    }

    #[test]
    fn actions_and_statement_ids() {
        for ok in ["*", "lambda:*", "lambda:InvokeFunctionUrl"] {
            assert!(action(ok).is_ok(), "{ok}");
        }
        for bad in ["s3:GetObject", "lambda:", "lambda:Invoke-Function"] {
            assert!(action(bad).is_err(), "{bad}");
        }
        assert!(statement_id("FunctionURLAllowPublicAccess").is_ok());
        assert!(statement_id("has space").is_err());
        assert!(statement_id(&"x".repeat(101)).is_err());
    }
}
