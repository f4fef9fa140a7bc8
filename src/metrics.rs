//! A mount's metrics, served as Prometheus text (`podfs mount --metrics ADDR`): requests and
//! bytes per remote, FUSE operations with latency histograms, and the block cache's counters
//! (a collector registered by the caller). Encoding is `prometheus-client`'s; this module only
//! defines the families and answers `GET /metrics` over plain HTTP/1.1.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{EncodeLabelSet, prometheus_text};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// One kind of request to one remote.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub remote: String,
    /// `list_pods`, `list_versions`, `version_id`, `read_version`, `read_state` (a range
    /// request of file data), ...
    pub op: &'static str,
}

/// One remote.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RemoteLabels {
    pub remote: String,
}

/// One FUSE operation.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    pub op: &'static str,
}

/// The metrics of one mount.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Requests sent to remotes (failed ones too).
    pub requests: Family<RequestLabels, Counter>,
    /// Bytes received from remotes (version objects and file data).
    pub bytes: Family<RemoteLabels, Counter>,
    /// Requests that failed.
    pub errors: Family<RequestLabels, Counter>,
    /// FUSE operations, by how long they took to answer.
    pub fuse: Family<OpLabels, Histogram>,
    /// Opens answered with a backing file the kernel reads directly (FUSE passthrough).
    pub passthrough_opens: Counter,
    /// File handles open now (opened and not yet released by the kernel).
    pub open_files: Gauge,
}

fn latency_histogram() -> Histogram {
    // 10 µs to about 84 s.
    Histogram::new(exponential_buckets(1e-5, 4.0, 12))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("podfs");
        let requests = Family::default();
        let bytes = Family::default();
        let errors = Family::default();
        let fuse = Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        registry.register(
            "remote_requests",
            "Requests sent to a remote, by operation (read_state: one range request of file data)",
            requests.clone(),
        );
        registry.register(
            "remote_request_errors",
            "Requests to a remote that failed, by operation",
            errors.clone(),
        );
        registry.register(
            "remote_received_bytes",
            "Bytes received from a remote (version objects and file data)",
            bytes.clone(),
        );
        registry.register(
            "fuse_operation_seconds",
            "Time from a FUSE request to its answer, by operation",
            fuse.clone(),
        );
        let passthrough_opens = Counter::default();
        registry.register(
            "passthrough_opens",
            "Opens answered with a whole-file copy that the kernel reads directly, without \
             FUSE reads (FUSE passthrough)",
            passthrough_opens.clone(),
        );
        let open_files = Gauge::default();
        registry.register(
            "open_files",
            "File handles open now: opened, and not yet released by the kernel (which releases \
             a handle shortly after its last close returns)",
            open_files.clone(),
        );
        Self {
            registry,
            requests,
            bytes,
            errors,
            fuse,
            passthrough_opens,
            open_files,
        }
    }

    /// Adds metrics read at each scrape (the block cache's counters).
    pub fn register_collector(&mut self, collector: Box<dyn Collector>) {
        self.registry.register_collector(collector);
    }

    /// Records one FUSE operation `op` that took `took`.
    pub fn fuse_op(&self, op: &'static str, took: Duration) {
        self.fuse
            .get_or_create(&OpLabels { op })
            .observe(took.as_secs_f64());
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_text::encode(&mut out, &self.registry);
        out
    }
}

/// Binds `addr` for [`serve`]: done before mounting, so that a taken port fails the mount.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Answers `GET /metrics` (and `GET /`) on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, shutdown: CancellationToken) {
    loop {
        let conn = tokio::select! {
            c = listener.accept() => c,
            () = shutdown.cancelled() => return,
        };
        match conn {
            Ok((stream, _)) => {
                let metrics = Arc::clone(&metrics);
                tokio::spawn(async move {
                    if let Err(e) = answer(stream, &metrics).await {
                        tracing::debug!("metrics request: {e}");
                    }
                });
            }
            Err(e) => {
                tracing::warn!("metrics endpoint: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Longest request head read.
const MAX_HEAD: usize = 8 << 10;

async fn answer(mut stream: TcpStream, metrics: &Metrics) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    let read_head = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(())
    };
    tokio::time::timeout(Duration::from_secs(10), read_head)
        .await
        .map_err(|_| std::io::Error::other("request head not received in 10 s"))??;
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (method, path) = (parts.next(), parts.next());
    let (status, body) = match (method, path) {
        (Some(b"GET"), Some(b"/metrics" | b"/")) => ("200 OK", metrics.encode()),
        (Some(b"GET"), _) => ("404 Not Found", "only /metrics is served\n".to_owned()),
        _ => ("405 Method Not Allowed", "only GET is served\n".to_owned()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        prometheus_text::CONTENT_TYPE,
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_encode_as_prometheus_text() {
        let m = Metrics::new();
        let labels = RequestLabels {
            remote: "r".into(),
            op: "read_state",
        };
        m.requests.get_or_create(&labels).inc_by(3);
        m.fuse_op("read", Duration::from_millis(2));
        let text = m.encode();
        assert!(
            text.contains(r#"podfs_remote_requests_total{remote="r",op="read_state"} 3"#),
            "{text}"
        );
        assert!(
            text.contains(r#"podfs_fuse_operation_seconds_count{op="read"} 1"#),
            "{text}"
        );
    }
}
