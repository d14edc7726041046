//! The control-plane operations: functions, versions, aliases, concurrency, account settings.
//!
//! Each operation takes plain values (a function reference as the caller wrote it, a parsed
//! request body, query values) and returns a wire response or an [`ApiError`]; nothing here
//! sees HTTP. Validation happens before anything is written; every change is one
//! [`Store::update`](crate::store::Store::update) transaction, so a failed precondition
//! (`RevisionId`, an alias that still uses a version, a reservation that would starve the
//! account) changes nothing.
//!
//! A package is stored before the record that references it is committed; it is pinned
//! ([`PackagePins`](crate::code::PackagePins)) from before it is stored until after that
//! commit, so a concurrent release of unused code (after a delete) cannot take it.

use std::collections::BTreeMap;

use base64::Engine;

use crate::code::{CodeLimits, PackagePin, StoredCode};
use crate::error::{ApiError, ErrorKind};
use crate::model::*;
use crate::state::AppState;
use crate::store::{AliasRecord, FunctionRecord, VersionRecord};
use crate::validate::{self, FunctionRef, Qualifier};

/// The `StateReason` of a SnapStart version on an engine that checkpoints only sandboxes
/// without network access.
pub const SNAPSHOT_NO_NETWORK: &str = "SnapStart: this version restores from snapshots, which this server's sandbox engine takes without network access; the function cannot reach the network (turn SnapStart off for network access)";

/// Lambda's default limit on all code stored in an account (75 GB).
pub const TOTAL_CODE_SIZE_LIMIT: u64 = 80_530_636_800;
/// Lambda returns at most 50 items per list page.
pub const MAX_PAGE: usize = 50;
pub(crate) const LATEST: &str = "$LATEST";

/// `LastModified` format: `2024-01-01T00:00:00.000+0000`.
pub fn timestamp() -> String {
    chrono::Utc::now()
        .format("%Y-%m-%dT%H:%M:%S%.3f+0000")
        .to_string()
}

pub(crate) fn new_revision() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn check_revision(given: Option<&str>, current: &str) -> Result<(), ApiError> {
    match given {
        Some(rev) if rev != current => Err(ApiError::revision_mismatch()),
        _ => Ok(()),
    }
}

pub use hearth_core::code::code_artifact;

/// `SnapStart.ApplyOn` value that turns snapshots on.
pub(crate) const SNAP_START_PUBLISHED: &str = "PublishedVersions";

/// After `$LATEST` changed: with the server's `$LATEST` snapshot option it is Pending until its
/// new snapshot exists; otherwise Active.
pub(crate) fn mark_latest(rec: &mut FunctionRecord, snap_start_latest: bool) {
    let pending = snap_start_latest && rec.latest.snap_start_apply_on == SNAP_START_PUBLISHED;
    rec.latest.state = pending.then(|| "Pending".into());
    rec.latest.state_reason = None;
}

/// Publish `$LATEST` as a new version, unless it is unchanged since the last published
/// version: then that version is returned (as Lambda does).
pub(crate) fn publish(rec: &mut FunctionRecord, description: Option<String>) -> u64 {
    if let Some((&n, last)) = rec.versions.iter().next_back()
        && last.same_content(&rec.latest)
    {
        return n;
    }
    let n = rec.next_version;
    rec.next_version += 1;
    let mut version = rec.latest.clone();
    version.revision_id = new_revision();
    version.last_modified = timestamp();
    // A published version with SnapStart is Pending until its snapshot exists.
    version.state = (version.snap_start_apply_on == SNAP_START_PUBLISHED).then(|| "Pending".into());
    version.state_reason = None;
    if let Some(d) = description {
        version.description = d;
    }
    rec.versions.insert(n, version);
    n
}

// ---- helpers on the state ---------------------------------------------------------------

impl AppState {
    pub(crate) fn parse_ref(&self, raw: &str) -> Result<FunctionRef, ApiError> {
        let c = self.config();
        let fref = validate::function_ref(raw, &c.region, &c.account_id)?;
        tracing::Span::current().record("function", fref.name.as_str());
        Ok(fref)
    }

    /// The function a request names and the qualifier it names (in the reference or the
    /// query, checked), `unqualified` when it names none.
    pub(crate) fn name_and_qualifier(
        &self,
        function: &str,
        query: Option<String>,
        unqualified: &str,
    ) -> Result<(String, String), ApiError> {
        let fref = self.parse_ref(function)?;
        let q = validate::merge_qualifier(fref.qualifier, query)?;
        if let Some(q) = &q {
            Qualifier::parse(q)?;
        }
        Ok((fref.name, q.unwrap_or_else(|| unqualified.to_string())))
    }

    /// A reference that must not carry a qualifier (operations on the function as a whole).
    fn unqualified(&self, raw: &str) -> Result<String, ApiError> {
        let fref = self.parse_ref(raw)?;
        if fref.qualifier.is_some() {
            return Err(ApiError::invalid(format!(
                "Unsupported qualifier in function name {raw:?} for this operation"
            )));
        }
        Ok(fref.name)
    }

    pub(crate) fn function_not_found(&self, name: &str, qualifier: Option<&str>) -> ApiError {
        let c = self.config();
        let arn = match qualifier {
            Some(q) => c.qualified_arn(name, q),
            None => c.function_arn(name),
        };
        ApiError::not_found(format!("Function not found: {arn}"))
    }

    pub(crate) async fn load(&self, name: &str) -> Result<FunctionRecord, ApiError> {
        let key = name.to_string();
        let rec = self.blocking(move |s| Ok(s.store().get(&key)?)).await?;
        rec.ok_or_else(|| self.function_not_found(name, None))
    }

