//! Slow clients beside the load: connections that send the start of a request head (with
//! `head_bytes` of padding at once, when asked), then a byte a second, and never finish it;
//! each opens another connection whenever ingest closes it. ingest must answer none of them
//! with anything but a 4xx (431 once a head passes `MAX_HEADER_BYTES`), and close each once its
//! `HEADER_READ_TIMEOUT` is over; the report's peak RSS shows what the held connections cost.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What the slow clients saw.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SlowOutcome {
    /// Bytes each head started with, sent at once (the request line and padding).
    pub head_bytes: usize,
    /// Connections opened (each client opens another when ingest closes its last).
    pub opened: u64,
    /// Connections ingest closed before the load ended.
    pub closed_by_ingest: u64,
    /// Connections ingest answered with a 4xx (431 for a head past its limit).
    pub answered_4xx: u64,
    /// The longest any connection stayed open until ingest closed it, in seconds.
    pub longest_until_closed_s: f64,
    /// Answers that were not a 4xx (a slow head must never get through).
    pub answered_not_4xx: Vec<u16>,
}

impl SlowOutcome {
    pub fn ok(&self) -> bool {
        self.opened > 0 && self.answered_not_4xx.is_empty()
    }

    /// Counts a connection ingest closed, `opened` when it was.
    fn closed_after(&mut self, opened: Instant) {
        self.closed_by_ingest += 1;
        self.longest_until_closed_s = self
            .longest_until_closed_s
            .max(opened.elapsed().as_secs_f64());
    }

    fn add(&mut self, other: Self) {
        self.opened += other.opened;
        self.closed_by_ingest += other.closed_by_ingest;
        self.answered_4xx += other.answered_4xx;
        self.longest_until_closed_s = self
            .longest_until_closed_s
            .max(other.longest_until_closed_s);
        self.answered_not_4xx.extend(other.answered_not_4xx);
    }
}

/// The start of a head that never ends.
const HEAD: &[u8] = b"POST /product_events/ HTTP/1.1\r\nHost: bench\r\nX-Slow: ";

/// `clients` slow clients against `addr` until `duration` is over, each head starting with
/// `head_bytes` of padding.
pub async fn run(
    addr: SocketAddr,
    clients: usize,
    head_bytes: usize,
    duration: Duration,
) -> SlowOutcome {
    let deadline = Instant::now() + duration;
    let mut head = HEAD.to_vec();
    head.resize(HEAD.len() + head_bytes, b'a');
    let head: std::sync::Arc<[u8]> = head.into();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let head = head.clone();
            tokio::spawn(async move {
                let mut outcome = SlowOutcome::default();
                while Instant::now() < deadline {
                    one_connection(addr, &head, deadline, &mut outcome).await;
                }
                outcome
            })
        })
        .collect();
    let mut total = SlowOutcome {
        head_bytes: head.len(),
        ..SlowOutcome::default()
    };
    for task in tasks {
        if let Ok(outcome) = task.await {
            total.add(outcome);
        }
    }
    total
}

/// One connection, sending `head` and then trickling more until ingest closes it or answers,
/// or `deadline`. After an answer it waits a second, so heads past ingest's limit, answered
/// at once, do not turn into a flood of connections.
async fn one_connection(
    addr: SocketAddr,
    head: &[u8],
    deadline: Instant,
    outcome: &mut SlowOutcome,
) {
    let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else {
        // ingest is at its connection limit or gone: try again shortly.
        tokio::time::sleep(Duration::from_millis(100)).await;
        return;
    };
    outcome.opened += 1;
    let opened = Instant::now();
    if stream.write_all(head).await.is_err() {
        return outcome.closed_after(opened);
    }
    let mut answer = [0u8; 12];
    let mut read = 0;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        tokio::select! {
            got = stream.read(&mut answer[read..]) => match got {
                Ok(0) | Err(_) => return outcome.closed_after(opened),
                Ok(n) => {
                    read += n;
                    if read == answer.len() {
                        // "HTTP/1.1 431"
                        let status = std::str::from_utf8(&answer[9..12])
                            .ok()
                            .and_then(|s| s.parse().ok())
                            .unwrap_or(0);
                        if (400..500).contains(&status) {
                            outcome.answered_4xx += 1;
                        } else {
                            outcome.answered_not_4xx.push(status);
                        }
                        let left = deadline.saturating_duration_since(Instant::now());
                        tokio::time::sleep(Duration::from_secs(1).min(left)).await;
                        return;
                    }
                }
            },
            () = tokio::time::sleep(Duration::from_secs(1).min(left)) => {
                if stream.write_all(b"a").await.is_err() {
                    return outcome.closed_after(opened);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A stand-in for ingest's limits: a head past 200 bytes gets 431 at once; otherwise the
    /// connection is closed after 300 ms.
    async fn limited_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.expect("accept");
                tokio::spawn(async move {
                    let mut seen = 0;
                    let mut buf = [0u8; 1024];
                    let timeout = tokio::time::sleep(Duration::from_millis(300));
                    tokio::pin!(timeout);
                    loop {
                        tokio::select! {
                            () = &mut timeout => return,
                            n = stream.read(&mut buf) => match n {
                                Ok(0) | Err(_) => return,
                                Ok(n) => seen += n,
                            },
                        }
                        if seen > 200 {
                            let _ = stream
                                .write_all(b"HTTP/1.1 431 Request Header Fields Too Large\r\n\r\n")
                                .await;
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn short_heads_are_closed_and_long_ones_answered_without_a_flood() {
        let addr = limited_server().await;
        let short = run(addr, 2, 0, Duration::from_millis(1500)).await;
        assert!(short.ok(), "{short:?}");
        assert!(short.closed_by_ingest >= 4, "{short:?}");
        assert_eq!(short.answered_4xx, 0, "{short:?}");
        assert!(short.longest_until_closed_s < 1.0, "{short:?}");

        let long = run(addr, 2, 500, Duration::from_millis(2500)).await;
        assert!(long.ok(), "{long:?}");
        assert_eq!(long.head_bytes, HEAD.len() + 500);
        assert!(long.answered_4xx >= 2, "{long:?}");
        // A second's wait after each answer: 3 connections a client at most in 2.5 s.
        assert!(long.opened <= 6, "{long:?}");
    }
}
