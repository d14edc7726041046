//! Event-invoke configuration (`Put/Update/Get/Delete/ListFunctionEventInvokeConfig(s)`) and
//! where records of finished events may go.
//!
//! A configuration belongs to a function and a qualifier (`$LATEST` when none is given, a
//! version, or an alias) and is kept in the function's record, so it goes with the function.
//! Destinations hearth delivers to:
//! - a Lambda function of this account and region (`arn:aws:lambda:…:function:NAME[:QUALIFIER]`),
//!   invoked asynchronously with Lambda's destination record;
//! - for `OnFailure` and `DeadLetterConfig`, an SQS queue ARN (`arn:aws:sqs:…:QUEUE`): hearth
//!   has no SQS, so such a queue names a queue of hearth's failed-events store, where every
//!   event that fails for good is kept anyway (`hearth events`).
//!
//! Anything else (SNS, EventBridge, S3, an SQS `OnSuccess`) is refused, never stored and
//! ignored.

use serde::{Deserialize, Serialize};

use crate::error::ApiError;

/// Lambda's default `MaximumRetryAttempts`.
pub const DEFAULT_RETRIES: u32 = 2;
/// Lambda's default (and largest) `MaximumEventAgeInSeconds`: six hours.
pub const DEFAULT_MAX_AGE_S: u32 = 21_600;

/// What is stored for one qualifier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventInvokeRecord {
    pub max_retries: Option<u32>,
    pub max_age_s: Option<u32>,
    pub on_success: Option<String>,
    pub on_failure: Option<String>,
    /// Seconds since the epoch.
    pub last_modified: f64,
}

/// The settings an event runs under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Effective {
    pub max_retries: u32,
    pub max_age_s: u32,
    pub on_success: Option<Destination>,
    pub on_failure: Option<Destination>,
    pub dead_letter: Option<Destination>,
}

impl Effective {
    pub fn new(config: Option<&EventInvokeRecord>, dead_letter: Option<&str>) -> Effective {
        let parse = |arn: Option<&String>| arn.and_then(|a| Destination::parse_stored(a));
        Effective {
            max_retries: config
                .and_then(|c| c.max_retries)
                .unwrap_or(DEFAULT_RETRIES),
            max_age_s: config
                .and_then(|c| c.max_age_s)
                .unwrap_or(DEFAULT_MAX_AGE_S),
            on_success: parse(config.and_then(|c| c.on_success.as_ref())),
            on_failure: parse(config.and_then(|c| c.on_failure.as_ref())),
            dead_letter: dead_letter.and_then(Destination::parse_stored),
        }
    }
}

/// A place a record goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    Function {
        arn: String,
        name: String,
        qualifier: Option<String>,
    },
    Queue {
        arn: String,
        name: String,
    },
}

impl Destination {
    pub fn arn(&self) -> &str {
        match self {
            Destination::Function { arn, .. } | Destination::Queue { arn, .. } => arn,
        }
    }

    /// What a stored ARN names (it was validated when stored).
    fn parse_stored(arn: &str) -> Option<Destination> {
        let parts: Vec<&str> = arn.split(':').collect();
        match parts.as_slice() {
            ["arn", _, "lambda", _, _, "function", name] => Some(Destination::Function {
                arn: arn.to_string(),
                name: name.to_string(),
                qualifier: None,
            }),
            ["arn", _, "lambda", _, _, "function", name, q] => Some(Destination::Function {
                arn: arn.to_string(),
                name: name.to_string(),
                qualifier: Some(q.to_string()),
            }),
            ["arn", _, "sqs", _, _, name] => Some(Destination::Queue {
                arn: arn.to_string(),
                name: name.to_string(),
            }),
            _ => None,
        }
    }
}

/// Which setting a destination is for (they accept different kinds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    OnSuccess,
    OnFailure,
    DeadLetter,
}

impl Slot {
    fn field(self) -> &'static str {
        match self {
            Slot::OnSuccess => "DestinationConfig.OnSuccess.Destination",
            Slot::OnFailure => "DestinationConfig.OnFailure.Destination",
            Slot::DeadLetter => "DeadLetterConfig.TargetArn",
        }
    }
}