    /// The wire configuration of one version. `$LATEST` has an unqualified ARN except in
    /// version listings.
    pub(crate) fn configuration(
        &self,
        name: &str,
        label: &str,
        v: &VersionRecord,
        qualify_latest: bool,
    ) -> FunctionConfiguration {
        let c = self.config();
        let function_arn = if label == LATEST && !qualify_latest {
            c.function_arn(name)
        } else {
            c.qualified_arn(name, label)
        };
        FunctionConfiguration {
            function_name: name.to_string(),
            function_arn,
            runtime: v.runtime.clone(),
            role: v.role.clone(),
            handler: v.handler.clone(),
            code_size: v.code.size,
            description: v.description.clone(),
            timeout: v.timeout_s,
            memory_size: v.memory_mb,
            last_modified: v.last_modified.clone(),
            code_sha256: v.code.sha256_b64.clone(),
            version: label.to_string(),
            environment: (!v.environment.is_empty()).then(|| EnvironmentOut {
                variables: v.environment.clone(),
            }),
            tracing_config: TracingConfig {
                mode: "PassThrough".into(),
            },
            revision_id: v.revision_id.clone(),
            package_type: "Zip".into(),
            architectures: vec!["x86_64".into()],
            state: v.state.clone().unwrap_or_else(|| "Active".into()),
            state_reason: v.state_reason.clone().or_else(|| {
                // Where the engine cannot checkpoint a sandbox with network access, snapshot
                // versions run without it: say so rather than fail silently.
                (self.uses_snapshot(label, v)
                    && crate::invoker::egress_wanted(&v.environment)
                    && !self.invoker().snapshots_keep_network())
                .then(|| SNAPSHOT_NO_NETWORK.to_string())
            }),
            state_reason_code: match v.state.as_deref() {
                Some("Pending") => Some("Creating".into()),
                Some("Failed") => Some("FunctionError".into()),
                _ => None,
            },
            last_update_status: "Successful".into(),
            ephemeral_storage: EphemeralStorage {
                size: i64::from(v.ephemeral_storage_mb),
            },
            snap_start: SnapStartOut {
                apply_on: v.snap_start_apply_on.clone(),
                optimization_status: if self.uses_snapshot(label, v) {
                    "On"
                } else {
                    "Off"
                }
                .into(),
            },
            logging_config: LoggingConfig {
                log_format: "Text".into(),
                log_group: format!("/aws/lambda/{name}"),
            },
            dead_letter_config: v.dead_letter_target.as_ref().map(|t| DeadLetterConfig {
                target_arn: Some(t.clone()),
            }),
            layers: v
                .layers
                .iter()
                .map(|l| LayerOut {
                    arn: l.arn.clone(),
                    code_size: l.code.size,
                })
                .collect(),
        }
    }

    /// A URL under `endpoint` (where the client reached this server, `http://host:port`)
    /// that downloads the package with this hex SHA-256 without credentials for
    /// [`ApiConfig::code_url_ttl`](crate::ApiConfig::code_url_ttl) (see [`crate::download`]).
    pub(crate) fn code_location(
        &self,
        endpoint: &str,
        sha256_hex: &str,
    ) -> Result<String, ApiError> {
        let ttl = chrono::TimeDelta::from_std(self.config().code_url_ttl)
            .map_err(|e| ApiError::internal(format!("code URL lifetime: {e}")))?;
        Ok(self.download_key().presign(
            endpoint,
            &self.config().account_id,
            sha256_hex,
            chrono::Utc::now() + ttl,
        ))
    }

    /// A `DeadLetterConfig` from a request: `None` when absent or with an empty `TargetArn`.
    pub(crate) fn dead_letter(
        &self,
        cfg: Option<DeadLetterConfig>,
    ) -> Result<Option<String>, ApiError> {
        let Some(arn) = cfg.and_then(|c| c.target_arn).filter(|a| !a.is_empty()) else {
            return Ok(None);
        };
        let c = self.config();
        crate::events::config::validate_destination(
            &arn,
            crate::events::config::Slot::DeadLetter,
            &c.region,
            &c.account_id,
        )?;
        Ok(Some(arn))
    }

    fn alias_configuration(&self, function: &str, a: &AliasRecord) -> AliasConfiguration {
        AliasConfiguration {
            alias_arn: self.config().qualified_arn(function, &a.name),
            name: a.name.clone(),
            function_version: a.function_version.clone(),
            description: a.description.clone(),
            routing_config: (!a.additional_version_weights.is_empty()).then(|| RoutingConfigOut {
                additional_version_weights: a.additional_version_weights.clone(),
            }),
            revision_id: a.revision_id.clone(),
        }
    }

    /// The version a qualifier names, for reads: an alias means its primary version.
    fn resolve_static(
        &self,
        rec: &FunctionRecord,
        qualifier: Option<&str>,
    ) -> Result<(String, VersionRecord), ApiError> {
        let Some(q) = qualifier else {
            return Ok((LATEST.into(), rec.latest.clone()));
        };
        let version = match Qualifier::parse(q)? {
            Qualifier::Latest => return Ok((LATEST.into(), rec.latest.clone())),
            Qualifier::Version(n) => n.to_string(),
            Qualifier::Alias(alias) => match rec.aliases.get(&alias) {
                Some(a) => a.function_version.clone(),
                None => return Err(self.function_not_found(&rec.name, Some(q))),
            },
        };
        if version == LATEST {
            return Ok((LATEST.into(), rec.latest.clone()));
        }
        version
            .parse::<u64>()
            .ok()
            .and_then(|n| rec.versions.get(&n))
            .map(|v| (version.clone(), v.clone()))
            .ok_or_else(|| self.function_not_found(&rec.name, Some(q)))
    }

    /// Validate and unpack a package, and keep it in the chunk store for workers. The pin
    /// keeps a release of unused code from taking the package: hold it until the record that
    /// references the package is committed.
    pub(crate) async fn store_code(
        &self,
        zip: Vec<u8>,
    ) -> Result<(StoredCode, PackagePin), ApiError> {
        let zip = std::sync::Arc::new(zip);
        // The digest names the pin; taking it before anything is written is what makes the
        // store-then-commit atomic with respect to a release.
        let z = zip.clone();
        let code = self.blocking(move |s| Ok(s.code().digest(&z)?)).await?;
        let pin = self.package_pins().pin(&code.sha256_hex).await;
        let z = zip.clone();
        let stored = self.blocking(move |s| Ok(s.code().store_zip(&z)?)).await?;
        if let Some(chunks) = &self.config().chunk_store {
            chunks
                .put_bytes(
                    &self.owner_scope(),
                    &code_artifact(&stored.sha256_hex),
                    &zip,
                    Default::default(),
                )
                .await
                .map_err(|e| ApiError::internal(format!("storing code in the chunk store: {e}")))?;
        }
        Ok((stored, pin))
    }

    /// The key scope of this account's artifacts.
    pub(crate) fn owner_scope(&self) -> hearth_store::Scope {
        hearth_store::Scope::Owner(self.config().account_id.clone())
    }

