//! One payerx process: the roles chosen in configuration, wired to the same log and views.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use anyhow::Context;
use ingest::audit::AuditLog;
use ingest::ops::OpsState;
use ingest::{AppState, IngestConfig};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use processors::{CasesProcessor, ValidateProcessor};
use projections::resources::ResourceProjection;
use projections::{LinkProjection, MemberMatchProjection, ProjectionWorker, ResourceStore, WriteNotifier};
use runtime::processor::RunOptions;
use runtime::Log;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::background::BackgroundRuntime;
use crate::config::{Role, ServeArgs};

/// The process-wide Prometheus recorder (installed once, shared by every App in a process).
pub fn metrics_handle() -> Option<PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .set_buckets(&[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0])
                .ok()?
                .install_recorder()
                .ok()
        })
        .clone()
}

/// A running payerx.
pub struct App {
    /// Where the HTTP API listens (when the ingest role runs).
    pub addr: Option<SocketAddr>,
    /// Where `/metrics`, `/healthz` and `/readyz` listen (every role).
    pub admin_addr: SocketAddr,
    pub log: Arc<dyn Log>,
    /// The views (absent in a processors-only process, which never touches the database).
    pub store: Option<Arc<ResourceStore>>,
    /// The CDex link view (with the views).
    pub links: Option<projections::LinkStore>,
    /// Member-match state: decisions, member links, bulk jobs (with the views).
    pub matches: Option<projections::MemberMatchStore>,
    /// The attachment blob store (ingest and processors roles).
    pub blobs: Option<blobs::BlobStore>,
    pub topic_prefix: String,
    /// The authorization server (ingest role, unless `--insecure-no-auth`).
    pub auth: Option<Arc<auth::AuthServer>>,
    pub shutdown: CancellationToken,
    tasks: Vec<(&'static str, JoinHandle<anyhow::Result<()>>)>,
    /// Where the processors and projections run; dropped after their tasks have ended.
    stages: Option<BackgroundRuntime>,
}

impl App {
    pub async fn start(args: ServeArgs) -> anyhow::Result<App> {
        let backend = &args.backend;
        let log = backend.open_log().await?;
        let needs_views = args.roles.iter().any(|r| matches!(r, Role::Ingest | Role::Projections));
        let db = if needs_views { Some(backend.open_db().await?) } else { None };
        let prefix = backend.topic_prefix.clone();
        let store = db.as_ref().map(|db| Arc::new(ResourceStore::new(db.clone(), &prefix)));
        let notifier = Arc::new(WriteNotifier::default());
        let shutdown = CancellationToken::new();
        let mut tasks: Vec<(&'static str, JoinHandle<anyhow::Result<()>>)> = Vec::new();
        let stages = if args.roles.iter().any(|r| matches!(r, Role::Processors | Role::Projections)) {
            Some(BackgroundRuntime::new(args.stages_nice).context("starting the stages' runtime")?)
        } else {
            None
        };
        let stage = stages.as_ref().map(|s| s.handle().clone());
        // The stages' outputs and commits also yield to the clients' appends on the log.
        let stage_log = if args.stages_nice > 0 { log.clone().background() } else { log.clone() };

        if args.roles.contains(&Role::Processors) {
            let (log, stop) = (stage_log.clone(), shutdown.clone());
            let opts = RunOptions { group_prefix: prefix.clone(), ..RunOptions::default() };
            let p = Arc::new(ValidateProcessor::new(&prefix));
            tasks.push((
                "validate",
                spawn_on(&stage, async move { Ok(runtime::processor::run(log, p, opts, stop).await?) }),
            ));
            let (cases_log, stop) = (stage_log.clone(), shutdown.clone());
            let opts = RunOptions { group_prefix: prefix.clone(), ..RunOptions::default() };
            let p = Arc::new(CasesProcessor::new(&prefix));
            tasks.push((
                "cases",
                spawn_on(&stage, async move { Ok(runtime::processor::run(cases_log, p, opts, stop).await?) }),
            ));
        }
        if let (true, Some(db)) = (args.roles.contains(&Role::Projections), &db) {
            let worker = ProjectionWorker {
                db: db.clone(),
                log: stage_log.clone(),
                projection: Arc::new(ResourceProjection::new(&prefix)),
                notifier: Some(notifier.clone()),
                max_batch: 2000,
            };
            let stop = shutdown.clone();
            tasks.push(("resource-projection", spawn_on(&stage, async move { Ok(worker.run(stop).await?) })));
            let links = ProjectionWorker {
                db: db.clone(),
                log: stage_log.clone(),
                projection: Arc::new(LinkProjection::new(&prefix)),
                notifier: None,
                max_batch: 500,
            };
            let stop = shutdown.clone();
            tasks.push(("attachment-link-projection", spawn_on(&stage, async move { Ok(links.run(stop).await?) })));
            let matcher = ProjectionWorker {
                db: db.clone(),
                log: stage_log.clone(),
                projection: Arc::new(MemberMatchProjection::new(&prefix, args.member_match.processor_config())),
                notifier: None,
                max_batch: 500,
            };
            let stop = shutdown.clone();
            tasks.push(("member-match", spawn_on(&stage, async move { Ok(matcher.run(stop).await?) })));
        }
        let ready = Arc::new(AtomicBool::new(false));
        let ops = Arc::new(OpsState {
            log: log.clone(),
            store: store.clone(),
            topic_prefix: prefix.clone(),
            metrics: metrics_handle(),
            ready: ready.clone(),
        });
        let admin = tokio::net::TcpListener::bind(args.admin_listen)
            .await
            .with_context(|| format!("binding the admin listener {}", args.admin_listen))?;
        let admin_addr = admin.local_addr()?;
        tasks.push(("admin-http", serve(admin, ingest::ops::admin_router(ops.clone()), shutdown.clone())));

        let mut addr = None;
        let mut auth_server = None;
        let blob_store = if args.roles.iter().any(|r| matches!(r, Role::Ingest | Role::Processors)) {
            Some(backend.open_blobs()?)
        } else {
            None
        };
        if let (true, Some(store), Some(db)) = (args.roles.contains(&Role::Ingest), &store, &db) {
            let listener =
                tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("binding {}", args.listen))?;
            let bound = listener.local_addr()?;
            addr = Some(bound);
            let base_url = args.base_url.clone().unwrap_or_else(|| format!("http://{bound}"));
            let (audit, audit_task) = AuditLog::start(log.clone(), &prefix);
            let (replies, replies_task) =
                ingest::member_match::MatchReplies::start(log.clone(), &prefix, shutdown.clone());
            tasks.push(("member-match-replies", tokio::spawn(async move { Ok(replies_task.await??) })));
            let auth = if args.insecure_no_auth {
                tracing::warn!(
                    "!!! --insecure-no-auth: the FHIR API at {base_url}/fhir accepts every request WITHOUT a token. \
                     Every caller can read and change all member data. Use only for local experiments. !!!"
                );
                None
            } else {
                let sink = Arc::new(crate::security::AuditTopic(audit.clone()));
                Some(
                    auth::AuthServer::new(db.clone(), args.auth_config(&base_url), sink)
                        .await
                        .context("starting the authorization server")?,
                )
            };
            let state = Arc::new(AppState {
                log: log.clone(),
                store: store.clone(),
                links: projections::LinkStore::new(db.clone()),
                blobs: blob_store.clone().context("the ingest role opens the blob store")?,
                notifier,
                replies,
                matches: projections::MemberMatchStore::new(db.clone()),
                config: IngestConfig {
                    topic_prefix: prefix.clone(),
                    write_wait: args.write_wait(),
                    max_body_bytes: args.max_body_bytes,
                    max_attachment_request_bytes: args.max_attachment_request_bytes,
                    base_url: Some(base_url),
                    member_match_deadline: std::time::Duration::from_millis(args.member_match.deadline_ms),
                    max_bulk_member_match_bytes: args.member_match.max_bulk_bytes,
                    consent_policies: args.member_match.policy_uris(),
                },
                ops: ops.clone(),
                audit,
                verifier: auth.clone().map(|a| {
                    let ttl = std::time::Duration::from_secs(args.token_cache_secs);
                    Arc::new(crate::security::Verifier::new(a, ttl)) as Arc<dyn ingest::access::TokenVerifier>
                }),
                smart_configuration: auth.as_ref().map(|a| a.smart_configuration()),
            });
            let mut router = ingest::router(state);
            if let Some(a) = &auth {
                router = router.merge(a.router());
            }
            tasks.push(("http", serve(listener, router, shutdown.clone())));
            // The router holds the last AuditLog handles: once the listener stops, the appender
            // drains what is queued and ends.
            tasks.push((
                "audit",
                tokio::spawn(async move { audit_task.await.map_err(|e| anyhow::anyhow!("audit appender: {e}")) }),
            ));
            auth_server = auth;
        }
        if let (true, Some(blobs)) = (args.roles.contains(&Role::Processors), &blob_store) {
            // Fetched attachments point at payerx's Binary like inline ones: under the public
            // base URL, or the address ingest serves in this process, else FHIR-relative.
            let base = args.base_url.clone().or_else(|| addr.map(|a| format!("http://{a}")));
            let fetcher = Arc::new(crate::fetcher::Fetcher { config: args.fetch_config(base), blobs: blobs.clone() });
            let (log, stop, prefix) = (stage_log.clone(), shutdown.clone(), prefix.clone());
            tasks.push((
                "attachment-fetch",
                spawn_on(&stage, async move { Ok(crate::fetcher::run(log, fetcher, &prefix, stop).await?) }),
            ));
        }
        ready.store(true, Ordering::Release);
        tracing::info!(?addr, log = log.backend(), views = ?db.as_ref().map(|d| d.backend), roles = ?args.roles, "payerx started");
        let links = db.as_ref().map(|db| projections::LinkStore::new(db.clone()));
        let matches = db.as_ref().map(|db| projections::MemberMatchStore::new(db.clone()));
        Ok(App {
            addr,
            admin_addr,
            log,
            store,
            links,
            matches,
            blobs: blob_store,
            topic_prefix: prefix,
            auth: auth_server,
            shutdown,
            tasks,
            stages,
        })
    }

