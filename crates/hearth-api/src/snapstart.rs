//! SnapStart states: a version with `SnapStart.ApplyOn = PublishedVersions` is `Pending` when
//! published, until the worker has booted it, run its init and checkpointed it; then `Active`
//! (cold starts restore the snapshot), or `Failed` with the reason.
//!
//! Every operation that can leave a version `Pending` calls [`AppState::schedule_snapshots`],
//! and so does start-up, so a snapshot interrupted by a crash is made again: nothing that was
//! acknowledged stays `Pending` forever. The state update checks the version's revision, so a
//! late result for an older revision of `$LATEST` never marks a newer one.

use crate::functions::{LATEST, SNAP_START_PUBLISHED};
use crate::invoker::FunctionSpec;
use crate::state::AppState;
use crate::store::{FunctionRecord, VersionRecord};

impl AppState {
    /// Whether this version restores from a snapshot: published versions with SnapStart, and
    /// `$LATEST` too when the server says so.
    pub(crate) fn uses_snapshot(&self, label: &str, v: &VersionRecord) -> bool {
        v.snap_start_apply_on == SNAP_START_PUBLISHED
            && (label != LATEST || self.config().snap_start_latest)
    }

    /// What the worker needs to run one version.
    pub(crate) fn function_spec(&self, name: &str, label: &str, v: &VersionRecord) -> FunctionSpec {
        FunctionSpec {
            name: name.to_string(),
            version: label.to_string(),
            arn: self.config().function_arn(name),
            runtime: v.runtime.clone(),
            handler: v.handler.clone().unwrap_or_default(),
            memory_mb: v.memory_mb,
            timeout_s: v.timeout_s,
            env: v.environment.clone(),
            code_sha256: v.code.sha256_b64.clone(),
            layers: v.layers.iter().map(|l| l.code.sha256_b64.clone()).collect(),
            revision_id: v.revision_id.clone(),
            snap_start: self.uses_snapshot(label, v) && v.state.is_none(),
            ephemeral_storage_mb: v.ephemeral_storage_mb,
            egress: crate::invoker::egress_wanted(&v.environment),
        }
    }

    /// Start preparing every `Pending` version of a function (idempotent: a version already
    /// being prepared is not started twice).
    pub(crate) async fn schedule_snapshots(&self, name: &str) {
        let key = name.to_string();
        let rec = match self.blocking(move |s| Ok(s.store().get(&key)?)).await {
            Ok(Some(rec)) => rec,
            _ => return,
        };
        for (label, v) in pending_versions(&rec) {
            let id = format!("{name}\u{0}{label}\u{0}{}", v.revision_id);
            {
                let mut preparing = self
                    .inner_preparing()
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                if !preparing.insert(id.clone()) {
                    continue;
                }
            }
            let mut spec = self.function_spec(name, &label, &v);
            spec.snap_start = true;
            let state = self.clone();
            let name = name.to_string();
            tokio::spawn(async move {
                tracing::info!(function = %name, version = %label, "preparing snapshot");
                let result = state.invoker().prepare(spec).await;
                if let Err(reason) = &result {
                    tracing::warn!(function = %name, version = %label, "snapshot failed: {reason}");
                }
                let revision = v.revision_id.clone();
                let (key, lbl) = (name.clone(), label.clone());
                let _ = state
                    .blocking(move |s| {
                        Ok(s.store().update(
                            &key,
                            |rec, _| -> Result<(), crate::store::StoreError> {
                                let target = if lbl == LATEST {
                                    Some(&mut rec.latest)
                                } else {
                                    lbl.parse::<u64>()
                                        .ok()
                                        .and_then(|n| rec.versions.get_mut(&n))
                                };
                                if let Some(v) = target
                                    && v.revision_id == revision
                                    && v.state.as_deref() == Some("Pending")
                                {
                                    match &result {
                                        Ok(()) => {
                                            v.state = None;
                                            v.state_reason = None;
                                        }
                                        Err(reason) => {
                                            v.state = Some("Failed".into());
                                            v.state_reason = Some(format!(
                                                "SnapStart snapshot failed: {reason}"
                                            ));
                                        }
                                    }
                                }
                                Ok(())
                            },
                        )?)
                    })
                    .await;
                state
                    .inner_preparing()
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
            });
        }
    }
}

fn pending_versions(rec: &FunctionRecord) -> Vec<(String, VersionRecord)> {
    let mut out = Vec::new();
    if rec.latest.state.as_deref() == Some("Pending") {
        out.push((LATEST.to_string(), rec.latest.clone()));
    }
    for (n, v) in &rec.versions {
        if v.state.as_deref() == Some("Pending") {
            out.push((n.to_string(), v.clone()));
        }
    }
    out
}