    /// Release code artifacts no function or version uses any more (their chunks are then
    /// freed by the collector), sparing packages pinned by a create or update in progress.
    pub(crate) async fn release_unused_code(&self) {
        let Some(chunks) = self.config().chunk_store.clone() else {
            return;
        };
        let pins = self.package_pins().clone();
        // No pin is taken until the deletes are done; the pins are read before the records
        // (see `PackagePins` for why this order).
        let _session = pins.release_session().await;
        let mut used: std::collections::HashSet<String> =
            pins.pinned().iter().map(|hex| code_artifact(hex)).collect();
        // Live packages: every function version's code and layers (a deleted layer version
        // lives on in the functions that use it), and every layer version.
        match self
            .blocking(|s| Ok((s.store().all()?, s.store().layers()?)))
            .await
        {
            Ok((records, layers)) => {
                for v in records
                    .iter()
                    .flat_map(|r| std::iter::once(&r.latest).chain(r.versions.values()))
                {
                    used.insert(code_artifact(&v.code.sha256_hex));
                    used.extend(v.layers.iter().map(|l| code_artifact(&l.code.sha256_hex)));
                }
                used.extend(
                    layers
                        .iter()
                        .flat_map(|l| l.versions.values())
                        .map(|v| code_artifact(&v.code.sha256_hex)),
                );
            }
            Err(_) => return,
        }
        let scope = self.owner_scope();
        if let Ok(names) = chunks.list(&scope, "code/").await {
            for name in names.into_iter().filter(|n| !used.contains(n)) {
                if let Err(e) = chunks.delete(&scope, &name).await {
                    tracing::warn!("releasing {name}: {e}");
                }
            }
        }
    }

    /// Reject if storing `extra` more bytes of code passes the account's code storage limit
    /// (functions' code and layer versions count).
    pub(crate) async fn check_code_storage(&self, extra: u64) -> Result<(), ApiError> {
        let used = self
            .blocking(|s| {
                let functions = s.store().all()?.iter().map(code_size).sum::<u64>();
                let layers = s
                    .store()
                    .layers()?
                    .iter()
                    .flat_map(|l| l.versions.values())
                    .map(|v| v.code.size)
                    .sum::<u64>();
                Ok(functions + layers)
            })
            .await?;
        if used.saturating_add(extra) > TOTAL_CODE_SIZE_LIMIT {
            return Err(ApiError::new(
                ErrorKind::CodeStorageExceeded,
                "Code storage limit exceeded.",
            ));
        }
        Ok(())
    }
}

/// Code bytes a function holds: `$LATEST` and every version.
fn code_size(rec: &FunctionRecord) -> u64 {
    rec.latest.code.size + rec.versions.values().map(|v| v.code.size).sum::<u64>()
}

/// The zip bytes of a `Code` / `UpdateFunctionCode` request: only `ZipFile` is supported.
pub(crate) fn zip_bytes(
    zip_file: Option<&str>,
    other_sources: bool,
    limits: CodeLimits,
) -> Result<Vec<u8>, ApiError> {
    if other_sources {
        return Err(ApiError::invalid(
            "Only Code.ZipFile is supported: hearth does not fetch code from S3 or container \
             images",
        ));
    }
    let b64 = zip_file
        .ok_or_else(|| ApiError::invalid("Code.ZipFile is required"))?
        .trim();
    if (b64.len() as u64 / 4).saturating_mul(3) > limits.max_zipped_bytes + 3 {
        return Err(ApiError::too_large(format!(
            "Zipped size must be smaller than {} bytes",
            limits.max_zipped_bytes
        )));
    }
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|_| ApiError::invalid("Code.ZipFile is not valid base64"))
}

// ---- pagination -------------------------------------------------------------------------

fn max_items(raw: Option<&str>) -> Result<usize, ApiError> {
    let Some(raw) = raw else { return Ok(MAX_PAGE) };
    match raw.parse::<i64>() {
        Ok(n) if (1..=10_000).contains(&n) => Ok((n as usize).min(MAX_PAGE)),
        _ => Err(ApiError::invalid(format!(
            "1 validation error detected: Value '{raw}' at 'maxItems' failed to satisfy \
             constraint: Member must have value between 1 and 10000"
        ))),
    }
}

pub(crate) fn encode_marker(key: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key)
}

pub(crate) fn decode_marker(marker: &str) -> Result<String, ApiError> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(marker)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| ApiError::invalid(format!("Invalid marker: {marker}")))
}

/// `items` sorted by key; returns those after `after`, at most `max`, and the marker key
/// when more remain.
pub(crate) fn paginate<K: Ord + Clone, T>(
    items: Vec<(K, T)>,
    after: Option<&K>,
    max: usize,
) -> (Vec<T>, Option<K>) {
    let mut rest = items
        .into_iter()
        .filter(|(k, _)| after.is_none_or(|a| k > a))
        .peekable();
    let mut page = Vec::new();
    let mut last = None;
    while page.len() < max {
        let Some((k, v)) = rest.next() else { break };
        last = Some(k);
        page.push(v);
    }
    let next = if rest.peek().is_some() { last } else { None };
    (page, next)
}

// ---- functions ---------------------------------------------------------------------------

