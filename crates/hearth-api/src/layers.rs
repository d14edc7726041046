//! Layers: `PublishLayerVersion`, `GetLayerVersion`, `GetLayerVersionByArn`, `ListLayers`,
//! `ListLayerVersions`, `DeleteLayerVersion`, and what a function's `Layers` must satisfy.
//!
//! A layer version is a package like a function's code: the same zip rules, stored the same
//! way (the code store and the chunk store's `code/<sha256-hex>` artifact, so a layer and a
//! function with the same zip share it) and offered for download the same way (`Content.Location`
//! is a presigned URL as `GetFunction`'s `Code.Location`). Its metadata is a [`LayerRecord`] in
//! the metadata database; version numbers count up from 1 and are never reused.
//!
//! A function version keeps a copy of each layer version it uses ([`FunctionLayer`]: the ARN,
//! the package and its unpacked size), taken when `Layers` is set. Deleting a layer version
//! therefore changes no function: its package stays live while any function version names it
//! (see [`AppState::release_unused_code`]), and workers find it by its SHA-256 as they find
//! code. Why a copy rather than a reference resolved at invoke time: Lambda behaves so (a
//! deleted layer version keeps working for the functions that had it), and it keeps invokes
//! free of a second lookup.

use std::cmp::Reverse;

use crate::error::ApiError;
use crate::functions::{decode_marker, encode_marker, paginate, timestamp, zip_bytes};
use crate::model::*;
use crate::state::AppState;
use crate::store::{FunctionLayer, LayerRecord, LayerVersionRecord};
use crate::validate;

/// Lambda's answer for a layer or layer version that does not exist.
fn layer_not_found() -> ApiError {
    ApiError::not_found("The resource you requested does not exist.")
}

/// `MaxItems` of the layer listings: 1–50.
fn layer_max_items(raw: Option<&str>) -> Result<usize, ApiError> {
    let Some(raw) = raw else { return Ok(50) };
    match raw.parse::<i64>() {
        Ok(n) if (1..=50).contains(&n) => Ok(n as usize),
        _ => Err(ApiError::invalid(format!(
            "1 validation error detected: Value '{raw}' at 'maxItems' failed to satisfy \
             constraint: Member must have value between 1 and 50"
        ))),
    }
}

impl AppState {
    /// `arn:aws:lambda:REGION:ACCOUNT:layer:NAME`.
    pub fn layer_arn(&self, name: &str) -> String {
        let c = self.config();
        format!("arn:aws:lambda:{}:{}:layer:{name}", c.region, c.account_id)
    }

    /// The layer version ARN: the layer ARN with `:VERSION`.
    pub fn layer_version_arn(&self, name: &str, version: u64) -> String {
        format!("{}:{version}", self.layer_arn(name))
    }

    /// The layer a `LayerName` path parameter names in this account and region; `None` for an
    /// ARN of another account or region (no such layer here).
    fn local_layer_name(&self, raw: &str) -> Result<Option<String>, ApiError> {
        let (name, place) = validate::layer_name(raw)?;
        let c = self.config();
        Ok(match place {
            Some((region, account)) if region != c.region || account != c.account_id => None,
            _ => Some(name),
        })
    }

    /// The layer versions of a function's `Layers`, in order: at most five, each existing in
    /// this account and region, no layer twice.
    pub(crate) async fn resolve_layers(
        &self,
        arns: Vec<String>,
    ) -> Result<Vec<FunctionLayer>, ApiError> {
        if arns.len() > validate::MAX_LAYERS {
            return Err(ApiError::invalid(format!(
                "Cannot reference more than {} layers.",
                validate::MAX_LAYERS
            )));
        }
        let mut refs = Vec::with_capacity(arns.len());
        for arn in &arns {
            let r = validate::layer_version_arn(arn, "layers")?;
            if let Some(j) = refs
                .iter()
                .position(|p: &validate::LayerVersionRef| p.name == r.name)
            {
                return Err(ApiError::invalid(format!(
                    "Two different versions of the same layer are not allowed to be referenced \
                     in the same function. {} and {arn} are versions of the same layer.",
                    arns[j]
                )));
            }
            refs.push(r);
        }
        let c = self.config().clone();
        self.blocking(move |s| {
            let mut out = Vec::with_capacity(refs.len());
            for (r, arn) in refs.iter().zip(arns) {
                let found = if r.region == c.region && r.account == c.account_id {
                    s.store()
                        .layer(&r.name)?
                        .and_then(|l| l.versions.get(&r.version).cloned())
                } else {
                    None
                };
                let v = found.ok_or_else(|| {
                    ApiError::invalid(format!("Layer version {arn} does not exist."))
                })?;
                out.push(FunctionLayer {
                    arn: s.layer_version_arn(&r.name, r.version),
                    code: v.code,
                    unzipped_size: v.unzipped_size,
                });
            }
            Ok(out)
        })
        .await
    }

