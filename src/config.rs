//! Typed configuration: every flag has a `PAYERX_*` environment equivalent and a default that
//! works on a fresh machine (embedded log, SQLite views, `./data`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use blobs::{BlobLocation, BlobStore, BlobStoreConfig};
use clap::{Args, ValueEnum};
use projections::Db;
use runtime::{Log, LogConfig, TopicSpec};

use crate::fetcher::{AllowEntry, FetchConfig, Policy};

/// Where events and views live. Shared by `serve`, `load`, `events` and `replay`.
#[derive(Debug, Clone, Args)]
pub struct BackendArgs {
    /// Folder for the embedded log, the SQLite views and blobs.
    #[arg(long, env = "PAYERX_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    /// Kafka bootstrap servers (host:port,…); the embedded log is used when unset.
    #[arg(long, env = "PAYERX_KAFKA_BROKERS")]
    pub kafka_brokers: Option<String>,
    /// Extra librdkafka settings, `key=value`, repeatable (e.g. security.protocol=SASL_SSL).
    /// In the environment, separate settings with `;` (values may contain commas).
    #[arg(long = "kafka-config", env = "PAYERX_KAFKA_CONFIG", value_delimiter = ';')]
    pub kafka_config: Vec<String>,
    /// Views database: `postgres://…` or `sqlite://…`; `<data-dir>/views.sqlite` when unset.
    #[arg(long, env = "PAYERX_DATABASE_URL")]
    pub database_url: Option<String>,
    /// Prefix of every topic name (and of consumer groups).
    #[arg(long, env = "PAYERX_TOPIC_PREFIX", default_value = "payerx.")]
    pub topic_prefix: String,
    /// Partitions of the topics payerx creates at start-up (existing topics are kept).
    #[arg(long, env = "PAYERX_PARTITIONS", default_value_t = 6)]
    pub partitions: i32,
    /// Replication factor of the topics payerx creates (Kafka only).
    #[arg(long, env = "PAYERX_REPLICATION_FACTOR", default_value_t = 1)]
    pub replication_factor: i16,
    /// Embedded log: fsync every commit (survives power loss, not only process crashes).
    #[arg(long, env = "PAYERX_LOG_FSYNC", default_value_t = false)]
    pub log_fsync: bool,
    /// Connections in the views database pool.
    #[arg(long, env = "PAYERX_DB_CONNECTIONS", default_value_t = 8)]
    pub db_connections: u32,
    /// Attachment blob store: a folder, `file:///path` or `s3://bucket/prefix`;
    /// `<data-dir>/blobs` when unset. S3 credentials and region come from the usual AWS
    /// variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, …).
    #[arg(long, env = "PAYERX_BLOB_STORE")]
    pub blob_store: Option<BlobLocation>,
    /// Endpoint of an S3-compatible server (MinIO, Ceph, …) for an `s3://` blob store.
    #[arg(long, env = "PAYERX_BLOB_S3_ENDPOINT")]
    pub blob_s3_endpoint: Option<String>,
    /// Allow a plain-HTTP S3 endpoint (local servers only).
    #[arg(long, env = "PAYERX_BLOB_S3_ALLOW_HTTP", default_value_t = false)]
    pub blob_s3_allow_http: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Role {
    /// The HTTP API.
    Ingest,
    /// The stream processors (validate).
    Processors,
    /// The projections (resource view, attachment links) and the member-match processor.
    Projections,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub backend: BackendArgs,
    /// Address the HTTP API listens on (port 0 picks a free one).
    #[arg(long, env = "PAYERX_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Address of the admin listener (`/metrics`, `/healthz`, `/readyz`), in every role.
    #[arg(long, env = "PAYERX_ADMIN_LISTEN", default_value = "127.0.0.1:9464")]
    pub admin_listen: SocketAddr,
    /// Roles this process runs.
    #[arg(long, env = "PAYERX_ROLES", value_delimiter = ',', default_value = "ingest,processors,projections")]
    pub roles: Vec<Role>,
    /// How long a write waits for the read view before answering 202 with a status link.
    #[arg(long, env = "PAYERX_WRITE_WAIT_MS", default_value_t = 5000)]
    pub write_wait_ms: u64,
    /// Largest request body accepted (413 beyond).
    #[arg(long, env = "PAYERX_MAX_BODY_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Largest `$submit-attachment` request accepted, attachment data included (413 beyond;
    /// send larger documents by `attachment.url`). The bytes stream to the blob store, so
    /// memory does not grow with this.
    #[arg(long, env = "PAYERX_MAX_ATTACHMENT_REQUEST_BYTES", default_value_t = 100 * 1000 * 1000)]
    pub max_attachment_request_bytes: u64,
    /// Public base URL used in Location and links, and as the token audience (`{base}/fhir`)
    /// and issuer (`{base}/auth`); `http://<listen address>` when unset.
    #[arg(long, env = "PAYERX_BASE_URL")]
    pub base_url: Option<String>,
    /// Serve the FHIR API WITHOUT authorization. Local experiments only: every caller sees
    /// and may change everything.
    #[arg(long, env = "PAYERX_INSECURE_NO_AUTH", default_value_t = false)]
    pub insecure_no_auth: bool,
    /// Also accept access tokens from this external OpenID provider (its `iss`)...
    #[arg(long, env = "PAYERX_AUTH_ISSUER", requires = "auth_jwks")]
    pub auth_issuer: Option<String>,
    /// ...verified with the keys published at this JWKS URL.
    #[arg(long, env = "PAYERX_AUTH_JWKS", requires = "auth_issuer")]
    pub auth_jwks: Option<String>,
    /// Lifetime of the access tokens payerx issues, in seconds.
    #[arg(long, env = "PAYERX_ACCESS_TOKEN_TTL", default_value_t = 900)]
    pub access_token_ttl: u64,
    /// How long the API trusts a token it has verified before checking it again (revocation and
    /// disabled clients take effect within this many seconds; 0 checks every request).
    #[arg(long, env = "PAYERX_TOKEN_CACHE_SECS", default_value_t = 5)]
    pub token_cache_secs: u64,
    /// Lifetime of refresh tokens (renewed on every use), in seconds.
    #[arg(long, env = "PAYERX_REFRESH_TOKEN_TTL", default_value_t = 30 * 24 * 3600)]
    pub refresh_token_ttl: u64,
    /// Nice value of the background stages' threads (processors, projections, the attachment
    /// fetcher), 0-19. While the CPUs are short, clients being acknowledged go first and the
    /// stages catch up with what is left; on the embedded log their own appends also wait for
    /// the clients' (at most 200 ms). 0 runs them at the clients' priority in both (see README).
    #[arg(long, env = "PAYERX_STAGES_NICE", default_value_t = 10, value_parser = clap::value_parser!(i32).range(0..=19))]
    pub stages_nice: i32,
    #[command(flatten)]
    pub fetch: FetchArgs,
    #[command(flatten)]
    pub member_match: MemberMatchArgs,
}

/// Da Vinci `$member-match` and `$bulk-member-match`.
#[derive(Debug, Clone, Args)]
pub struct MemberMatchArgs {
    /// How long `$member-match` awaits the processor's decision before answering 503 with
    /// Retry-After (ingest role).
    #[arg(long = "member-match-deadline-ms", env = "PAYERX_MEMBER_MATCH_DEADLINE_MS", default_value_t = 5000)]
    pub deadline_ms: u64,
    /// Failed matches (no match, several matches) one client may make within the window before
    /// its requests are refused with 429 (HRex brute-force defence; processors in the projections role).
    #[arg(long = "member-match-max-failures", env = "PAYERX_MEMBER_MATCH_MAX_FAILURES", default_value_t = 5)]
    pub max_failures: u32,
    /// The window of the failed-match limit, in seconds.
    #[arg(
        long = "member-match-failure-window-secs",
        env = "PAYERX_MEMBER_MATCH_FAILURE_WINDOW_SECS",
        default_value_t = 900
    )]
    pub failure_window_secs: i64,
    /// A request repeating an earlier one (same client, same content) within this many seconds
    /// gets the earlier decision again.
    #[arg(
        long = "member-match-retry-window-secs",
        env = "PAYERX_MEMBER_MATCH_RETRY_WINDOW_SECS",
        default_value_t = 86_400
    )]
    pub retry_window_secs: i64,
    /// HRex consent policies this payer can honour (comma-separated): `regular` (share
    /// non-sensitive data only) and/or `sensitive` (share everything). Listed in the
    /// CapabilityStatement; a Consent asking for another one is refused with 422.
    #[arg(
        long = "member-match-consent-policies",
        env = "PAYERX_MEMBER_MATCH_CONSENT_POLICIES",
        value_delimiter = ',',
        default_value = "regular"
    )]
    pub consent_policies: Vec<ConsentPolicyName>,
    /// This payer's organization identifier(s), `system|value` (comma-separated). When set, a
    /// Consent's source actor must name one of them.
    #[arg(long = "payer-identifier", env = "PAYERX_PAYER_IDENTIFIER", value_delimiter = ',')]
    pub payer_identifiers: Vec<String>,
    /// Largest `$bulk-member-match` request (413 beyond). Members stream onto the log, so
    /// memory does not grow with this.
    #[arg(long = "max-bulk-member-match-bytes", env = "PAYERX_MAX_BULK_MEMBER_MATCH_BYTES", default_value_t = 256 * 1000 * 1000)]
    pub max_bulk_bytes: u64,
}