/// Check a destination ARN for `slot` against this account and region.
pub fn validate_destination(
    arn: &str,
    slot: Slot,
    region: &str,
    account: &str,
) -> Result<Destination, ApiError> {
    let field = slot.field();
    let bad = |why: String| ApiError::invalid(format!("{field} {arn:?}: {why}"));
    if arn.len() > 350 {
        return Err(bad("is longer than 350 characters".into()));
    }
    let parts: Vec<&str> = arn.split(':').collect();
    if parts.len() < 6 || parts[0] != "arn" || !parts[1].starts_with("aws") {
        return Err(bad("is not an ARN".into()));
    }
    let (service, arn_region, arn_account) = (parts[2], parts[3], parts[4]);
    let dest = Destination::parse_stored(arn);
    match (service, &dest) {
        ("lambda", Some(Destination::Function { .. })) if slot == Slot::DeadLetter => {
            return Err(bad(
                "a dead-letter queue is an SQS queue ARN (a queue of hearth's failed-events \
                 store); send failure records to a function with DestinationConfig.OnFailure"
                    .into(),
            ));
        }
        (
            "lambda",
            Some(Destination::Function {
                name, qualifier, ..
            }),
        ) => {
            crate::validate::function_name(name).map_err(|e| bad(e.message))?;
            if let Some(q) = qualifier {
                crate::validate::Qualifier::parse(q).map_err(|e| bad(e.message))?;
            }
        }
        ("lambda", _) => return Err(bad("is not a function ARN".into())),
        ("sqs", Some(Destination::Queue { name, .. })) if slot != Slot::OnSuccess => {
            let ok = !name.is_empty()
                && name.len() <= 80
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            if !ok {
                return Err(bad("is not a valid queue name".into()));
            }
        }
        ("sqs", _) => {
            return Err(bad(
                "hearth delivers OnSuccess records to Lambda functions only (every failed \
                 event is kept in hearth's failed-events store; an SQS ARN names a queue there \
                 for OnFailure and DeadLetterConfig)"
                    .into(),
            ));
        }
        (other, _) => {
            return Err(bad(format!(
                "hearth cannot deliver to {other}: use a Lambda function ARN{}",
                if slot == Slot::OnSuccess {
                    ""
                } else {
                    " or an SQS queue ARN (a queue of hearth's failed-events store)"
                }
            )));
        }
    }
    if arn_region != region || arn_account != account {
        return Err(bad(format!(
            "must be in this account ({account}) and region ({region})"
        )));
    }
    dest.ok_or_else(|| bad("is not a destination hearth knows".into()))
}

/// `MaximumRetryAttempts`, with Lambda's message.
pub fn validate_retries(n: i64) -> Result<u32, ApiError> {
    if !(0..=2).contains(&n) {
        let constraint = if n < 0 {
            "greater than or equal to 0"
        } else {
            "less than or equal to 2"
        };
        return Err(ApiError::invalid(format!(
            "1 validation error detected: Value '{n}' at 'maximumRetryAttempts' failed to \
             satisfy constraint: Member must have value {constraint}"
        )));
    }
    Ok(n as u32)
}

