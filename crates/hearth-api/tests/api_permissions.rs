//! AddPermission, GetPolicy and RemovePermission: statements kept per qualifier in Lambda's
//! shapes (hearth stores them; it has one account, so it does not evaluate them).
mod common;

use common::*;
use serde_json::{Value, json};

fn policy_path(name: &str) -> String {
    format!("{}/policy", fpath(name))
}

fn statements(resp: &Resp) -> Vec<Value> {
    let text = resp.json()["Policy"]
        .as_str()
        .expect("Policy is JSON text")
        .to_string();
    let policy: Value = serde_json::from_str(&text).expect("policy json");
    assert_eq!(policy["Version"], "2012-10-17");
    policy["Statement"].as_array().cloned().expect("statements")
}

#[tokio::test]
async fn function_url_public_access_statement() {
    let api = Api::new().await;
    api.create("f", json!({})).await.assert_status(201);
    api.get(&policy_path("f"))
        .await
        .assert_error(404, "ResourceNotFoundException");

    let r = api
        .post(
            &policy_path("f"),
            json!({
                "StatementId": "FunctionURLAllowPublicAccess",
                "Action": "lambda:InvokeFunctionUrl",
                "Principal": "*",
                "FunctionUrlAuthType": "NONE",
            }),
        )
        .await;
    r.assert_status(201);
    let statement: Value =
        serde_json::from_str(r.json()["Statement"].as_str().expect("text")).expect("json");
    assert_eq!(
        statement,
        json!({
            "Sid": "FunctionURLAllowPublicAccess",
            "Effect": "Allow",
            "Principal": "*",
            "Action": "lambda:InvokeFunctionUrl",
            "Resource": format!("{ARN_PREFIX}f"),
            "Condition": {"StringEquals": {"lambda:FunctionUrlAuthType": "NONE"}},
        })
    );
    // The same id again: a conflict.
    api.post(
        &policy_path("f"),
        json!({"StatementId": "FunctionURLAllowPublicAccess", "Action": "lambda:InvokeFunction", "Principal": "*"}),
    )
    .await
    .assert_error(409, "ResourceConflictException");
    api.post(
        &policy_path("f"),
        json!({
            "StatementId": "s3",
            "Action": "lambda:InvokeFunction",
            "Principal": "s3.amazonaws.com",
            "SourceArn": "arn:aws:s3:::bucket",
            "SourceAccount": "123456789012",
        }),
    )
    .await
    .assert_status(201);

    let g = api.get(&policy_path("f")).await;
    g.assert_status(200);
    assert!(g.json()["RevisionId"].is_string());
    let st = statements(&g);
    let sids: Vec<&str> = st.iter().filter_map(|s| s["Sid"].as_str()).collect();
    assert_eq!(sids, ["FunctionURLAllowPublicAccess", "s3"]);
    assert_eq!(st[1]["Principal"], json!({"Service": "s3.amazonaws.com"}));
    assert_eq!(
        st[1]["Condition"],
        json!({
            "ArnLike": {"AWS:SourceArn": "arn:aws:s3:::bucket"},
            "StringEquals": {"AWS:SourceAccount": "123456789012"},
        })
    );

    api.delete(&format!(
        "{}/FunctionURLAllowPublicAccess",
        policy_path("f")
    ))
    .await
    .assert_status(204);
    api.delete(&format!(
        "{}/FunctionURLAllowPublicAccess",
        policy_path("f")
    ))
    .await
    .assert_error(404, "ResourceNotFoundException");
    let sids: Vec<Value> = statements(&api.get(&policy_path("f")).await)
        .into_iter()
        .map(|s| s["Sid"].clone())
        .collect();
    assert_eq!(sids, [json!("s3")]);
    api.delete(&format!("{}/s3", policy_path("f")))
        .await
        .assert_status(204);
    api.get(&policy_path("f"))
        .await
        .assert_error(404, "ResourceNotFoundException");
}

#[tokio::test]
async fn permission_validation_and_qualifiers() {
    let api = Api::new().await;
    api.post(
        &policy_path("missing"),
        json!({"StatementId": "a", "Action": "lambda:InvokeFunction", "Principal": "*"}),
    )
    .await
    .assert_error(404, "ResourceNotFoundException");
    api.create("f", json!({})).await.assert_status(201);
    for bad in [
        json!({"Action": "lambda:InvokeFunction", "Principal": "*"}),
        json!({"StatementId": "a b", "Action": "lambda:InvokeFunction", "Principal": "*"}),
        json!({"StatementId": "a", "Action": "s3:GetObject", "Principal": "*"}),
        json!({"StatementId": "a", "Action": "lambda:InvokeFunction"}),
        json!({"StatementId": "a", "Action": "lambda:InvokeFunctionUrl", "Principal": "*", "FunctionUrlAuthType": "OPEN"}),
    ] {
        api.post(&policy_path("f"), bad)
            .await
            .assert_error(400, "InvalidParameterValueException");
    }
    api.post(
        &format!("{}?Qualifier=live", policy_path("f")),
        json!({"StatementId": "a", "Action": "lambda:InvokeFunction", "Principal": "*"}),
    )
    .await
    .assert_error(404, "ResourceNotFoundException");
    api.post(
        &policy_path("f"),
        json!({"StatementId": "a", "Action": "lambda:InvokeFunction", "Principal": "*", "RevisionId": "stale"}),
    )
    .await
    .assert_error(412, "PreconditionFailedException");

    // An alias's policy is its own and goes with the alias.
    api.publish("f").await;
    api.alias("f", "live", "1").await;
    let r = api
        .post(
            &format!("{}?Qualifier=live", policy_path("f")),
            json!({"StatementId": "a", "Action": "lambda:InvokeFunction", "Principal": "123456789012"}),
        )
        .await;
    r.assert_status(201);
    let st: Value =
        serde_json::from_str(r.json()["Statement"].as_str().expect("text")).expect("json");
    assert_eq!(st["Resource"], format!("{ARN_PREFIX}f:live"));
    assert_eq!(
        st["Principal"],
        json!({"AWS": "arn:aws:iam::123456789012:root"})
    );
    api.get(&policy_path("f"))
        .await
        .assert_error(404, "ResourceNotFoundException");
    api.delete(&format!("{}/aliases/live", fpath("f")))
        .await
        .assert_status(204);
    api.alias("f", "live", "1").await;
    api.get(&format!("{}?Qualifier=live", policy_path("f")))
        .await
        .assert_error(404, "ResourceNotFoundException");
}