    /// The views' query side. Panics in a processors-only process (a programming error).
    pub fn store(&self) -> &ResourceStore {
        #[allow(clippy::expect_used)]
        self.store.as_deref().expect("this process runs no role with views")
    }

    /// Base URL of the HTTP API, e.g. `http://127.0.0.1:8080`.
    pub fn base_url(&self) -> String {
        self.addr.map(|a| format!("http://{a}")).unwrap_or_default()
    }

    /// Stops every role: in-flight batches finish, offsets are stored, the listener closes.
    pub async fn stop(self) -> anyhow::Result<()> {
        let App { shutdown, tasks, auth, stages, .. } = self;
        shutdown.cancel();
        // The authorization server holds an audit sender: release it so the audit appender can
        // drain and end once the listener has stopped.
        drop(auth);
        let mut first_err = None;
        for (name, t) in tasks {
            match t.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::error!(task = name, error = %e, "role failed");
                    first_err.get_or_insert(e);
                }
                Err(e) => {
                    first_err.get_or_insert(anyhow::anyhow!("{name} panicked: {e}"));
                }
            }
        }
        drop(stages);
        first_err.map_or(Ok(()), Err)
    }

    /// Runs until SIGTERM/SIGINT or until a role stops with an error.
    pub async fn run_until_signal(mut self) -> anyhow::Result<()> {
        let failed = {
            let watch = futures::future::select_all(self.tasks.iter_mut().map(|(_, t)| t));
            tokio::select! {
                _ = shutdown_signal() => None,
                (res, idx, _) = watch => Some((idx, res)),
            }
        };
        if let Some((idx, res)) = failed {
            let name = self.tasks[idx].0;
            self.tasks.remove(idx);
            self.shutdown.cancel();
            let _ = self.stop().await;
            return match res {
                Ok(Ok(())) => Err(anyhow::anyhow!("{name} stopped unexpectedly")),
                Ok(Err(e)) => Err(e.context(format!("{name} failed"))),
                Err(e) => Err(anyhow::anyhow!("{name} panicked: {e}")),
            };
        }
        tracing::info!("shutting down: draining in-flight work");
        self.stop().await
    }
}

/// Spawns a background stage on the stages' runtime (the current one when there is none).
fn spawn_on<F>(stages: &Option<tokio::runtime::Handle>, task: F) -> JoinHandle<anyhow::Result<()>>
where
    F: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    match stages {
        Some(h) => h.spawn(task),
        None => tokio::spawn(task),
    }
}

fn serve(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    stop: CancellationToken,
) -> JoinHandle<anyhow::Result<()>> {
    tokio::spawn(async move {
        axum::serve(listener, app).with_graceful_shutdown(async move { stop.cancelled().await }).await?;
        Ok(())
    })
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
