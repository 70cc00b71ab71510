//! Queue depth from RabbitMQ's management API: ready *and* unacknowledged messages (a passive
//! declare gives only the ready ones, so work in flight on consumers would look finished).
//! The worker exports it as gauges; the operator scales workers on it.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use serde::Deserialize;

/// Messages in one queue.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct QueueDepth {
    /// Waiting to be delivered.
    pub ready: u64,
    /// Delivered to a consumer and not yet acknowledged: work in flight.
    pub unacked: u64,
    /// Messages published to the queue per second, as the broker last sampled it (0 when
    /// nothing was published lately).
    pub publish_rate: f64,
}

impl QueueDepth {
    pub fn total(&self) -> u64 {
        self.ready + self.unacked
    }
}

/// Where a quorum queue lives: the node leading it and the nodes holding its replicas (the
/// leader among them). Both are empty for a queue of another type.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
pub struct Placement {
    #[serde(default)]
    pub leader: Option<String>,
    #[serde(default)]
    pub members: Vec<String>,
}

/// Why the depth could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DepthError {
    /// The URL (password masked, or not shown when it is not a URL) and why.
    #[error("the management URL {0} is not usable: {1}")]
    BadUrl(String, String),
    #[error("the RabbitMQ management API did not answer within {0:?}")]
    Timeout(Duration),
    #[error(
        "cannot reach the RabbitMQ management API: {0} (is the rabbitmq_management plugin enabled?)"
    )]
    Unreachable(String),
    #[error("queue {queue:?} does not exist in vhost {vhost:?}")]
    NoSuchQueue { vhost: String, queue: String },
    #[error("the RabbitMQ management API answered {status}: {body}")]
    Status { status: u16, body: String },
    #[error("unexpected answer from the RabbitMQ management API: {0}")]
    Decode(String),
}

impl DepthError {
    /// A refusal: the status and the start of what the API said.
    fn status(status: hyper::StatusCode, body: &[u8]) -> Self {
        DepthError::Status {
            status: status.as_u16(),
            body: String::from_utf8_lossy(body).chars().take(200).collect(),
        }
    }
}

#[derive(Deserialize)]
struct QueueInfo {
    #[serde(default)]
    messages_ready: u64,
    #[serde(default)]
    messages_unacknowledged: u64,
    #[serde(default)]
    message_stats: Option<MessageStats>,
    #[serde(flatten)]
    placement: Placement,
}

impl QueueInfo {
    fn depth(&self) -> QueueDepth {
        QueueDepth {
            ready: self.messages_ready,
            unacked: self.messages_unacknowledged,
            publish_rate: self
                .message_stats
                .as_ref()
                .and_then(|s| s.publish_details.as_ref())
                .map_or(0.0, |d| d.rate),
        }
    }
}

#[derive(Deserialize)]
struct MessageStats {
    #[serde(default)]
    publish_details: Option<RateDetails>,
}

#[derive(Deserialize)]
struct RateDetails {
    #[serde(default)]
    rate: f64,
}

/// An error and its sources, `: `-separated: hyper's own message ("client error (Connect)")
/// hides the cause (a refused connection, a certificate the CA did not sign).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Reads queue depths from one management endpoint.
#[derive(Clone)]
pub struct DepthReader {
    client: Client<HttpsConnector<HttpConnector>, Empty<Bytes>>,
    /// `http(s)://host:port` without credentials.
    base: String,
    /// `Basic …` header value, when the URL carried credentials.
    authorization: Option<String>,
    timeout: Duration,
    /// Queues per request of [`DepthReader::list`].
    page_size: u32,
}

/// Queues per listing request by default: RabbitMQ's own default page size.
pub const LIST_PAGE_SIZE: u32 = 500;

impl DepthReader {
    /// A reader for `management_url` (`http://user:password@host:15672`, or `https://`
    /// verified against the system's trusted roots).
    pub fn new(management_url: &str, timeout: Duration) -> Result<Self, DepthError> {
        let tls = crate::tls::TlsArgs::default()
            .client_config()
            .map_err(|e| {
                DepthError::BadUrl(crate::secret::redact_url(management_url), format!("{e:#}"))
            })?;
        Self::with_tls(management_url, timeout, tls)
    }