pub async fn create_function(
    state: &AppState,
    req: CreateFunctionRequest,
) -> Result<FunctionConfiguration, ApiError> {
    let raw_name = req
        .function_name
        .ok_or_else(|| ApiError::invalid("FunctionName is required"))?;
    let name = state.unqualified(&raw_name)?;
    validate::function_name(&name)?;
    if let Some(p) = req.package_type.as_deref()
        && p != "Zip"
    {
        return Err(ApiError::invalid(format!(
            "PackageType {p} is not supported: hearth runs .zip file archives"
        )));
    }
    let runtime = req
        .runtime
        .ok_or_else(|| ApiError::invalid("Runtime is required for .zip file archive functions"))?;
    validate::runtime(&runtime)?;
    if let Some(h) = &req.handler {
        validate::handler(h)?;
    } else if hearth_core::runtimes::lookup(&runtime).is_some_and(|r| r.needs_handler) {
        return Err(ApiError::invalid(format!(
            "Handler is required for runtime {runtime}"
        )));
    }
    let role = req
        .role
        .ok_or_else(|| ApiError::invalid("Role is required"))?;
    validate::role(&role)?;
    let description = req.description.unwrap_or_default();
    validate::description(&description)?;
    let timeout_s = validate::timeout(req.timeout.unwrap_or(3))?;
    let memory_mb = validate::memory_size(req.memory_size.unwrap_or(128))?;
    let environment = req
        .environment
        .and_then(|e| e.variables)
        .unwrap_or_default();
    validate::environment(&environment)?;
    let tags = req.tags.unwrap_or_default();
    validate::tags(&tags)?;
    let layers = state.resolve_layers(req.layers.unwrap_or_default()).await?;
    if let Some(archs) = &req.architectures {
        validate::architectures(archs)?;
    }
    let ephemeral_storage_mb =
        validate::ephemeral_storage(req.ephemeral_storage.map(|e| e.size).unwrap_or(512))?;
    let snap_start_apply_on = req
        .snap_start
        .and_then(|s| s.apply_on)
        .unwrap_or_else(|| "None".to_string());
    validate::snap_start(&snap_start_apply_on)?;
    let dead_letter_target = state.dead_letter(req.dead_letter_config)?;
    let code = req
        .code
        .ok_or_else(|| ApiError::invalid("Code is required"))?;
    let other = code.s3_bucket.is_some() || code.s3_key.is_some() || code.image_uri.is_some();
    let zip = zip_bytes(code.zip_file.as_deref(), other, state.code().limits())?;

    let key = name.clone();
    if state
        .blocking(move |s| Ok(s.store().get(&key)?))
        .await?
        .is_some()
    {
        return Err(ApiError::conflict(format!(
            "Function already exist: {name}"
        )));
    }
    let publish_now = req.publish.unwrap_or(false);
    // Held until the record is committed (or this fails).
    let (stored, pin) = state.store_code(zip).await?;
    state
        .check_code_storage(stored.size * if publish_now { 2 } else { 1 })
        .await?;
    let hex = stored.sha256_hex.clone();
    let layers_for_check = layers.clone();
    state
        .blocking(move |s| s.check_unzipped_total(&hex, &layers_for_check))
        .await?;

    let latest = VersionRecord {
        runtime,
        role,
        handler: req.handler,
        description,
        timeout_s,
        memory_mb,
        environment,
        ephemeral_storage_mb,
        snap_start_apply_on,
        code: stored.code_ref(),
        last_modified: timestamp(),
        state: None,
        state_reason: None,
        revision_id: new_revision(),
        dead_letter_target,
        layers,
    };
    let mut record = FunctionRecord {
        name: name.clone(),
        latest,
        versions: BTreeMap::new(),
        next_version: 1,
        aliases: BTreeMap::new(),
        reserved_concurrency: None,
        tags,
        event_invoke: BTreeMap::new(),
        function_urls: BTreeMap::new(),
        policy: BTreeMap::new(),
    };
    mark_latest(&mut record, state.config().snap_start_latest);
    let published = publish_now.then(|| publish(&mut record, None));
    let created = {
        let record = record.clone();
        state
            .blocking(move |s| Ok(s.store().create(&record)?))
            .await?
    };
    drop(pin);
    if !created {
        return Err(ApiError::conflict(format!(
            "Function already exist: {name}"
        )));
    }
    tracing::info!(function = %name, code_sha256 = %stored.sha256_b64, "function created");
    state.schedule_snapshots(&name).await;
    Ok(
        match published.and_then(|n| record.versions.get(&n).map(|v| (n, v))) {
            Some((n, v)) => state.configuration(&name, &n.to_string(), v, false),
            None => state.configuration(&name, LATEST, &record.latest, false),
        },
    )
}

/// `GetFunction`. `endpoint` is where the client reached this server (`http://host:port`):
/// `Code.Location` is a URL there that downloads the package without credentials for
/// [`ApiConfig::code_url_ttl`](crate::ApiConfig::code_url_ttl) (see [`crate::download`]).
pub async fn get_function(
    state: &AppState,
    function: &str,
    qualifier: Option<String>,
    endpoint: &str,
) -> Result<GetFunctionResponse, ApiError> {
    let fref = state.parse_ref(function)?;
    let qualifier = validate::merge_qualifier(fref.qualifier, qualifier)?;
    let rec = state.load(&fref.name).await?;
    let (label, version) = state.resolve_static(&rec, qualifier.as_deref())?;
    let location = state.code_location(endpoint, &version.code.sha256_hex)?;
    Ok(GetFunctionResponse {
        configuration: state.configuration(&rec.name, &label, &version, false),
        code: FunctionCodeLocation {
            repository_type: "S3".into(),
            location,
        },
        tags: (!rec.tags.is_empty()).then(|| rec.tags.clone()),
        concurrency: rec.reserved_concurrency.map(|n| Concurrency {
            reserved_concurrent_executions: Some(n),
        }),
    })
}

/// A package being downloaded: its length and its bytes, verified against its SHA-256 as they
/// go (a mismatch ends the stream with an error, so the client sees a short body).
pub struct Package {
    pub size: u64,
    pub bytes: futures::stream::BoxStream<'static, Result<bytes::Bytes, std::io::Error>>,
}

/// The package a presigned `Code.Location` URL names, once its signature and expiry check out
/// (else `AccessDeniedException`). Signature first: a bad URL learns nothing about what is
/// stored.
pub async fn download_package(
    state: &AppState,
    sha256_hex: &str,
    expires: Option<&str>,
    signature: Option<&str>,
) -> Result<Package, ApiError> {
    use futures::StreamExt;

    state
        .download_key()
        .verify(
            &state.config().account_id,
            sha256_hex,
            expires,
            signature,
            chrono::Utc::now(),
        )
        .map_err(|e| ApiError::new(ErrorKind::AccessDenied, e.to_string()))?;
    let not_found = || ApiError::not_found(format!("Code package not found: {sha256_hex}"));
    let (size, chunks) = match &state.config().chunk_store {
        Some(store) => {
            let scope = state.owner_scope();
            let manifest = match store.manifest(&scope, &code_artifact(sha256_hex)).await {
                Ok(m) => m,
                Err(hearth_store::StoreError::NotFound { .. }) => return Err(not_found()),
                Err(e) => return Err(ApiError::internal(format!("code package: {e}"))),
            };
            let store = store.clone();
            let chunks = futures::stream::iter(manifest.chunks)
                .map(move |chunk| {
                    let (store, scope) = (store.clone(), scope.clone());
                    async move {
                        store
                            .get_chunk(&scope, &chunk)
                            .await
                            .map_err(std::io::Error::other)
                    }
                })
                .buffered(hearth_store::GET_PARALLELISM)
                .boxed();
            (manifest.size, chunks)
        }
        None => {
            let path = state.code().zip_path(sha256_hex).ok_or_else(not_found)?;
            let zip = match tokio::fs::read(&path).await {
                Ok(zip) => zip,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(not_found()),
                Err(e) => return Err(ApiError::internal(e)),
            };
            let size = zip.len() as u64;
            let one = futures::stream::iter([Ok(bytes::Bytes::from(zip))]).boxed();
            (size, one)
        }
    };
    Ok(Package {
        size,
        bytes: verified(chunks, sha256_hex.to_string()),
    })
}