/// `MaximumEventAgeInSeconds`, with Lambda's message.
pub fn validate_max_age(n: i64) -> Result<u32, ApiError> {
    if !(60..=21_600).contains(&n) {
        let constraint = if n < 60 {
            "greater than or equal to 60"
        } else {
            "less than or equal to 21600"
        };
        return Err(ApiError::invalid(format!(
            "1 validation error detected: Value '{n}' at 'maximumEventAgeInSeconds' failed to \
             satisfy constraint: Member must have value {constraint}"
        )));
    }
    Ok(n as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    const R: &str = "us-east-1";
    const A: &str = "000000000000";

    #[test]
    fn destinations_hearth_can_deliver_to_are_accepted() {
        let f = validate_destination(
            "arn:aws:lambda:us-east-1:000000000000:function:sink",
            Slot::OnSuccess,
            R,
            A,
        )
        .expect("function");
        assert!(
            matches!(f, Destination::Function { ref name, qualifier: None, .. } if name == "sink")
        );
        let q = validate_destination(
            "arn:aws:lambda:us-east-1:000000000000:function:sink:live",
            Slot::OnFailure,
            R,
            A,
        )
        .expect("qualified");
        assert!(matches!(q, Destination::Function { qualifier: Some(ref q), .. } if q == "live"));
        let dlq = validate_destination(
            "arn:aws:sqs:us-east-1:000000000000:my-dlq",
            Slot::DeadLetter,
            R,
            A,
        )
        .expect("queue");
        assert!(matches!(dlq, Destination::Queue { ref name, .. } if name == "my-dlq"));
    }

    #[test]
    fn destinations_hearth_cannot_deliver_to_are_refused_with_the_reason() {
        let cases = [
            (
                "arn:aws:sqs:us-east-1:000000000000:q",
                Slot::OnSuccess,
                "OnSuccess records to Lambda functions only",
            ),
            (
                "arn:aws:sns:us-east-1:000000000000:t",
                Slot::OnFailure,
                "cannot deliver to sns",
            ),
            (
                "arn:aws:events:us-east-1:000000000000:event-bus/b",
                Slot::OnSuccess,
                "cannot deliver to events",
            ),
            (
                "arn:aws:lambda:eu-west-1:000000000000:function:f",
                Slot::OnSuccess,
                "this account",
            ),
            (
                "arn:aws:lambda:us-east-1:111111111111:function:f",
                Slot::OnSuccess,
                "this account",
            ),
            (
                "arn:aws:lambda:us-east-1:000000000000:layer:l:1",
                Slot::OnSuccess,
                "not a function ARN",
            ),
            ("not-an-arn", Slot::DeadLetter, "not an ARN"),
            (
                "arn:aws:sqs:us-east-1:000000000000:bad/name",
                Slot::DeadLetter,
                "not a valid queue",
            ),
        ];
        for (arn, slot, want) in cases {
            let e = validate_destination(arn, slot, R, A).expect_err(arn);
            assert_eq!(e.kind, crate::error::ErrorKind::InvalidParameterValue);
            assert!(e.message.contains(want), "{arn}: {}", e.message);
        }
    }

    #[test]
    fn limits_have_lambdas_bounds_and_messages() {
        assert_eq!(validate_retries(0).expect("0"), 0);
        assert_eq!(validate_retries(2).expect("2"), 2);
        assert!(
            validate_retries(3)
                .expect_err("3")
                .message
                .contains("less than or equal to 2")
        );
        assert!(validate_retries(-1).is_err());
        assert_eq!(validate_max_age(60).expect("60"), 60);
        assert_eq!(validate_max_age(21_600).expect("max"), 21_600);
        assert!(validate_max_age(59).is_err());
        assert!(
            validate_max_age(21_601)
                .expect_err("big")
                .message
                .contains("less than or equal to 21600")
        );
    }

    #[test]
    fn effective_settings_default_to_lambdas() {
        let e = Effective::new(None, None);
        assert_eq!((e.max_retries, e.max_age_s), (2, 21_600));
        assert!(e.on_success.is_none() && e.on_failure.is_none() && e.dead_letter.is_none());
        let rec = EventInvokeRecord {
            max_retries: Some(0),
            max_age_s: None,
            on_success: Some("arn:aws:lambda:us-east-1:000000000000:function:s".into()),
            on_failure: None,
            last_modified: 0.0,
        };
        let e = Effective::new(Some(&rec), Some("arn:aws:sqs:us-east-1:000000000000:d"));
        assert_eq!((e.max_retries, e.max_age_s), (0, 21_600));
        assert!(matches!(e.on_success, Some(Destination::Function { .. })));
        assert!(matches!(e.dead_letter, Some(Destination::Queue { .. })));
    }
}