    /// A reader for `management_url` whose `https://` connections verify the server with `tls`
    /// ([`crate::tls::TlsArgs::client_config`]).
    pub fn with_tls(
        management_url: &str,
        timeout: Duration,
        tls: Arc<rustls::ClientConfig>,
    ) -> Result<Self, DepthError> {
        let shown = || crate::secret::redact_url(management_url);
        let url = url::Url::parse(management_url)
            .map_err(|e| DepthError::BadUrl(shown(), e.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(DepthError::BadUrl(
                shown(),
                "only http:// and https:// are supported".into(),
            ));
        }
        let host = url
            .host_str()
            .ok_or_else(|| DepthError::BadUrl(shown(), "no host".into()))?;
        let port = url.port_or_known_default().unwrap_or(15672);
        let authorization = (!url.username().is_empty()).then(|| {
            let user = percent_encoding::percent_decode_str(url.username()).decode_utf8_lossy();
            let password = percent_encoding::percent_decode_str(url.password().unwrap_or_default())
                .decode_utf8_lossy();
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
            )
        });
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config((*tls).clone())
            .https_or_http()
            .enable_http1()
            .build();
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Ok(Self {
            client,
            base: format!("{}://{host}:{port}", url.scheme()),
            authorization,
            timeout,
            page_size: LIST_PAGE_SIZE,
        })
    }

    /// The same reader, listing `page_size` queues per request (at least 1).
    pub fn with_page_size(mut self, page_size: u32) -> Self {
        self.page_size = page_size.max(1);
        self
    }

    /// The depth of `queue` in `vhost`.
    pub async fn read(&self, vhost: &str, queue: &str) -> Result<QueueDepth, DepthError> {
        Ok(self.read_placed(vhost, queue).await?.0)
    }

    /// The depth of `queue` in `vhost`, and where it lives.
    pub async fn read_placed(
        &self,
        vhost: &str,
        queue: &str,
    ) -> Result<(QueueDepth, Placement), DepthError> {
        let uri = format!(
            "{}/api/queues/{}/{}?columns=messages_ready,messages_unacknowledged,message_stats.publish_details.rate,leader,members",
            self.base,
            utf8_percent_encode(vhost, NON_ALPHANUMERIC),
            utf8_percent_encode(queue, NON_ALPHANUMERIC)
        );
        let (status, body) = self.get(&uri).await?;
        if status == hyper::StatusCode::NOT_FOUND {
            return Err(DepthError::NoSuchQueue {
                vhost: vhost.to_owned(),
                queue: queue.to_owned(),
            });
        }
        if !status.is_success() {
            return Err(DepthError::status(status, &body));
        }
        let info: QueueInfo =
            serde_json::from_slice(&body).map_err(|e| DepthError::Decode(e.to_string()))?;
        Ok((info.depth(), info.placement))
    }

    /// Every queue in `vhost` whose name matches `pattern` (a regular expression as RabbitMQ
    /// reads one, anchor it with `^…$`), with its depth; publish rates are not read. One
    /// request per page of queues ([`LIST_PAGE_SIZE`] unless set).
    pub async fn list(
        &self,
        vhost: &str,
        pattern: &str,
    ) -> Result<Vec<(String, QueueDepth)>, DepthError> {
        #[derive(Deserialize)]
        struct Page {
            items: Vec<Listed>,
            #[serde(default)]
            page_count: u32,
        }
        #[derive(Deserialize)]
        struct Listed {
            name: String,
            #[serde(flatten)]
            info: QueueInfo,
        }
        let mut found = Vec::new();
        let mut page = 1;
        loop {
            let uri = format!(
                "{}/api/queues/{}?page={page}&page_size={page_size}&use_regex=true&name={}&columns=name,messages_ready,messages_unacknowledged",
                self.base,
                utf8_percent_encode(vhost, NON_ALPHANUMERIC),
                utf8_percent_encode(pattern, NON_ALPHANUMERIC),
                page_size = self.page_size,
            );
            let (status, body) = self.get(&uri).await?;
            if !status.is_success() {
                return Err(DepthError::status(status, &body));
            }
            let listed: Page =
                serde_json::from_slice(&body).map_err(|e| DepthError::Decode(e.to_string()))?;
            found.extend(listed.items.into_iter().map(|q| (q.name, q.info.depth())));
            if page >= listed.page_count {
                return Ok(found);
            }
            page += 1;
        }
    }