/// `chunks`, failing at the end unless their SHA-256 is `sha256_hex`.
fn verified(
    chunks: futures::stream::BoxStream<'static, Result<bytes::Bytes, std::io::Error>>,
    sha256_hex: String,
) -> futures::stream::BoxStream<'static, Result<bytes::Bytes, std::io::Error>> {
    use futures::StreamExt;
    use sha2::Digest;

    let state = (chunks, Some(sha2::Sha256::new()));
    futures::stream::unfold(state, move |(mut chunks, hasher)| {
        let expected = sha256_hex.clone();
        async move {
            let mut hasher = hasher?;
            match chunks.next().await {
                Some(Ok(bytes)) => {
                    hasher.update(&bytes);
                    Some((Ok(bytes), (chunks, Some(hasher))))
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "code package download failed");
                    Some((Err(e), (chunks, None)))
                }
                None if hex::encode(hasher.finalize()) == expected => None,
                None => {
                    tracing::error!(package = %expected, "code package does not match its SHA-256");
                    let e = std::io::Error::other("package does not match its SHA-256");
                    Some((Err(e), (chunks, None)))
                }
            }
        }
    })
    .boxed()
}

pub async fn get_function_configuration(
    state: &AppState,
    function: &str,
    qualifier: Option<String>,
) -> Result<FunctionConfiguration, ApiError> {
    let fref = state.parse_ref(function)?;
    let qualifier = validate::merge_qualifier(fref.qualifier, qualifier)?;
    let rec = state.load(&fref.name).await?;
    let (label, version) = state.resolve_static(&rec, qualifier.as_deref())?;
    Ok(state.configuration(&rec.name, &label, &version, false))
}

pub async fn list_functions(
    state: &AppState,
    params: ListParams,
) -> Result<ListFunctionsResponse, ApiError> {
    let max = max_items(params.max_items.as_deref())?;
    let all_versions = match params.function_version.as_deref() {
        None => false,
        Some("ALL") => true,
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "1 validation error detected: Value '{other}' at 'functionVersion' failed to \
                 satisfy constraint: Member must satisfy enum value set: [ALL]"
            )));
        }
    };
    // Marker key: "<name>\n<ordinal>", ordinal 0 for $LATEST, N for version N.
    let after = match params.marker.as_deref() {
        Some(m) => {
            let key = decode_marker(m)?;
            let (name, ord) = key
                .split_once('\n')
                .and_then(|(n, o)| o.parse::<u64>().ok().map(|o| (n.to_string(), o)))
                .ok_or_else(|| ApiError::invalid(format!("Invalid marker: {m}")))?;
            Some((name, ord))
        }
        None => None,
    };
    let start = after.as_ref().map(|(n, _)| n.clone());
    // Each record after the first yields at least one item: max + 2 records are enough to
    // fill a page and know whether more remain.
    let records = state
        .blocking(move |s| Ok(s.store().list(start.as_deref(), max + 2)?))
        .await?;
    let mut items = Vec::new();
    for rec in &records {
        items.push((
            (rec.name.clone(), 0u64),
            state.configuration(&rec.name, LATEST, &rec.latest, false),
        ));
        if all_versions {
            for (n, v) in &rec.versions {
                items.push((
                    (rec.name.clone(), *n),
                    state.configuration(&rec.name, &n.to_string(), v, false),
                ));
            }
        }
    }
    let (functions, next) = paginate(items, after.as_ref(), max);
    Ok(ListFunctionsResponse {
        next_marker: next.map(|(name, ord)| encode_marker(&format!("{name}\n{ord}"))),
        functions,
    })
}

pub async fn delete_function(
    state: &AppState,
    function: &str,
    qualifier: Option<String>,
) -> Result<(), ApiError> {
    let fref = state.parse_ref(function)?;
    let qualifier = validate::merge_qualifier(fref.qualifier, qualifier)?;
    let name = fref.name;
    match qualifier.as_deref().map(Qualifier::parse).transpose()? {
        None => {
            let key = name.clone();
            let removed = state.blocking(move |s| Ok(s.store().remove(&key)?)).await?;
            if removed.is_none() {
                return Err(state.function_not_found(&name, None));
            }
            state.invoker().forget(&state.config().function_arn(&name));
            state.release_unused_code().await;
            let key = name.clone();
            if let Err(e) = state.blocking(move |s| Ok(s.logs().remove(&key)?)).await {
                tracing::warn!(function = %name, error = %e, "could not remove the function's log");
            }
            tracing::info!(function = %name, "function deleted");
        }
        Some(Qualifier::Latest) => {
            return Err(ApiError::invalid(
                "$LATEST version cannot be deleted without deleting the function.",
            ));
        }
        Some(Qualifier::Alias(_)) => {
            return Err(ApiError::invalid(
                "Deletion of aliases is not supported by DeleteFunction: use DeleteAlias",
            ));
        }
        Some(Qualifier::Version(n)) => {
            let st = state.clone();
            let key = name.clone();
            let done = state
                .blocking(move |s| {
                    s.store().update(&key, |rec, _| {
                        if !rec.versions.contains_key(&n) {
                            return Err(st.function_not_found(&rec.name, Some(&n.to_string())));
                        }
                        let label = n.to_string();
                        let users: Vec<&str> = rec
                            .aliases
                            .values()
                            .filter(|a| {
                                a.function_version == label
                                    || a.additional_version_weights.contains_key(&label)
                            })
                            .map(|a| a.name.as_str())
                            .collect();
                        if !users.is_empty() {
                            return Err(ApiError::conflict(format!(
                                "Unable to delete version because the following aliases \
                                 reference it: [{}]",
                                users.join(", ")
                            )));
                        }
                        rec.versions.remove(&n);
                        rec.event_invoke.remove(&n.to_string());
                        rec.policy.remove(&n.to_string());
                        Ok(())
                    })
                })
                .await?;
            if done.is_none() {
                return Err(state.function_not_found(&name, None));
            }
            state.invoker().retire(&name);
            state
                .invoker()
                .forget_version(&state.config().function_arn(&name), &n.to_string());
            state.release_unused_code().await;
        }
    }
    Ok(())
}

