//! The one error type of the HTTP edge, speaking Lambda's error shapes exactly.
//!
//! Every failure a client can see is an [`ApiError`]: an [`ErrorKind`] (Lambda's exception
//! name, which fixes the HTTP status and the `Type` field) and a message. Responses carry the
//! header `X-Amzn-ErrorType: <Name>` (botocore reads the error code from it) and a JSON body
//! `{"Type": "User"|"Service", "message": "..."}`; where botocore's model names the member
//! `Message` (e.g. `ResourceNotFoundException`), the body carries that key too, so the modeled
//! fields boto3 injects into the exception are filled. `TooManyRequestsException` adds a
//! `Retry-After` header and a `Reason`.
//!
//! Internal faults become [`ApiError::internal`]: the detail goes to `tracing`, the caller sees
//! a generic `ServiceException` message. Nothing about files, databases or workers leaks.
//!
//! Statuses follow what Lambda answers for the same condition, not only botocore's model
//! (which lists, say, `InvalidZipFileException` as 502, while Lambda answers a package it
//! cannot unzip with 400 `InvalidParameterValueException`). SDKs retry every 5xx (boto3 up to
//! four more times), so a 5xx is kept for genuine server faults: `ServiceException` (500) and
//! `ResourceNotReadyException` (502, the platform cannot run the function right now).

use std::fmt;

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

/// Lambda's exception names that hearth can return.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    ResourceNotFound,
    InvalidParameterValue,
    InvalidRequestContent,
    RequestTooLarge,
    UnsupportedMediaType,
    TooManyRequests,
    ResourceConflict,
    PreconditionFailed,
    CodeStorageExceeded,
    Service,
    ResourceNotReady,
    /// A presigned URL (a code download) that expired or whose signature does not match.
    AccessDenied,
    /// The request carried no signature at all.
    MissingAuthenticationToken,
    /// The access key is not known.
    UnrecognizedClient,
    /// The signature did not match, or the request time is too far off.
    InvalidSignature,
    /// The `Authorization` header is malformed.
    IncompleteSignature,
    /// No route for this method and path.
    UnknownOperation,
}

