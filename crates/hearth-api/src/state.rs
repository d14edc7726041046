//! The front end's configuration and shared state.

use std::path::PathBuf;
use std::sync::Arc;

use crate::code::{CodeLimits, CodeStore, PackagePins};
use crate::download::DownloadKey;
use crate::error::ApiError;
use crate::invoker::Invoker;
use crate::logs::LogStore;
use crate::store::{Store, StoreError};

/// How the front end is set up.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Holds `meta.redb`, `code/`, `logs/`, `download.key` (and `packages/` without a chunk
    /// store).
    pub data_dir: PathBuf,
    /// The region in ARNs (`us-east-1` by default).
    pub region: String,
    /// The 12-digit account id in ARNs (`000000000000` by default).
    pub account_id: String,
    /// Accepted SigV4 credentials: (access key id, secret access key).
    pub credentials: Vec<(String, String)>,
    /// Account-wide concurrency limit (1000 by default, as Lambda).
    pub account_concurrency: u32,
    /// Also snapshot `$LATEST` of functions with `SnapStart.ApplyOn = PublishedVersions`
    /// (Lambda snapshots published versions only).
    pub snap_start_latest: bool,
    /// Where deployment packages are kept for workers to fetch (the chunk store, in the
    /// account's key scope); `None` keeps them only in the front end's data directory.
    pub chunk_store: Option<hearth_store::ChunkStore>,
    /// How long the download URL in `GetFunction`'s `Code.Location` works (10 minutes, as in
    /// Lambda).
    pub code_url_ttl: std::time::Duration,
    /// The asynchronous path: retry back-off, attempts in flight.
    pub async_config: crate::events::AsyncConfig,
    /// Where asynchronous events are kept: `None` is `<data-dir>/events.redb`; a front end in
    /// a cluster passes the assignment service's replicated log.
    pub event_log: Option<std::sync::Arc<dyn hearth_core::eventlog::EventLog>>,
    /// How the `FunctionUrl` of a function URL is written (the path form on
    /// `http://127.0.0.1:9000` by default).
    pub function_urls: crate::urls::UrlBase,
}

impl ApiConfig {
    /// Defaults for everything but the data directory; no credentials.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        ApiConfig {
            data_dir: data_dir.into(),
            region: "us-east-1".to_string(),
            account_id: "000000000000".to_string(),
            credentials: Vec::new(),
            account_concurrency: 1000,
            snap_start_latest: false,
            chunk_store: None,
            code_url_ttl: crate::download::DEFAULT_TTL,
            async_config: crate::events::AsyncConfig::default(),
            event_log: None,
            function_urls: crate::urls::UrlBase::default(),
        }
    }

    /// Unreserved concurrency that reservations must leave: Lambda keeps 100; with a small
    /// account limit (tests, small machines) a tenth of it.
    pub fn min_unreserved(&self) -> u32 {
        100.min(self.account_concurrency / 10)
    }

    /// `arn:aws:lambda:<region>:<account>:function:<name>`.
    pub fn function_arn(&self, name: &str) -> String {
        format!(
            "arn:aws:lambda:{}:{}:function:{name}",
            self.region, self.account_id
        )
    }

    /// The function ARN with `:<qualifier>`.
    pub fn qualified_arn(&self, name: &str, qualifier: &str) -> String {
        format!("{}:{qualifier}", self.function_arn(name))
    }
}

/// Why the front end could not start.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("preparing {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Events(#[from] crate::events::queue::QueueError),
    #[error("start-up task failed: {0}")]
    Task(String),
}

/// [`AppState`] without ownership: background tasks use it so that dropping the last
/// [`AppState`] closes the databases.
#[derive(Clone)]
pub struct WeakState(std::sync::Weak<Inner>);

impl WeakState {
    pub fn upgrade(&self) -> Option<AppState> {
        self.0.upgrade().map(|inner| AppState { inner })
    }
}

