//! Slow clients beside the load: connections that send a request head a byte a second and
//! never finish it, each opened again whenever ingest closes it. ingest must answer none of
//! them with anything but a 4xx, and close each once its `HEADER_READ_TIMEOUT` is over; the
//! report's peak RSS shows what the held connections cost.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What the slow clients saw.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SlowOutcome {
    /// Connections opened (each client opens another when ingest closes its last).
    pub opened: u64,
    /// Connections ingest closed before the load ended.
    pub closed_by_ingest: u64,
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
        self.longest_until_closed_s = self
            .longest_until_closed_s
            .max(other.longest_until_closed_s);
        self.answered_not_4xx.extend(other.answered_not_4xx);
    }
}

/// The start of a head that never ends.
const HEAD: &[u8] = b"POST /product_events/ HTTP/1.1\r\nHost: bench\r\nX-Slow: ";

/// `clients` slow clients against `addr` until `duration` is over.
pub async fn run(addr: SocketAddr, clients: usize, duration: Duration) -> SlowOutcome {
    let deadline = Instant::now() + duration;
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            tokio::spawn(async move {
                let mut outcome = SlowOutcome::default();
                while Instant::now() < deadline {
                    one_connection(addr, deadline, &mut outcome).await;
                }
                outcome
            })
        })
        .collect();
    let mut total = SlowOutcome::default();
    for task in tasks {
        if let Ok(outcome) = task.await {
            total.add(outcome);
        }
    }
    total
}

/// One connection, trickling its head until ingest closes it or answers, or `deadline`.
async fn one_connection(addr: SocketAddr, deadline: Instant, outcome: &mut SlowOutcome) {
    let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else {
        // ingest is at its connection limit or gone: try again shortly.
        tokio::time::sleep(Duration::from_millis(100)).await;
        return;
    };
    outcome.opened += 1;
    let opened = Instant::now();
    if stream.write_all(HEAD).await.is_err() {
        return;
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
                        if !(400..500).contains(&status) {
                            outcome.answered_not_4xx.push(status);
                        }
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
