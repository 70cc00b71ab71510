//! Plain clients for tests: one HTTP/1.1 request (over TLS too), and a broker URL through a
//! proxy.

use std::net::SocketAddr;
use std::path::Path;

use rustls::pki_types::ServerName;

/// `amqp://` URL of a proxy in front of the local RabbitMQ.
pub fn amqp_url_via(proxy: SocketAddr) -> String {
    format!("amqp://guest:guest@{proxy}/%2f")
}

/// One HTTP/1.1 request over a fresh connection (`Connection: close`); returns the status
/// code and body. Enough for end-to-end tests against a real listening server.
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    content_type: &str,
    body: &[u8],
) -> (u16, String) {
    let answer = http_exchange(addr, method, path, &[("Content-Type", content_type)], body).await;
    (answer.status, answer.body)
}

/// [`http_request`] POSTing a JSON `body` to `path`: how clients send events.
pub async fn post_json(addr: SocketAddr, path: &str, body: &[u8]) -> (u16, String) {
    http_request(addr, "POST", path, "application/json", body).await
}

/// [`post_json`] over TLS to a server whose certificate names `localhost`, trusting what the
/// services trust with `TLS_CA_FILE=ca_file` (the system's roots and that CA); `Err` when the
/// connection or the handshake fails (the server's certificate is not that CA's).
pub async fn post_json_https(
    addr: SocketAddr,
    ca_file: &Path,
    body: &[u8],
) -> Result<Answer, String> {
    let tls = connect_https(addr, ca_file).await?;
    let headers = [("Content-Type", "application/json")];
    Ok(exchange_over(tls, "localhost", "POST", "/product_events/", &headers, body).await)
}

/// A TLS connection to a server whose certificate names `localhost`, handshake done, trusting
/// what the services trust with `TLS_CA_FILE=ca_file`; `Err` when the connection or the
/// handshake fails.
pub async fn connect_https(
    addr: SocketAddr,
    ca_file: &Path,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    let trust = dedup_runtime::tls::TlsArgs {
        tls_ca_file: Some(ca_file.to_owned()),
    };
    let config = trust.client_config().expect("the CA file loads");
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let name = ServerName::try_from("localhost").expect("name");
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())
}

/// An HTTP answer: status, headers (names lower-cased) and body.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Answer {
    /// The first value of header `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// [`http_request`] with any request headers, answering the response headers too.
pub async fn http_exchange(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Answer {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the server under test");
    exchange_over(stream, &addr.to_string(), method, path, headers, body).await
}

/// One request over an open stream (plain TCP or TLS).
pub async fn exchange_over<S>(
    mut stream: S,
    host: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Answer
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    ));
    stream
        .write_all(head.as_bytes())
        .await
        .expect("write request head");
    stream.write_all(body).await.expect("write request body");
    let mut response = Vec::new();
    // A TLS peer may close without close_notify once it has answered; what arrived counts.
    let _ = stream.read_to_end(&mut response).await;
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status line in {text:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Answer {
        status,
        headers,
        body: body.to_owned(),
    }
}