    /// Reject a function whose code (the package with this hex SHA-256) and layers unpack to
    /// more than the unzipped limit (250 MB, as Lambda). Blocking (walks the code's tree).
    pub(crate) fn check_unzipped_total(
        &self,
        code_sha256_hex: &str,
        layers: &[FunctionLayer],
    ) -> Result<(), ApiError> {
        if layers.is_empty() {
            return Ok(()); // the code alone was checked when it was stored
        }
        let code = self
            .code()
            .unpacked_size(code_sha256_hex)
            .map_err(|e| ApiError::internal(format!("measuring the function's code: {e}")))?;
        let limit = self.code().limits().max_unzipped_bytes;
        let total = layers
            .iter()
            .fold(code, |t, l| t.saturating_add(l.unzipped_size));
        if total > limit {
            return Err(ApiError::invalid(format!(
                "Layers consume more than the available size of {limit} bytes"
            )));
        }
        Ok(())
    }

    fn layer_version(
        &self,
        name: &str,
        n: u64,
        v: &LayerVersionRecord,
        endpoint: &str,
    ) -> Result<LayerVersion, ApiError> {
        Ok(LayerVersion {
            content: LayerVersionContentOutput {
                location: self.code_location(endpoint, &v.code.sha256_hex)?,
                code_sha256: v.code.sha256_b64.clone(),
                code_size: v.code.size,
            },
            layer_arn: self.layer_arn(name),
            layer_version_arn: self.layer_version_arn(name, n),
            description: v.description.clone(),
            created_date: v.created_date.clone(),
            version: n,
            compatible_runtimes: v.compatible_runtimes.clone(),
            license_info: v.license_info.clone(),
            compatible_architectures: v.compatible_architectures.clone(),
        })
    }

    fn layer_list_item(&self, name: &str, n: u64, v: &LayerVersionRecord) -> LayerVersionsListItem {
        LayerVersionsListItem {
            layer_version_arn: self.layer_version_arn(name, n),
            version: n,
            description: v.description.clone(),
            created_date: v.created_date.clone(),
            compatible_runtimes: v.compatible_runtimes.clone(),
            license_info: v.license_info.clone(),
            compatible_architectures: v.compatible_architectures.clone(),
        }
    }

    async fn load_layer(&self, name: &str) -> Result<Option<LayerRecord>, ApiError> {
        let key = name.to_string();
        self.blocking(move |s| Ok(s.store().layer(&key)?)).await
    }
}

/// Whether a layer version passes `ListLayers`' / `ListLayerVersions`' filters.
fn matches(v: &LayerVersionRecord, filters: &LayerFilters) -> bool {
    filters
        .runtime
        .as_ref()
        .is_none_or(|r| v.compatible_runtimes.contains(r))
        && filters
            .architecture
            .as_ref()
            .is_none_or(|a| v.compatible_architectures.contains(a))
}

struct LayerFilters {
    runtime: Option<String>,
    architecture: Option<String>,
}

fn filters(params: &LayerListParams) -> Result<LayerFilters, ApiError> {
    if let Some(r) = &params.compatible_runtime {
        validate::compatible_runtime(r, "compatibleRuntime")?;
    }
    if let Some(a) = &params.compatible_architecture {
        validate::compatible_architecture(a, "compatibleArchitecture")?;
    }
    Ok(LayerFilters {
        runtime: params.compatible_runtime.clone(),
        architecture: params.compatible_architecture.clone(),
    })
}

/// `PublishLayerVersion`: store the zip (the rules and the storage of function code) and
/// record the next version. `endpoint` is where the client reached this server (for
/// `Content.Location`).
pub async fn publish_layer_version(
    state: &AppState,
    layer: &str,
    req: PublishLayerVersionRequest,
    endpoint: &str,
) -> Result<LayerVersion, ApiError> {
    let name = state.local_layer_name(layer)?.ok_or_else(|| {
        ApiError::invalid(format!(
            "Layer {layer} is not in this account and region: publish by name"
        ))
    })?;
    let description = req.description.unwrap_or_default();
    validate::description(&description)?;
    if let Some(l) = &req.license_info {
        validate::license_info(l)?;
    }
    let compatible_runtimes = req.compatible_runtimes.unwrap_or_default();
    validate::compatible_runtimes(&compatible_runtimes)?;
    let compatible_architectures = req.compatible_architectures.unwrap_or_default();
    validate::compatible_architectures(&compatible_architectures)?;
    let content = req
        .content
        .ok_or_else(|| ApiError::invalid("Content is required"))?;
    let other = content.s3_bucket.is_some()
        || content.s3_key.is_some()
        || content.s3_object_version.is_some();
    let zip = zip_bytes(content.zip_file.as_deref(), other, state.code().limits())?;
    // Held until the record is committed (or this fails), as for function code.
    let (stored, pin) = state.store_code(zip).await?;
    state.check_code_storage(stored.size).await?;
    let hex = stored.sha256_hex.clone();
    let unzipped_size = state
        .blocking(move |s| {
            s.code()
                .unpacked_size(&hex)
                .map_err(|e| ApiError::internal(format!("measuring the layer: {e}")))
        })
        .await?;
    let record = LayerVersionRecord {
        description,
        license_info: req.license_info,
        compatible_runtimes,
        compatible_architectures,
        created_date: timestamp(),
        code: stored.code_ref(),
        unzipped_size,
    };
    let key = name.clone();
    let r = record.clone();
    let n = state
        .blocking(move |s| {
            s.store().update_layer(&key, |l| -> Result<u64, ApiError> {
                let n = l.next_version;
                l.next_version += 1;
                l.versions.insert(n, r);
                Ok(n)
            })
        })
        .await?;
    drop(pin);
    tracing::info!(layer = %name, version = n, code_sha256 = %stored.sha256_b64, "layer version published");
    state.layer_version(&name, n, &record, endpoint)
}