pub async fn update_function_code(
    state: &AppState,
    function: &str,
    req: UpdateFunctionCodeRequest,
) -> Result<FunctionConfiguration, ApiError> {
    let name = state.unqualified(function)?;
    if let Some(archs) = &req.architectures {
        validate::architectures(archs)?;
    }
    let other = req.s3_bucket.is_some() || req.s3_key.is_some() || req.image_uri.is_some();
    let zip = zip_bytes(req.zip_file.as_deref(), other, state.code().limits())?;
    // Fail fast (before unpacking) when the function does not exist.
    let current = state.load(&name).await?;
    if req.dry_run.unwrap_or(false) {
        // Every rule a real update applies, nothing stored.
        check_revision(req.revision_id.as_deref(), &current.latest.revision_id)?;
        let code = state
            .blocking(move |s| Ok(s.code().check_zip(&zip)?))
            .await?;
        let mut v = current.latest.clone();
        v.code = code;
        return Ok(state.configuration(&name, LATEST, &v, false));
    }
    // Held until the record is committed (or this fails).
    let (stored, pin) = state.store_code(zip).await?;
    let publish_now = req.publish.unwrap_or(false);
    let code = stored.code_ref();
    let revision = req.revision_id;
    let key = name.clone();
    let snap_latest = state.config().snap_start_latest;
    let updated = state
        .blocking(move |s| {
            s.store().update(&key, |rec, _| {
                check_revision(revision.as_deref(), &rec.latest.revision_id)?;
                s.check_unzipped_total(&code.sha256_hex, &rec.latest.layers)?;
                rec.latest.code = code;
                rec.latest.last_modified = timestamp();
                rec.latest.revision_id = new_revision();
                mark_latest(rec, snap_latest);
                Ok(match publish_now.then(|| publish(rec, None)) {
                    Some(n) => (n.to_string(), rec.versions.get(&n).cloned()),
                    None => (LATEST.to_string(), Some(rec.latest.clone())),
                })
            })
        })
        .await?;
    drop(pin);
    let Some((label, Some(version))) = updated else {
        return Err(state.function_not_found(&name, None));
    };
    state.invoker().retire(&name);
    state.schedule_snapshots(&name).await;
    state.release_unused_code().await;
    tracing::info!(function = %name, code_sha256 = %stored.sha256_b64, "function code updated");
    Ok(state.configuration(&name, &label, &version, false))
}

pub async fn update_function_configuration(
    state: &AppState,
    function: &str,
    mut req: UpdateFunctionConfigurationRequest,
) -> Result<FunctionConfiguration, ApiError> {
    let name = state.unqualified(function)?;
    if let Some(r) = &req.runtime {
        validate::runtime(r)?;
    }
    if let Some(h) = &req.handler {
        validate::handler(h)?;
    }
    if let Some(r) = &req.role {
        validate::role(r)?;
    }
    if let Some(d) = &req.description {
        validate::description(d)?;
    }
    let timeout = req.timeout.map(validate::timeout).transpose()?;
    let memory = req.memory_size.map(validate::memory_size).transpose()?;
    let environment = req.environment.map(|e| e.variables.unwrap_or_default());
    if let Some(env) = &environment {
        validate::environment(env)?;
    }
    // Present: replace the function's layers (an empty list removes them).
    let layers = match req.layers.take() {
        Some(arns) => Some(state.resolve_layers(arns).await?),
        None => None,
    };
    let layers_changed = layers.is_some();
    let ephemeral = req
        .ephemeral_storage
        .map(|e| validate::ephemeral_storage(e.size))
        .transpose()?;
    let snap_start = req
        .snap_start
        .map(|s| s.apply_on.unwrap_or_else(|| "None".into()));
    if let Some(s) = &snap_start {
        validate::snap_start(s)?;
    }
    // Present: set (or, with an empty `TargetArn`, remove) the dead-letter queue.
    let dead_letter = req
        .dead_letter_config
        .map(|d| state.dead_letter(Some(d)))
        .transpose()?;
    let key = name.clone();
    let snap_latest = state.config().snap_start_latest;
    let updated = state
        .blocking(move |s| {
            s.store().update(&key, |rec, _| {
                check_revision(req.revision_id.as_deref(), &rec.latest.revision_id)?;
                let v = &mut rec.latest;
                if let Some(r) = req.runtime {
                    v.runtime = r;
                }
                if let Some(h) = req.handler {
                    v.handler = Some(h);
                }
                if v.handler.is_none()
                    && hearth_core::runtimes::lookup(&v.runtime).is_some_and(|r| r.needs_handler)
                {
                    return Err(ApiError::invalid(format!(
                        "Handler is required for runtime {}",
                        v.runtime
                    )));
                }
                if let Some(r) = req.role {
                    v.role = r;
                }
                if let Some(d) = req.description {
                    v.description = d;
                }
                if let Some(t) = timeout {
                    v.timeout_s = t;
                }
                if let Some(m) = memory {
                    v.memory_mb = m;
                }
                if let Some(env) = environment {
                    v.environment = env;
                }
                if let Some(e) = ephemeral {
                    v.ephemeral_storage_mb = e;
                }
                if let Some(s) = snap_start {
                    v.snap_start_apply_on = s;
                }
                if let Some(d) = dead_letter {
                    v.dead_letter_target = d;
                }
                if let Some(layers) = layers {
                    s.check_unzipped_total(&v.code.sha256_hex, &layers)?;
                    v.layers = layers;
                }
                v.last_modified = timestamp();
                v.revision_id = new_revision();
                mark_latest(rec, snap_latest);
                Ok(rec.latest.clone())
            })
        })
        .await?;
    let version = updated.ok_or_else(|| state.function_not_found(&name, None))?;
    state.invoker().retire(&name);
    state.schedule_snapshots(&name).await;
    if layers_changed {
        // A deleted layer version the function no longer uses may now be unused.
        state.release_unused_code().await;
    }
    tracing::info!(function = %name, "function configuration updated");
    Ok(state.configuration(&name, LATEST, &version, false))
}

// ---- versions ------------------------------------------------------------------------------

pub async fn publish_version(
    state: &AppState,
    function: &str,
    req: PublishVersionRequest,
) -> Result<FunctionConfiguration, ApiError> {
    let name = state.unqualified(function)?;
    if let Some(d) = &req.description {
        validate::description(d)?;
    }
    let key = name.clone();
    let published = state
        .blocking(move |s| {
            s.store().update(&key, |rec, _| {
                check_revision(req.revision_id.as_deref(), &rec.latest.revision_id)?;
                if let Some(sha) = req.code_sha256.as_deref()
                    && sha != rec.latest.code.sha256_b64
                {
                    return Err(ApiError::invalid(format!(
                        "CodeSHA256 ({sha}) is different from current CodeSHA256 in $LATEST \
                         ({}). Please try again with the current CodeSHA256.",
                        rec.latest.code.sha256_b64
                    )));
                }
                let n = publish(rec, req.description);
                Ok(rec.versions.get(&n).cloned().map(|v| (n, v)))
            })
        })
        .await?;
    let Some(Some((n, version))) = published else {
        return Err(state.function_not_found(&name, None));
    };
    tracing::info!(function = %name, version = n, "version published");
    state.schedule_snapshots(&name).await;
    Ok(state.configuration(&name, &n.to_string(), &version, false))
}