/// An HRex consent policy, by its short name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ConsentPolicyName {
    Regular,
    Sensitive,
}

impl ConsentPolicyName {
    pub fn uri(self) -> &'static str {
        match self {
            ConsentPolicyName::Regular => processors::member_match::POLICY_REGULAR,
            ConsentPolicyName::Sensitive => processors::member_match::POLICY_SENSITIVE,
        }
    }
}

impl Default for MemberMatchArgs {
    fn default() -> Self {
        MemberMatchArgs {
            deadline_ms: 5000,
            max_failures: 5,
            failure_window_secs: 900,
            retry_window_secs: 86_400,
            consent_policies: vec![ConsentPolicyName::Regular],
            payer_identifiers: Vec::new(),
            max_bulk_bytes: 256 * 1000 * 1000,
        }
    }
}

impl MemberMatchArgs {
    pub fn policy_uris(&self) -> Vec<String> {
        self.consent_policies.iter().map(|p| p.uri().to_string()).collect()
    }

    /// The processor's settings.
    pub fn processor_config(&self) -> projections::MemberMatchConfig {
        let payer_identifiers = self
            .payer_identifiers
            .iter()
            .map(|s| match s.split_once('|') {
                Some((sys, v)) => processors::member_match::IdKey {
                    system: (!sys.is_empty()).then(|| sys.to_string()),
                    value: v.to_string(),
                },
                None => processors::member_match::IdKey { system: None, value: s.clone() },
            })
            .collect();
        projections::MemberMatchConfig {
            consent: processors::member_match::ConsentPolicy { supported: self.policy_uris(), payer_identifiers },
            max_failures: self.max_failures,
            failure_window_s: self.failure_window_secs,
            retry_window_s: self.retry_window_secs,
        }
    }
}