/// Shared by every request: configuration, metadata, code and logs, and the invoker.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    config: ApiConfig,
    store: Arc<Store>,
    code: CodeStore,
    /// Packages being stored, not yet referenced by a committed record.
    package_pins: Arc<PackagePins>,
    download_key: DownloadKey,
    logs: std::sync::Arc<LogStore>,
    invoker: Arc<dyn Invoker>,
    /// The asynchronous queue and its scheduler.
    events: Arc<crate::events::Events>,
    /// Snapshots being prepared: `name\0version\0revision`.
    pub(crate) preparing: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl AppState {
    /// Validate the configuration, create the data directory and open `meta.redb` in it, with
    /// Lambda's deployment package limits.
    pub async fn new(config: ApiConfig, invoker: Arc<dyn Invoker>) -> Result<AppState, InitError> {
        Self::with_code_limits(config, CodeLimits::default(), invoker).await
    }

    /// [`AppState::new`] with other package limits (tests use small ones).
    pub async fn with_code_limits(
        config: ApiConfig,
        limits: CodeLimits,
        invoker: Arc<dyn Invoker>,
    ) -> Result<AppState, InitError> {
        let state = tokio::task::spawn_blocking(move || Self::open(config, limits, invoker))
            .await
            .map_err(|e| InitError::Task(e.to_string()))??;
        // Versions left Pending by a crash get their snapshot made now.
        let names: Vec<String> = state.store().all()?.into_iter().map(|r| r.name).collect();
        for name in names {
            state.schedule_snapshots(&name).await;
        }
        tokio::spawn(crate::events::run(state.downgrade()));
        Ok(state)
    }

    /// The blocking part of start-up: file system and database.
    fn open(
        config: ApiConfig,
        limits: CodeLimits,
        invoker: Arc<dyn Invoker>,
    ) -> Result<AppState, InitError> {
        if config.account_id.len() != 12 || !config.account_id.chars().all(|c| c.is_ascii_digit()) {
            return Err(InitError::Config(format!(
                "account id {:?} must be 12 digits",
                config.account_id
            )));
        }
        let region_ok = !config.region.is_empty()
            && config
                .region
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !region_ok {
            return Err(InitError::Config(format!(
                "invalid region {:?}",
                config.region
            )));
        }
        if config.account_concurrency == 0 {
            return Err(InitError::Config(
                "account concurrency must be at least 1".into(),
            ));
        }
        let io = |path: &PathBuf| {
            let path = path.clone();
            move |source| InitError::Io { path, source }
        };
        std::fs::create_dir_all(&config.data_dir).map_err(io(&config.data_dir))?;
        let store = Store::open(&config.data_dir.join("meta.redb"))?;
        let code_dir = config.data_dir.join("code");
        let mut code = CodeStore::new(code_dir.clone(), limits);
        if config.chunk_store.is_none() {
            // Nowhere else keeps the zips, which GetFunction offers for download.
            code = code.with_zip_dir(config.data_dir.join("packages"));
        }
        code.clean_temp().map_err(io(&code_dir))?;
        let key_path = config.data_dir.join("download.key");
        let download_key = DownloadKey::load_or_create(&key_path).map_err(io(&key_path))?;
        let logs = std::sync::Arc::new(LogStore::new(config.data_dir.join("logs")));
        let events = Arc::new(match &config.event_log {
            Some(log) => crate::events::Events::with_log(log.clone(), config.async_config)?,
            None => crate::events::Events::open(
                &config.data_dir.join("events.redb"),
                config.async_config,
            )?,
        });
        Ok(AppState {
            inner: Arc::new(Inner {
                config,
                store: Arc::new(store),
                code,
                package_pins: Arc::default(),
                download_key,
                logs,
                invoker,
                events,
                preparing: Default::default(),
            }),
        })
    }

    pub(crate) fn inner_preparing(&self) -> &std::sync::Mutex<std::collections::HashSet<String>> {
        &self.inner.preparing
    }

    pub fn config(&self) -> &ApiConfig {
        &self.inner.config
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.inner.store
    }

    pub fn invoker(&self) -> &Arc<dyn Invoker> {
        &self.inner.invoker
    }

    pub fn code(&self) -> &CodeStore {
        &self.inner.code
    }

    /// Packages that a release of unused code must leave alone.
    pub fn package_pins(&self) -> &Arc<PackagePins> {
        &self.inner.package_pins
    }

    pub(crate) fn download_key(&self) -> &DownloadKey {
        &self.inner.download_key
    }

    /// A reference that does not keep the state (and its databases) open.
    pub fn downgrade(&self) -> WeakState {
        WeakState(Arc::downgrade(&self.inner))
    }

    /// The asynchronous queue.
    pub fn events(&self) -> &Arc<crate::events::Events> {
        &self.inner.events
    }

    pub fn logs(&self) -> &std::sync::Arc<LogStore> {
        &self.inner.logs
    }

    /// Run blocking work (database, file system) off the async threads.
    pub(crate) async fn blocking<T, F>(&self, f: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: FnOnce(&AppState) -> Result<T, ApiError> + Send + 'static,
    {
        let state = self.clone();
        tokio::task::spawn_blocking(move || f(&state))
            .await
            .map_err(|e| ApiError::internal(format!("blocking task failed: {e}")))?
    }
}
