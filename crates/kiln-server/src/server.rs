//! Starting and stopping a whole Kiln server from a [`Config`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use kiln_cache::{CacheLimits, Instance, Instances};
use kiln_digest::DigestFunction;
use kiln_scheduler::Scheduler;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::metrics::ServerMetrics;
use crate::stores::build_stores;
use crate::{ServerError, data_dir, grpc, http};

/// Command-line values that take precedence over the config file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub http_listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    /// Sandbox helper command for in-process workers whose config leaves
    /// `sandbox.helper` empty (the `kiln` binary passes itself).
    pub sandbox_helper: Option<Vec<String>>,
}

/// Time in-flight calls get to finish after the workers have drained.
pub const LISTENER_STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

/// A started server: its bound addresses and a way to stop it.
pub struct RunningServer {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub data_dir: PathBuf,
    pub instances: Arc<Instances>,
    /// The scheduler, when the config enables remote execution.
    pub scheduler: Option<Arc<Scheduler>>,
    /// Stops the in-process workers (they drain first).
    stop_workers: watch::Sender<bool>,
    /// Stops the listeners, once the workers are done with them.
    stop_listeners: watch::Sender<bool>,
    tasks: Vec<JoinHandle<Result<(), ServerError>>>,
    worker_tasks: Vec<JoinHandle<()>>,
    /// The longest `drain_timeout` of the in-process workers.
    drain: std::time::Duration,
}

impl RunningServer {
    /// How long a graceful stop may take: the in-process workers' drain
    /// (running actions finish or are handed back), then
    /// [`LISTENER_STOP_GRACE`] for in-flight calls.
    pub fn stop_budget(&self) -> std::time::Duration {
        self.drain + LISTENER_STOP_GRACE
    }

    /// Starts a graceful stop: in-process workers drain (running actions
    /// finish, reporting and uploading through the still open listeners,
    /// or are handed back); [`RunningServer::wait`] then stops the
    /// listeners, which finish their in-flight calls.
    pub fn shutdown(&self) {
        let _ = self.stop_workers.send(true);
    }

    /// Waits for the workers to drain, then stops the listeners and waits
    /// for them; the first error wins.
    pub async fn wait(self) -> Result<(), ServerError> {
        for w in self.worker_tasks {
            let _ = w.await;
        }
        let _ = self.stop_listeners.send(true);
        let mut result = Ok(());
        for task in self.tasks {
            let r = match task.await {
                Ok(r) => r,
                Err(e) => Err(ServerError::Io {
                    context: "server task".into(),
                    source: std::io::Error::other(e.to_string()),
                }),
            };
            if result.is_ok() {
                result = r;
            }
        }
        result
    }
}

fn signal(rx: &watch::Receiver<bool>) -> impl std::future::Future<Output = ()> + Send + 'static {
    let mut rx = rx.clone();
    async move {
        // Err means the sender is gone: stop as well.
        let _ = rx.wait_for(|stop| *stop).await;
    }
}

/// Spawns a listener as a named task; its failure is logged here and also
/// returned through [`RunningServer::wait`].
fn spawn_listener(
    name: &'static str,
    serve: impl std::future::Future<Output = Result<(), ServerError>> + Send + 'static,
) -> JoinHandle<Result<(), ServerError>> {
    use tracing::Instrument;
    tokio::spawn(
        async move {
            let result = serve.await;
            if let Err(e) = &result {
                tracing::error!(task = name, error = %e, "listener stopped with an error");
            }
            result
        }
        .instrument(tracing::info_span!("task", name)),
    )
}

async fn bind(addr: SocketAddr, what: &str) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr).await.map_err(|source| ServerError::Io {
        context: format!("binding the {what} listener to {addr}"),
        source,
    })
}

