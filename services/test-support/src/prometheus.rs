//! A real Prometheus server (Debian's `prometheus` package) scraping the binaries under test,
//! so dashboards' and alerts' queries run against what the services really expose.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::Value;
use tokio::process::{Child, Command};

use crate::client::http_request;
use crate::eventually;

/// How often it scrapes: short, so a test of a few seconds has several samples of each series.
pub const SCRAPE_INTERVAL: Duration = Duration::from_secs(1);

/// The server; killed, and its data removed, when dropped.
pub struct Prometheus {
    /// Its HTTP API.
    pub addr: SocketAddr,
    client: Client<HttpConnector, Full<Bytes>>,
    dir: PathBuf,
    _child: Child,
}

impl Prometheus {
    /// Starts it scraping `/metrics` of each `(job, address)`, and waits until it answers
    /// queries. Panics, saying how to install it, when the binary is missing.
    pub async fn start(targets: &[(&str, SocketAddr)]) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "dedup-prometheus-{}-{}",
            std::process::id(),
            chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default()
        ));
        std::fs::create_dir_all(&dir).expect("create Prometheus's directory");
        let mut config = format!(
            "global:\n  scrape_interval: {0}s\n  scrape_timeout: {0}s\n  evaluation_interval: {0}s\nscrape_configs:\n",
            SCRAPE_INTERVAL.as_secs()
        );
        for (job, addr) in targets {
            config.push_str(&format!(
                "  - job_name: {job}\n    static_configs:\n      - targets: ['{addr}']\n"
            ));
        }
        std::fs::write(dir.join("prometheus.yml"), config).expect("write prometheus.yml");
        let addr = crate::process::free_port();
        let log = std::fs::File::create(dir.join("prometheus.log")).expect("Prometheus's log");
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start prometheus: {e}; install it (apt-get install prometheus, or \
                     scripts/check-monitoring.sh does it)"
                )
            });
        let server = Self {
            addr,
            client: Client::builder(TokioExecutor::new()).build_http(),
            dir,
            _child: child,
        };
        eventually(Duration::from_secs(30), "Prometheus to answer", || async {
            tokio::net::TcpStream::connect(addr).await.ok()?;
            let (status, _) = http_request(addr, "GET", "/-/ready", "text/plain", b"").await;
            (status == 200).then_some(())
        })
        .await;
        server
    }

    /// Evaluates `expr` now; the result's series (each `{"metric": {…}, "value": [t, "v"]}`),
    /// or the error Prometheus gives for it.
    pub async fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let request = hyper::Request::post(format!("http://{}/api/v1/query", self.addr))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Full::new(Bytes::from(format!(
                "query={}",
                utf8_percent_encode(expr, NON_ALPHANUMERIC)
            ))))
            .expect("a valid request");
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| format!("Prometheus at {}: {e}", self.addr))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("reading Prometheus's answer: {e}"))?
            .to_bytes();
        let answer: Value = serde_json::from_slice(&body).map_err(|e| {
            format!(
                "HTTP {status}, not JSON ({e}): {}",
                String::from_utf8_lossy(&body)
            )
        })?;
        if answer["status"] != "success" {
            return Err(format!("HTTP {status}: {}", answer["error"]));
        }
        match &answer["data"]["result"] {
            Value::Array(series) => Ok(series.clone()),
            // A scalar or string result: one value, no labels.
            other => Ok(vec![serde_json::json!({ "metric": {}, "value": other })]),
        }
    }

    /// What it wrote to its log (warnings and errors).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        // The child is killed by kill_on_drop; its data goes with the directory.
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