    /// GETs `uri` (this reader's credentials, its timeout for the answer and for the body).
    async fn get(&self, uri: &str) -> Result<(hyper::StatusCode, Bytes), DepthError> {
        let mut request = hyper::Request::get(uri);
        if let Some(auth) = &self.authorization {
            request = request.header(hyper::header::AUTHORIZATION, auth);
        }
        let request = request
            .body(Empty::new())
            .map_err(|e| DepthError::BadUrl(crate::secret::redact_url(uri), e.to_string()))?;
        let response = tokio::time::timeout(self.timeout, self.client.request(request))
            .await
            .map_err(|_| DepthError::Timeout(self.timeout))?
            .map_err(|e| DepthError::Unreachable(error_chain(&e)))?;
        let status = response.status();
        let body = tokio::time::timeout(self.timeout, response.into_body().collect())
            .await
            .map_err(|_| DepthError::Timeout(self.timeout))?
            .map_err(|e| DepthError::Unreachable(e.to_string()))?
            .to_bytes();
        Ok((status, body))
    }

    /// The depths of `queues` added up (messages and publish rates), read all at once: the
    /// load of a queue split into shards. Fails if any one cannot be read.
    pub async fn read_sum(&self, vhost: &str, queues: &[String]) -> Result<QueueDepth, DepthError> {
        let depths =
            futures::future::try_join_all(queues.iter().map(|q| self.read(vhost, q))).await?;
        Ok(depths
            .iter()
            .fold(QueueDepth::default(), |sum, d| QueueDepth {
                ready: sum.ready + d.ready,
                unacked: sum.unacked + d.unacked,
                publish_rate: sum.publish_rate + d.publish_rate,
            }))
    }
}

/// The vhost named in an AMQP URL (`amqp://…/%2f` and a missing path both mean `/`).
pub fn vhost_of(amqp_url: &str) -> String {
    let path = url::Url::parse(amqp_url)
        .map(|u| u.path().to_owned())
        .unwrap_or_default();
    let vhost = path.strip_prefix('/').unwrap_or(&path);
    if vhost.is_empty() {
        "/".to_owned()
    } else {
        percent_encoding::percent_decode_str(vhost)
            .decode_utf8_lossy()
            .into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vhost_is_read_from_the_amqp_url() {
        assert_eq!(vhost_of("amqp://guest:guest@127.0.0.1:5672/%2f"), "/");
        assert_eq!(vhost_of("amqp://guest:guest@127.0.0.1:5672"), "/");
        assert_eq!(vhost_of("amqp://u:p@rabbit:5672/events"), "events");
        assert_eq!(vhost_of("amqp://u:p@rabbit:5672/a%2Fb"), "a/b");
    }

    #[test]
    fn bad_management_urls_are_refused_with_a_reason() {
        assert!(matches!(
            DepthReader::new("not a url", Duration::from_secs(1)),
            Err(DepthError::BadUrl(..))
        ));
        assert!(matches!(
            DepthReader::new("amqp://h:15671", Duration::from_secs(1)),
            Err(DepthError::BadUrl(..))
        ));
        for good in [
            "http://guest:guest@127.0.0.1:15672",
            "https://guest:guest@rabbit:15671",
        ] {
            assert!(
                DepthReader::new(good, Duration::from_secs(1)).is_ok(),
                "{good}"
            );
        }
    }

    /// A refused URL never carries its password, nor a value that is not a URL (a Secret key
    /// holding the wrong thing), into the error the operator puts in a status condition.
    #[test]
    fn refusals_do_not_echo_credentials() {
        for value in [
            "S3CRET-not-a-url",
            "ftp://guest:S3CRET@rabbit:15671",
            "http://guest:S3CRET@rabbit:notaport",
            "http://guest:S3CRET@",
        ] {
            let error = DepthReader::new(value, Duration::from_secs(1))
                .err()
                .unwrap_or_else(|| panic!("{value} refused"))
                .to_string();
            assert!(!error.contains("S3CRET"), "{error}");
        }
    }
}