/// Opens the stores, binds both listeners and starts serving. Disk stores
/// finish indexing in the background: start-up does not wait for a scan.
pub async fn start(config: Config, overrides: Overrides) -> Result<RunningServer, ServerError> {
    let data_dir = overrides
        .data_dir
        .clone()
        .unwrap_or_else(|| data_dir::resolve(config.server.data_dir.as_ref()));
    let stores = build_stores(&config, &data_dir).await?;
    let disk_roots: Vec<PathBuf> = config
        .stores
        .values()
        .filter_map(|s| match s {
            crate::config::StoreConfig::Disk(d) => Some(data_dir.join(&d.path)),
            _ => None,
        })
        .collect();
    let limits = CacheLimits {
        max_batch_total_size_bytes: config.limits.max_batch_total_size.bytes(),
        max_cas_blob_size_bytes: config.limits.max_cas_blob_size.bytes(),
        max_inline_bytes: config.limits.max_inline_size.bytes(),
    };
    let instances = config.instances.iter().map(|ic| {
        let mut inst = Instance::new(
            ic.name.clone(),
            stores.by_name[ic.cas.get_ref()].clone(),
            stores.by_name[ic.ac.get_ref()].clone(),
        );
        inst.ac_read_only = ic.read_only;
        inst.ac_completeness_check = ic.completeness_check;
        if let Some(fns) = &ic.digest_functions {
            inst.digest_functions = fns
                .iter()
                .filter_map(|f| DigestFunction::from_name(f.get_ref()))
                .collect();
        }
        inst
    });
    let instances = Arc::new(Instances::new(instances.collect::<Vec<_>>(), limits));
    let scheduler = match &config.scheduler {
        Some(sc) => {
            let scheduler = Scheduler::new(sc.clone(), instances.clone()).map_err(|e| {
                ServerError::Config(crate::config::ConfigError::Invalid {
                    origin: "[scheduler]".into(),
                    message: e.to_string(),
                })
            })?;
            let weak = Arc::downgrade(&scheduler);
            instances.set_execution_capabilities(Box::new(move |name| {
                weak.upgrade().and_then(|s| s.execution_capabilities(name))
            }));
            Some(scheduler)
        }
        None => None,
    };

    let grpc_listener = bind(overrides.listen.unwrap_or(config.server.listen), "gRPC").await?;
    let http_listener = bind(overrides.http_listen.unwrap_or(config.server.http_listen), "HTTP").await?;
    let local = |l: &TcpListener| {
        l.local_addr().map_err(|source| ServerError::Io {
            context: "reading a listener's address".into(),
            source,
        })
    };
    let grpc_addr = local(&grpc_listener)?;
    let http_addr = local(&http_listener)?;

    let (stop_workers, workers_rx) = watch::channel(false);
    let (stop_listeners, rx) = watch::channel(false);
    let mut worker_tasks = Vec::new();
    for (i, wc) in config.workers.iter().enumerate() {
        let mut wc = wc.clone();
        wc.work_dir = data_dir.join(&wc.work_dir);
        wc.cache_dir = data_dir.join(&wc.cache_dir);
        // Actions of an in-process worker must not read this server's
        // stores: hide the data directory and every disk store's root.
        wc.sandbox.hide.push(data_dir.clone());
        wc.sandbox.hide.extend(disk_roots.iter().cloned());
        if wc.sandbox.helper.is_empty()
            && let Some(h) = &overrides.sandbox_helper
        {
            wc.sandbox.helper = h.clone();
        }
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{grpc_addr}"))
            .map_err(|e| ServerError::Io {
                context: "worker endpoint".into(),
                source: std::io::Error::other(e.to_string()),
            })?
            .tcp_nodelay(true)
            .initial_stream_window_size(8 << 20)
            .initial_connection_window_size(32 << 20);
        let scheduler_link: Box<dyn kiln_worker::SchedulerLink> = match &scheduler {
            // The scheduler is in this process: hand it the streams.
            Some(s) => Box::new(crate::local_link::InProcessScheduler::new(s.clone())),
            None => Box::new(endpoint.connect_lazy()),
        };
        let cas_channel = endpoint.connect_lazy();
        let stop = signal(&workers_rx);
        worker_tasks.push(kiln_store::task::spawn("in-process-worker", async move {
            if let Err(e) = kiln_worker::run_worker(wc, scheduler_link, cas_channel, stop).await {
                tracing::error!(worker = i, error = %e, "in-process worker stopped");
            }
        }));
    }
    // One set of metrics per server, shared by both listeners.
    let metrics = Arc::new(ServerMetrics::with_enabled(config.server.metrics));
    if let Some(s) = &scheduler {
        metrics.set_scheduler(s);
    }
    let grpc_task = spawn_listener(
        "grpc-listener",
        grpc::serve(
            grpc_listener,
            instances.clone(),
            scheduler.clone(),
            metrics.clone(),
            signal(&rx),
        ),
    );
    let named_stores: std::collections::BTreeMap<String, Arc<dyn kiln_store::Store>> =
        stores.by_name.into_iter().collect();
    let dashboard = config.server.dashboard.then(|| {
        crate::http::loopback_only(
            kiln_dashboard::router(kiln_dashboard::DashboardContext::new(
                instances.clone(),
                scheduler.clone(),
                named_stores.clone(),
                rx.clone(),
            )),
            http_addr,
        )
    });
    let http_task = spawn_listener(
        "http-listener",
        http::serve(
            http_listener,
            instances.clone(),
            named_stores,
            metrics,
            dashboard,
            signal(&rx),
        ),
    );
    tracing::info!(%grpc_addr, %http_addr, data_dir = %data_dir.display(), "kiln serving");
    Ok(RunningServer {
        grpc_addr,
        http_addr,
        data_dir,
        instances,
        scheduler,
        stop_workers,
        stop_listeners,
        tasks: vec![grpc_task, http_task],
        worker_tasks,
        drain: config
            .workers
            .iter()
            .map(|w| w.drain_timeout)
            .max()
            .unwrap_or_default(),
    })
}