pub async fn list_versions(
    state: &AppState,
    function: &str,
    params: ListParams,
) -> Result<ListVersionsByFunctionResponse, ApiError> {
    let name = state.unqualified(function)?;
    let max = max_items(params.max_items.as_deref())?;
    let after = params
        .marker
        .as_deref()
        .map(|m| {
            decode_marker(m)?
                .parse::<u64>()
                .map_err(|_| ApiError::invalid(format!("Invalid marker: {m}")))
        })
        .transpose()?;
    let rec = state.load(&name).await?;
    let mut items = vec![(0u64, state.configuration(&name, LATEST, &rec.latest, true))];
    for (n, v) in &rec.versions {
        items.push((*n, state.configuration(&name, &n.to_string(), v, false)));
    }
    let (versions, next) = paginate(items, after.as_ref(), max);
    Ok(ListVersionsByFunctionResponse {
        next_marker: next.map(|n| encode_marker(&n.to_string())),
        versions,
    })
}

// ---- aliases -------------------------------------------------------------------------------

/// A version an alias may point at: `$LATEST` or a number.
fn alias_target(version: &str) -> Result<(), ApiError> {
    if version == LATEST || (!version.is_empty() && version.chars().all(|c| c.is_ascii_digit())) {
        return Ok(());
    }
    Err(ApiError::invalid(format!(
        "1 validation error detected: Value '{version}' at 'functionVersion' failed to \
         satisfy constraint: Member must satisfy regular expression pattern: (\\$LATEST|[0-9]+)"
    )))
}

/// Static rules of `RoutingConfig.AdditionalVersionWeights`.
fn routing_weights(
    routing: Option<RoutingConfigIn>,
) -> Result<Option<BTreeMap<String, f64>>, ApiError> {
    let Some(routing) = routing else {
        return Ok(None);
    };
    let weights = routing.additional_version_weights.unwrap_or_default();
    if weights.len() > 1 {
        return Err(ApiError::invalid(
            "Number of items in AdditionalVersionWeights cannot be greater than 1",
        ));
    }
    for (version, weight) in &weights {
        if version.is_empty() || !version.chars().all(|c| c.is_ascii_digit()) {
            return Err(ApiError::invalid(format!(
                "Invalid version {version} in AdditionalVersionWeights: only published versions \
                 can take weighted traffic"
            )));
        }
        if !weight.is_finite() || !(0.0..=1.0).contains(weight) {
            return Err(ApiError::invalid(format!(
                "Invalid weight {weight} for version {version}: must be between 0.0 and 1.0"
            )));
        }
    }
    Ok(Some(weights))
}

/// Rules that need the function: versions exist; routing needs two distinct published versions.
fn check_alias_targets(
    state: &AppState,
    rec: &FunctionRecord,
    primary: &str,
    weights: &BTreeMap<String, f64>,
) -> Result<(), ApiError> {
    let exists = |v: &str| {
        v == LATEST
            || v.parse::<u64>()
                .is_ok_and(|n| rec.versions.contains_key(&n))
    };
    if !exists(primary) {
        return Err(state.function_not_found(&rec.name, Some(primary)));
    }
    for version in weights.keys() {
        if !exists(version) {
            return Err(state.function_not_found(&rec.name, Some(version)));
        }
        if version == primary {
            return Err(ApiError::invalid(format!(
                "Invalid function version {version} in AdditionalVersionWeights: it is the \
                 alias's primary version"
            )));
        }
        if primary == LATEST {
            return Err(ApiError::invalid(
                "$LATEST is not supported for an alias with weighted routing: point the alias \
                 at a published version",
            ));
        }
    }
    Ok(())
}

pub async fn create_alias(
    state: &AppState,
    function: &str,
    req: CreateAliasRequest,
) -> Result<AliasConfiguration, ApiError> {
    let name = state.unqualified(function)?;
    let alias = req
        .name
        .ok_or_else(|| ApiError::invalid("Name is required"))?;
    validate::alias_name(&alias)?;
    let version = req
        .function_version
        .ok_or_else(|| ApiError::invalid("FunctionVersion is required"))?;
    alias_target(&version)?;
    let description = req.description.unwrap_or_default();
    validate::description(&description)?;
    let weights = routing_weights(req.routing_config)?.unwrap_or_default();
    let st = state.clone();
    let key = name.clone();
    let created = state
        .blocking(move |s| {
            s.store().update(&key, |rec, _| {
                if rec.aliases.contains_key(&alias) {
                    return Err(ApiError::conflict(format!(
                        "Alias already exists: {}",
                        st.config().qualified_arn(&rec.name, &alias)
                    )));
                }
                check_alias_targets(&st, rec, &version, &weights)?;
                let record = AliasRecord {
                    name: alias.clone(),
                    function_version: version,
                    description,
                    additional_version_weights: weights,
                    revision_id: new_revision(),
                };
                rec.aliases.insert(alias, record.clone());
                Ok(record)
            })
        })
        .await?;
    let record = created.ok_or_else(|| state.function_not_found(&name, None))?;
    Ok(state.alias_configuration(&name, &record))
}

pub async fn get_alias(
    state: &AppState,
    function: &str,
    alias: &str,
) -> Result<AliasConfiguration, ApiError> {
    let name = state.unqualified(function)?;
    validate::alias_name(alias)?;
    let rec = state.load(&name).await?;
    rec.aliases
        .get(alias)
        .map(|a| state.alias_configuration(&name, a))
        .ok_or_else(|| alias_not_found(state, &name, alias))
}

fn alias_not_found(state: &AppState, function: &str, alias: &str) -> ApiError {
    ApiError::not_found(format!(
        "Alias not found: {}",
        state.config().qualified_arn(function, alias)
    ))
}

pub async fn update_alias(
    state: &AppState,
    function: &str,
    alias: &str,
    req: UpdateAliasRequest,
) -> Result<AliasConfiguration, ApiError> {
    let name = state.unqualified(function)?;
    validate::alias_name(alias)?;
    if let Some(v) = &req.function_version {
        alias_target(v)?;
    }
    if let Some(d) = &req.description {
        validate::description(d)?;
    }
    let weights = routing_weights(req.routing_config)?;
    let st = state.clone();
    let key = name.clone();
    let alias_name = alias.to_string();
    let updated = state
        .blocking(move |s| {
            s.store().update(&key, |rec, _| {
                let Some(mut record) = rec.aliases.get(&alias_name).cloned() else {
                    return Err(alias_not_found(&st, &rec.name, &alias_name));
                };
                check_revision(req.revision_id.as_deref(), &record.revision_id)?;
                if let Some(v) = req.function_version {
                    record.function_version = v;
                }
                if let Some(d) = req.description {
                    record.description = d;
                }
                if let Some(w) = weights {
                    record.additional_version_weights = w;
                }
                check_alias_targets(
                    &st,
                    rec,
                    &record.function_version,
                    &record.additional_version_weights,
                )?;
                record.revision_id = new_revision();
                rec.aliases.insert(alias_name, record.clone());
                Ok(record)
            })
        })
        .await?;
    let record = updated.ok_or_else(|| state.function_not_found(&name, None))?;
    Ok(state.alias_configuration(&name, &record))
}