/// `GetLayerVersion`.
pub async fn get_layer_version(
    state: &AppState,
    layer: &str,
    version: &str,
    endpoint: &str,
) -> Result<LayerVersion, ApiError> {
    let n = validate::layer_version_number(version)?;
    let name = state.local_layer_name(layer)?.ok_or_else(layer_not_found)?;
    let rec = state.load_layer(&name).await?.ok_or_else(layer_not_found)?;
    let v = rec.versions.get(&n).ok_or_else(layer_not_found)?;
    state.layer_version(&name, n, v, endpoint)
}

/// `GetLayerVersionByArn` (`GET /2018-10-31/layers?find=LayerVersion&Arn=...`).
pub async fn get_layer_version_by_arn(
    state: &AppState,
    arn: Option<&str>,
    endpoint: &str,
) -> Result<LayerVersion, ApiError> {
    let arn = arn.ok_or_else(|| ApiError::invalid("Arn is required"))?;
    let r = validate::layer_version_arn(arn, "arn")?;
    let c = state.config();
    if r.region != c.region || r.account != c.account_id {
        return Err(layer_not_found());
    }
    get_layer_version(state, &r.name, &r.version.to_string(), endpoint).await
}

/// `ListLayers`: each layer with its newest version that passes the filters (layers with none
/// are left out), by name.
pub async fn list_layers(
    state: &AppState,
    params: LayerListParams,
) -> Result<ListLayersResponse, ApiError> {
    let max = layer_max_items(params.max_items.as_deref())?;
    let after = params.marker.as_deref().map(decode_marker).transpose()?;
    let f = filters(&params)?;
    let all = state.blocking(|s| Ok(s.store().layers()?)).await?;
    let items = all
        .iter()
        .filter_map(|l| {
            let (n, v) = l.versions.iter().rev().find(|(_, v)| matches(v, &f))?;
            Some((
                l.name.clone(),
                LayersListItem {
                    layer_name: l.name.clone(),
                    layer_arn: state.layer_arn(&l.name),
                    latest_matching_version: state.layer_list_item(&l.name, *n, v),
                },
            ))
        })
        .collect();
    let (layers, next) = paginate(items, after.as_ref(), max);
    Ok(ListLayersResponse {
        next_marker: next.map(|n| encode_marker(&n)),
        layers,
    })
}

/// `ListLayerVersions`: the versions that pass the filters, newest first. A layer that does not
/// exist has none.
pub async fn list_layer_versions(
    state: &AppState,
    layer: &str,
    params: LayerListParams,
) -> Result<ListLayerVersionsResponse, ApiError> {
    let max = layer_max_items(params.max_items.as_deref())?;
    let after = params
        .marker
        .as_deref()
        .map(|m| {
            decode_marker(m)?
                .parse::<u64>()
                .map(Reverse)
                .map_err(|_| ApiError::invalid(format!("Invalid marker: {m}")))
        })
        .transpose()?;
    let f = filters(&params)?;
    let rec = match state.local_layer_name(layer)? {
        Some(name) => state.load_layer(&name).await?,
        None => None,
    };
    let items = rec
        .iter()
        .flat_map(|l| {
            l.versions
                .iter()
                .rev()
                .filter(|(_, v)| matches(v, &f))
                .map(|(n, v)| (Reverse(*n), state.layer_list_item(&l.name, *n, v)))
        })
        .collect();
    let (layer_versions, next) = paginate(items, after.as_ref(), max);
    Ok(ListLayerVersionsResponse {
        next_marker: next.map(|Reverse(n)| encode_marker(&n.to_string())),
        layer_versions,
    })
}

/// `DeleteLayerVersion`: idempotent (a version that does not exist is not an error, as in
/// Lambda). Functions that use the version keep it; its package is released only once no
/// function version uses it.
pub async fn delete_layer_version(
    state: &AppState,
    layer: &str,
    version: &str,
) -> Result<(), ApiError> {
    let n = validate::layer_version_number(version)?;
    let Some(name) = state.local_layer_name(layer)? else {
        return Ok(());
    };
    let key = name.clone();
    let removed = state
        .blocking(move |s| {
            s.store().update_layer(&key, |l| -> Result<bool, ApiError> {
                Ok(l.versions.remove(&n).is_some())
            })
        })
        .await?;
    if removed {
        tracing::info!(layer = %name, version = n, "layer version deleted");
        state.release_unused_code().await;
    }
    Ok(())
}