/// How attachments sent by `attachment.url` are fetched (processors role).
#[derive(Debug, Clone, Args)]
pub struct FetchArgs {
    /// Hosts, IP addresses or CIDR blocks that may be fetched from although they are private,
    /// loopback or link-local (comma-separated). Public addresses need no entry.
    #[arg(long = "attachment-fetch-allow", env = "PAYERX_ATTACHMENT_FETCH_ALLOW", value_delimiter = ',')]
    pub allow: Vec<AllowEntry>,
    /// Also fetch plain `http://` URLs (https only by default: the documents are PHI).
    #[arg(long = "attachment-fetch-allow-http", env = "PAYERX_ATTACHMENT_FETCH_ALLOW_HTTP", default_value_t = false)]
    pub allow_http: bool,
    /// Time for one whole attempt (DNS, redirects, body), in seconds. All attempts at one URL
    /// stay under Kafka's default max.poll.interval.ms (5 min) with the default retries.
    #[arg(long = "attachment-fetch-timeout-secs", env = "PAYERX_ATTACHMENT_FETCH_TIMEOUT_SECS", default_value_t = 60)]
    pub timeout_secs: u64,
    /// Time to connect to one address, in seconds.
    #[arg(
        long = "attachment-fetch-connect-timeout-secs",
        env = "PAYERX_ATTACHMENT_FETCH_CONNECT_TIMEOUT_SECS",
        default_value_t = 10
    )]
    pub connect_timeout_secs: u64,
    /// Largest document fetched; `--max-attachment-request-bytes` when unset.
    #[arg(long = "attachment-fetch-max-bytes", env = "PAYERX_ATTACHMENT_FETCH_MAX_BYTES")]
    pub max_bytes: Option<u64>,
    /// Redirects followed (each one checked against the policy again).
    #[arg(long = "attachment-fetch-max-redirects", env = "PAYERX_ATTACHMENT_FETCH_MAX_REDIRECTS", default_value_t = 5)]
    pub max_redirects: usize,
    /// Retries after the first attempt for timeouts, connection errors and HTTP 5xx/408/429.
    #[arg(long = "attachment-fetch-retries", env = "PAYERX_ATTACHMENT_FETCH_RETRIES", default_value_t = 3)]
    pub retries: u32,
    /// Wait before the first retry, doubled each time, in milliseconds.
    #[arg(
        long = "attachment-fetch-retry-backoff-ms",
        env = "PAYERX_ATTACHMENT_FETCH_RETRY_BACKOFF_MS",
        default_value_t = 2000
    )]
    pub retry_backoff_ms: u64,
}

impl Default for FetchArgs {
    fn default() -> Self {
        FetchArgs {
            allow: Vec::new(),
            allow_http: false,
            timeout_secs: 60,
            connect_timeout_secs: 10,
            max_bytes: None,
            max_redirects: 5,
            retries: 3,
            retry_backoff_ms: 2000,
        }
    }
}

