//! Plain clients for tests: one HTTP/1.1 request, and a broker URL through a proxy.

use std::net::SocketAddr;

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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the server under test");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream
        .write_all(head.as_bytes())
        .await
        .expect("write request head");
    stream.write_all(body).await.expect("write request body");
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .await
        .expect("read response");
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("HTTP status line");
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}