impl ErrorKind {
    /// The exception name, as sent in `X-Amzn-ErrorType`.
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::ResourceNotFound => "ResourceNotFoundException",
            ErrorKind::InvalidParameterValue => "InvalidParameterValueException",
            ErrorKind::InvalidRequestContent => "InvalidRequestContentException",
            ErrorKind::RequestTooLarge => "RequestTooLargeException",
            ErrorKind::UnsupportedMediaType => "UnsupportedMediaTypeException",
            ErrorKind::TooManyRequests => "TooManyRequestsException",
            ErrorKind::ResourceConflict => "ResourceConflictException",
            ErrorKind::PreconditionFailed => "PreconditionFailedException",
            ErrorKind::CodeStorageExceeded => "CodeStorageExceededException",
            ErrorKind::Service => "ServiceException",
            ErrorKind::ResourceNotReady => "ResourceNotReadyException",
            ErrorKind::AccessDenied => "AccessDeniedException",
            ErrorKind::MissingAuthenticationToken => "MissingAuthenticationTokenException",
            ErrorKind::UnrecognizedClient => "UnrecognizedClientException",
            ErrorKind::InvalidSignature => "InvalidSignatureException",
            ErrorKind::IncompleteSignature => "IncompleteSignatureException",
            ErrorKind::UnknownOperation => "UnknownOperationException",
        }
    }

    /// The HTTP status (botocore's model, `shared/research/lambda-api.md`).
    pub fn status(self) -> StatusCode {
        match self {
            ErrorKind::ResourceNotFound | ErrorKind::UnknownOperation => StatusCode::NOT_FOUND,
            ErrorKind::InvalidParameterValue
            | ErrorKind::InvalidRequestContent
            | ErrorKind::CodeStorageExceeded
            | ErrorKind::IncompleteSignature => StatusCode::BAD_REQUEST,
            ErrorKind::RequestTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorKind::TooManyRequests => StatusCode::TOO_MANY_REQUESTS,
            ErrorKind::ResourceConflict => StatusCode::CONFLICT,
            ErrorKind::PreconditionFailed => StatusCode::PRECONDITION_FAILED,
            ErrorKind::Service => StatusCode::INTERNAL_SERVER_ERROR,
            ErrorKind::ResourceNotReady => StatusCode::BAD_GATEWAY,
            ErrorKind::AccessDenied
            | ErrorKind::MissingAuthenticationToken
            | ErrorKind::UnrecognizedClient
            | ErrorKind::InvalidSignature => StatusCode::FORBIDDEN,
        }
    }

    /// Lambda's `Type` field: whose fault it is.
    pub fn fault(self) -> &'static str {
        match self {
            ErrorKind::Service | ErrorKind::ResourceNotReady => "Service",
            _ => "User",
        }
    }

    /// Whether botocore's model names the message member `Message` rather than `message`.
    fn capital_message(self) -> bool {
        matches!(self, ErrorKind::ResourceNotFound | ErrorKind::Service)
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A Lambda error, ready to become an HTTP response.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct ApiError {
    pub kind: ErrorKind,
    /// What the caller reads. Never internal detail.
    pub message: String,
    /// `Reason` of a `TooManyRequestsException`.
    pub reason: Option<String>,
    /// `Retry-After` seconds of a `TooManyRequestsException`.
    pub retry_after_s: Option<u32>,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ApiError {
            kind,
            message: message.into(),
            reason: None,
            retry_after_s: None,
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::ResourceNotFound, message)
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidParameterValue, message)
    }

    pub fn bad_content(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidRequestContent, message)
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::ResourceConflict, message)
    }

    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::RequestTooLarge, message)
    }

    /// `PreconditionFailedException` for a `RevisionId` that is not the current one.
    pub fn revision_mismatch() -> Self {
        Self::new(
            ErrorKind::PreconditionFailed,
            "The Revision Id provided does not match the latest Revision Id. Call the \
             GetFunction/GetAlias API to retrieve the latest Revision Id",
        )
    }

    /// `TooManyRequestsException` with Lambda's `Reason` and a `Retry-After` hint.
    pub fn throttled(reason: impl Into<String>, retry_after_s: u32) -> Self {
        ApiError {
            kind: ErrorKind::TooManyRequests,
            message: "Rate Exceeded.".to_string(),
            reason: Some(reason.into()),
            retry_after_s: Some(retry_after_s),
        }
    }

    /// An internal fault: `detail` is logged, the caller gets a generic `ServiceException`.
    pub fn internal(detail: impl fmt::Display) -> Self {
        tracing::error!(error = %detail, "internal error");
        Self::new(
            ErrorKind::Service,
            "An internal error occurred while processing the request. Retry the request.",
        )
    }

    /// The JSON body Lambda sends for this error.
    pub fn body(&self) -> serde_json::Value {
        let mut body = serde_json::Map::new();
        body.insert("Type".into(), self.kind.fault().into());
        body.insert("message".into(), self.message.clone().into());
        if self.kind.capital_message() {
            body.insert("Message".into(), self.message.clone().into());
        }
        if let Some(reason) = &self.reason {
            body.insert("Reason".into(), reason.clone().into());
        }
        serde_json::Value::Object(body)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.kind.status();
        let body = self.body().to_string();
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(
            "x-amzn-errortype",
            HeaderValue::from_static(self.kind.name()),
        );
        headers.insert(
            axum::http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(secs) = self.retry_after_s {
            headers.insert(axum::http::header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

impl From<std::io::Error> for ApiError {
    fn from(e: std::io::Error) -> Self {
        ApiError::internal(e)
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        ApiError::internal(e)
    }
}

/// What Lambda answers for a package it cannot unzip.
pub const UNZIP_MESSAGE: &str =
    "Could not unzip uploaded file. Please check your file, then try to upload again.";

impl From<crate::code::CodeError> for ApiError {
    fn from(e: crate::code::CodeError) -> Self {
        use crate::code::CodeError;
        match e {
            CodeError::TooLarge { .. } => ApiError::too_large(e.to_string()),
            CodeError::UnzippedTooLarge { .. } | CodeError::TooManyEntries { .. } => {
                ApiError::invalid(e.to_string())
            }
            CodeError::Invalid(_) | CodeError::UnsafePath(_) | CodeError::Symlink(_) => {
                // Lambda's one message for every package it will not unpack; the reason is
                // for the server's log.
                tracing::info!(reason = %e, "package rejected");
                ApiError::invalid(UNZIP_MESSAGE)
            }
            CodeError::Io(_) => ApiError::internal(e),
        }
    }
}

impl From<crate::sigv4::SigError> for ApiError {
    fn from(e: crate::sigv4::SigError) -> Self {
        use crate::sigv4::SigError;
        match e {
            SigError::Missing => ApiError::new(
                ErrorKind::MissingAuthenticationToken,
                "Missing Authentication Token",
            ),
            SigError::Incomplete(msg) => ApiError::new(ErrorKind::IncompleteSignature, msg),
            SigError::UnknownAccessKey => ApiError::new(
                ErrorKind::UnrecognizedClient,
                "The security token included in the request is invalid.",
            ),
            SigError::Invalid(msg) => ApiError::new(ErrorKind::InvalidSignature, msg),
            SigError::Mismatch => ApiError::new(
                ErrorKind::InvalidSignature,
                "The request signature we calculated does not match the signature you provided. \
                 Check your AWS Secret Access Key and signing method. Consult the service \
                 documentation for details.",
            ),
            SigError::Unsignable(msg) => ApiError::internal(msg),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn parts(err: ApiError) -> (StatusCode, axum::http::HeaderMap, serde_json::Value) {
        let response = err.into_response();
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .expect("body");
        let json = serde_json::from_slice(&bytes).expect("json body");
        (status, headers, json)
    }

    #[tokio::test]
    async fn not_found_has_lambda_shape() {
        let (status, headers, body) = parts(ApiError::not_found("Function not found: arn:x")).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(headers["x-amzn-errortype"], "ResourceNotFoundException");
        assert_eq!(body["Type"], "User");
        assert_eq!(body["message"], "Function not found: arn:x");
        assert_eq!(body["Message"], "Function not found: arn:x");
    }

    #[tokio::test]
    async fn throttle_carries_retry_after_and_reason() {
        let (status, headers, body) =
            parts(ApiError::throttled("ConcurrentInvocationLimitExceeded", 1)).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(headers["x-amzn-errortype"], "TooManyRequestsException");
        assert_eq!(headers["retry-after"], "1");
        assert_eq!(body["Reason"], "ConcurrentInvocationLimitExceeded");
        assert_eq!(body["Type"], "User");
        assert!(body.get("Message").is_none());
    }

    #[tokio::test]
    async fn internal_errors_do_not_leak() {
        let (status, headers, body) = parts(ApiError::internal(
            "redb: /secret/path/meta.redb is corrupt",
        ))
        .await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(headers["x-amzn-errortype"], "ServiceException");
        assert_eq!(body["Type"], "Service");
        let text = body.to_string();
        assert!(!text.contains("secret"), "{text}");
        assert!(!text.contains("redb"), "{text}");
    }

    /// Issue 7, item 1: a package that cannot be unpacked is the caller's fault (400, which
    /// SDKs do not retry), with Lambda's message; only storage faults are 5xx.
    #[test]
    fn regression_7_1_bad_packages_are_400_invalid_parameter_value() {
        use crate::code::CodeError;
        for e in [
            CodeError::Invalid("not a zip".into()),
            CodeError::UnsafePath("../x".into()),
            CodeError::Symlink("link".into()),
        ] {
            let api = ApiError::from(e);
            assert_eq!(api.kind, ErrorKind::InvalidParameterValue);
            assert_eq!(api.kind.status(), StatusCode::BAD_REQUEST);
            assert_eq!(api.message, UNZIP_MESSAGE);
        }
        let api = ApiError::from(CodeError::TooManyEntries { count: 9, limit: 5 });
        assert_eq!(api.kind.status(), StatusCode::BAD_REQUEST);
        let api = ApiError::from(CodeError::Io(std::io::Error::other("disk full")));
        assert_eq!(api.kind, ErrorKind::Service);
    }

    /// Every kind but a genuine server fault is 4xx: clients retry 5xx.
    #[test]
    fn only_server_faults_are_5xx() {
        use ErrorKind::*;
        let all = [
            ResourceNotFound,
            InvalidParameterValue,
            InvalidRequestContent,
            RequestTooLarge,
            UnsupportedMediaType,
            TooManyRequests,
            ResourceConflict,
            PreconditionFailed,
            CodeStorageExceeded,
            Service,
            ResourceNotReady,
            AccessDenied,
            MissingAuthenticationToken,
            UnrecognizedClient,
            InvalidSignature,
            IncompleteSignature,
            UnknownOperation,
        ];
        for kind in all {
            let server_fault = matches!(kind, Service | ResourceNotReady);
            assert_eq!(kind.status().is_server_error(), server_fault, "{kind}");
            assert_eq!(kind.fault() == "Service", server_fault, "{kind}");
        }
    }

    #[test]
    fn statuses_follow_the_table() {
        assert_eq!(ErrorKind::AccessDenied.status(), StatusCode::FORBIDDEN);
        assert_eq!(
            ErrorKind::ResourceNotReady.status(),
            StatusCode::BAD_GATEWAY
        );
        assert_eq!(
            ErrorKind::RequestTooLarge.status(),
            StatusCode::PAYLOAD_TOO_LARGE
        );
        assert_eq!(ErrorKind::ResourceConflict.status(), StatusCode::CONFLICT);
        assert_eq!(
            ErrorKind::PreconditionFailed.status(),
            StatusCode::PRECONDITION_FAILED
        );
        assert_eq!(ErrorKind::InvalidSignature.status(), StatusCode::FORBIDDEN);
    }
}