impl BackendArgs {
    /// Embedded defaults in `data_dir`.
    pub fn embedded(data_dir: impl Into<PathBuf>) -> Self {
        BackendArgs {
            data_dir: data_dir.into(),
            kafka_brokers: None,
            kafka_config: vec![],
            database_url: None,
            topic_prefix: "payerx.".into(),
            partitions: 6,
            replication_factor: 1,
            log_fsync: false,
            db_connections: 8,
            blob_store: None,
            blob_s3_endpoint: None,
            blob_s3_allow_http: false,
        }
    }

    pub fn log_config(&self) -> anyhow::Result<LogConfig> {
        Ok(match &self.kafka_brokers {
            Some(brokers) => {
                let extra = self
                    .kafka_config
                    .iter()
                    .map(|kv| {
                        kv.split_once('=')
                            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                            .context(format!("--kafka-config {kv:?} is not key=value"))
                    })
                    .collect::<anyhow::Result<_>>()?;
                LogConfig::Kafka { brokers: brokers.clone(), replication_factor: self.replication_factor, extra }
            }
            None => LogConfig::Embedded { data_dir: self.data_dir.clone(), fsync: self.log_fsync },
        })
    }

    /// Opens the log and creates payerx's topics if missing.
    pub async fn open_log(&self) -> anyhow::Result<Arc<dyn Log>> {
        let log = runtime::open(&self.log_config()?).await.context("opening the event log")?;
        let specs: Vec<TopicSpec> = schemas::topics::ALL
            .iter()
            .map(|(name, _)| TopicSpec {
                name: schemas::topics::full(&self.topic_prefix, name),
                partitions: self.partitions,
            })
            .collect();
        log.ensure_topics(&specs).await.context("creating topics")?;
        Ok(log)
    }

    pub fn database_url(&self) -> String {
        self.database_url.clone().unwrap_or_else(|| Db::sqlite_url(&self.data_dir))
    }

    pub fn blob_store_config(&self) -> BlobStoreConfig {
        let location = self.blob_store.clone().unwrap_or_else(|| BlobLocation::Local(self.data_dir.join("blobs")));
        let mut c = BlobStoreConfig::new(location);
        c.s3_endpoint = self.blob_s3_endpoint.clone();
        c.s3_allow_http = self.blob_s3_allow_http;
        c
    }

    /// Opens the attachment blob store (call inside the Tokio runtime: S3 uploads run on it).
    pub fn open_blobs(&self) -> anyhow::Result<BlobStore> {
        let config = self.blob_store_config();
        BlobStore::from_config(&config).with_context(|| format!("opening the blob store {}", config.location))
    }

    pub async fn open_db(&self) -> anyhow::Result<Db> {
        Db::connect(&self.database_url(), self.db_connections).await.context("opening the views database")
    }
}

impl ServeArgs {
    pub fn new(backend: BackendArgs) -> Self {
        ServeArgs {
            backend,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            roles: vec![Role::Ingest, Role::Processors, Role::Projections],
            write_wait_ms: 5000,
            max_body_bytes: 16 * 1024 * 1024,
            max_attachment_request_bytes: 100 * 1000 * 1000,
            base_url: None,
            insecure_no_auth: false,
            auth_issuer: None,
            auth_jwks: None,
            access_token_ttl: 900,
            token_cache_secs: 5,
            refresh_token_ttl: 30 * 24 * 3600,
            stages_nice: 10,
            fetch: FetchArgs::default(),
            member_match: MemberMatchArgs::default(),
        }
    }

    /// The fetcher's settings. `public_base` is where payerx serves Binary (see `App::start`).
    pub fn fetch_config(&self, public_base: Option<String>) -> FetchConfig {
        let f = &self.fetch;
        FetchConfig {
            policy: Policy { allow: f.allow.clone(), allow_http: f.allow_http },
            connect_timeout: Duration::from_secs(f.connect_timeout_secs),
            timeout: Duration::from_secs(f.timeout_secs),
            max_bytes: f.max_bytes.unwrap_or(self.max_attachment_request_bytes),
            max_redirects: f.max_redirects,
            retries: f.retries,
            retry_backoff: Duration::from_millis(f.retry_backoff_ms),
            public_base,
        }
    }

    pub fn auth_config(&self, base_url: &str) -> auth::AuthConfig {
        let mut c = auth::AuthConfig::new(base_url.trim_end_matches('/'));
        c.access_ttl = Duration::from_secs(self.access_token_ttl);
        c.refresh_ttl = Duration::from_secs(self.refresh_token_ttl);
        c.external = match (&self.auth_issuer, &self.auth_jwks) {
            (Some(i), Some(j)) => Some(auth::ExternalIssuer::new(i.clone(), j.clone())),
            _ => None,
        };
        c
    }

    pub fn write_wait(&self) -> Duration {
        Duration::from_millis(self.write_wait_ms)
    }
}