pub async fn delete_alias(state: &AppState, function: &str, alias: &str) -> Result<(), ApiError> {
    let name = state.unqualified(function)?;
    validate::alias_name(alias)?;
    let key = name.clone();
    let alias = alias.to_string();
    let done = state
        .blocking(move |s| {
            s.store().update(&key, |rec, _| -> Result<(), ApiError> {
                rec.aliases.remove(&alias);
                rec.event_invoke.remove(&alias);
                rec.function_urls.remove(&alias);
                rec.policy.remove(&alias);
                Ok(())
            })
        })
        .await?;
    done.ok_or_else(|| state.function_not_found(&name, None))
}

pub async fn list_aliases(
    state: &AppState,
    function: &str,
    params: ListParams,
) -> Result<ListAliasesResponse, ApiError> {
    let name = state.unqualified(function)?;
    let max = max_items(params.max_items.as_deref())?;
    let after = params.marker.as_deref().map(decode_marker).transpose()?;
    if let Some(v) = &params.function_version {
        alias_target(v)?;
    }
    let rec = state.load(&name).await?;
    let items = rec
        .aliases
        .values()
        .filter(|a| {
            params
                .function_version
                .as_ref()
                .is_none_or(|v| *v == a.function_version)
        })
        .map(|a| (a.name.clone(), state.alias_configuration(&name, a)))
        .collect();
    let (aliases, next) = paginate(items, after.as_ref(), max);
    Ok(ListAliasesResponse {
        next_marker: next.map(|n| encode_marker(&n)),
        aliases,
    })
}

// ---- concurrency and account -------------------------------------------------------------

pub async fn put_function_concurrency(
    state: &AppState,
    function: &str,
    req: PutFunctionConcurrencyRequest,
) -> Result<Concurrency, ApiError> {
    let name = state.unqualified(function)?;
    let value = req
        .reserved_concurrent_executions
        .ok_or_else(|| ApiError::invalid("ReservedConcurrentExecutions is required"))?;
    let value = u32::try_from(value).map_err(|_| {
        ApiError::invalid(format!(
            "1 validation error detected: Value '{value}' at 'reservedConcurrentExecutions' \
             failed to satisfy constraint: Member must have value greater than or equal to 0"
        ))
    })?;
    let limit = u64::from(state.config().account_concurrency);
    let min_unreserved = u64::from(state.config().min_unreserved());
    let key = name.clone();
    let done =
        state
            .blocking(move |s| {
                s.store().update(&key, |rec, others| {
                if limit.saturating_sub(others).saturating_sub(u64::from(value)) < min_unreserved
                    || others + u64::from(value) > limit
                {
                    return Err(ApiError::invalid(format!(
                        "Specified ReservedConcurrentExecutions for function decreases account's \
                         UnreservedConcurrentExecution below its minimum value of \
                         [{min_unreserved}]."
                    )));
                }
                rec.reserved_concurrency = Some(value);
                Ok(())
            })
            })
            .await?;
    done.ok_or_else(|| state.function_not_found(&name, None))?;
    Ok(Concurrency {
        reserved_concurrent_executions: Some(value),
    })
}

pub async fn get_function_concurrency(
    state: &AppState,
    function: &str,
) -> Result<Concurrency, ApiError> {
    let name = state.unqualified(function)?;
    let rec = state.load(&name).await?;
    Ok(Concurrency {
        reserved_concurrent_executions: rec.reserved_concurrency,
    })
}

pub async fn delete_function_concurrency(state: &AppState, function: &str) -> Result<(), ApiError> {
    let name = state.unqualified(function)?;
    let key = name.clone();
    let done = state
        .blocking(move |s| {
            s.store().update(&key, |rec, _| -> Result<(), ApiError> {
                rec.reserved_concurrency = None;
                Ok(())
            })
        })
        .await?;
    done.ok_or_else(|| state.function_not_found(&name, None))
}

pub async fn get_account_settings(state: &AppState) -> Result<AccountSettings, ApiError> {
    let (count, code, reserved) = state
        .blocking(|s| {
            let all = s.store().all()?;
            let code = all.iter().map(code_size).sum::<u64>();
            Ok((all.len() as u64, code, s.store().reserved_total()?))
        })
        .await?;
    let limit = state.config().account_concurrency;
    let code_limits = state.code().limits();
    Ok(AccountSettings {
        account_limit: AccountLimit {
            total_code_size: TOTAL_CODE_SIZE_LIMIT,
            code_size_unzipped: code_limits.max_unzipped_bytes,
            code_size_zipped: code_limits.max_zipped_bytes,
            concurrent_executions: limit,
            unreserved_concurrent_executions: u64::from(limit)
                .saturating_sub(reserved)
                .try_into()
                .unwrap_or(0),
        },
        account_usage: AccountUsage {
            total_code_size: code,
            function_count: count,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paginate_pages_and_markers() {
        let items: Vec<(u64, u64)> = (0..7).map(|i| (i, i * 10)).collect();
        let (p1, m1) = paginate(items.clone(), None, 3);
        assert_eq!(p1, [0, 10, 20]);
        assert_eq!(m1, Some(2));
        let (p2, m2) = paginate(items.clone(), m1.as_ref(), 3);
        assert_eq!(p2, [30, 40, 50]);
        let (p3, m3) = paginate(items.clone(), m2.as_ref(), 3);
        assert_eq!(p3, [60]);
        assert_eq!(m3, None, "no marker on the last page");
        let (p, m) = paginate(items, None, 7);
        assert_eq!(p.len(), 7);
        assert_eq!(m, None, "no marker when the page holds exactly the rest");
    }

    #[test]
    fn max_items_rules() {
        assert_eq!(max_items(None).expect("default"), 50);
        assert_eq!(max_items(Some("5")).expect("5"), 5);
        assert_eq!(max_items(Some("1000")).expect("capped"), 50);
        assert!(max_items(Some("0")).is_err());
        assert!(max_items(Some("x")).is_err());
    }
}
