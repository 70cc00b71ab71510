//! A TCP proxy in front of a real service. Code under test connects through it; the test
//! cuts it to make the service "go away" (live connections reset, new ones refused), hangs
//! it (connections stay open and nothing passes, as behind a dead router), and restores it,
//! or pauses it (bytes wait in the proxy, as behind a slow link) and resumes it, or stalls the
//! one connection that sends a given request (as a broker that hangs mid-conversation) —
//! without touching the shared service other tests use.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The body of an AMQP 0-9-1 `channel.open` method frame as it follows the frame's type and
/// channel number: its size (5), class 20 (channel), method 10 (open). For
/// [`Proxy::stall_on`]: a client's first channel, right after the connection's handshake.
pub const AMQP_CHANNEL_OPEN: &[u8] = &[0, 0, 0, 5, 0, 20, 0, 10];

/// The class and method of an AMQP 0-9-1 `basic.consume` method frame: class 60 (basic),
/// method 20 (consume). Its size varies with the queue's name and the consumer tag, so it is
/// left out. For [`Proxy::stall_on`]: the last step of a consumer's setup.
pub const AMQP_BASIC_CONSUME: &[u8] = &[0, 60, 0, 20];

/// A running proxy; dropping it stops it.
pub struct Proxy {
    addr: SocketAddr,
    state: Arc<State>,
    stop: CancellationToken,
}

struct State {
    upstream: SocketAddr,
    open: AtomicBool,
    /// While set, connections are held open and silent instead of forwarded.
    hanging: AtomicBool,
    /// Sockets held silent while hanging; dropped (closed) by `restore`.
    held: Mutex<Vec<TcpStream>>,
    /// Cancelled by `cut` to end every live connection; replaced by `restore`.
    live: Mutex<CancellationToken>,
    /// While true, bytes read from either side are held until [`Proxy::resume`].
    paused: watch::Sender<bool>,
    /// Set by [`Proxy::stall_on`]: the bytes whose sending stalls a connection, once.
    stall_on: Mutex<Option<Vec<u8>>>,
    /// How many connections [`Proxy::stall_on`] has stalled.
    stalled: AtomicUsize,
}

impl Proxy {
    /// Starts a proxy on an ephemeral loopback port forwarding to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port for the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let state = Arc::new(State {
            upstream,
            open: AtomicBool::new(true),
            hanging: AtomicBool::new(false),
            held: Mutex::new(Vec::new()),
            live: Mutex::new(CancellationToken::new()),
            paused: watch::Sender::new(false),
            stall_on: Mutex::new(None),
            stalled: AtomicUsize::new(0),
        });
        let stop = CancellationToken::new();
        tokio::spawn(accept_loop(listener, state.clone(), stop.clone()));
        Self { addr, state, stop }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Resets every live connection and refuses new ones until [`Proxy::restore`].
    pub fn cut(&self) {
        self.state.open.store(false, Ordering::SeqCst);
        self.state.hanging.store(false, Ordering::SeqCst);
        self.state.live.lock().expect("proxy lock").cancel();
        for socket in self.state.held.lock().expect("proxy lock").drain(..) {
            let _ = socket.set_zero_linger();
        }
    }

    /// Stops forwarding without closing anything: live connections stay open and silent,
    /// new ones are accepted and never answered, until [`Proxy::restore`].
    pub fn hang(&self) {
        self.state.hanging.store(true, Ordering::SeqCst);
        self.state.live.lock().expect("proxy lock").cancel();
    }

    /// Accepts and forwards connections again; connections held by [`Proxy::hang`] are closed.
    pub fn restore(&self) {
        *self.state.live.lock().expect("proxy lock") = CancellationToken::new();
        self.state.hanging.store(false, Ordering::SeqCst);
        self.state.held.lock().expect("proxy lock").clear();
        self.state.open.store(true, Ordering::SeqCst);
    }

    /// Holds every byte in the proxy, both ways, until [`Proxy::resume`]: connections stay
    /// up and nothing is lost, as over a link that stalls for a while.
    pub fn pause(&self) {
        self.state.paused.send_replace(true);
    }

    /// Forwards what [`Proxy::pause`] held, and everything after it.
    pub fn resume(&self) {
        self.state.paused.send_replace(false);
    }

    /// The next connection whose client sends `request` (within one read) stops there: that
    /// read and everything after it, both ways, is never forwarded, and the connection stays
    /// open, as with a server that hangs before answering. Only that one connection; the
    /// others, and later ones, pass as before.
    pub fn stall_on(&self, request: &[u8]) {
        *self.state.stall_on.lock().expect("proxy lock") = Some(request.to_vec());
    }

    /// How many connections [`Proxy::stall_on`] has stalled so far.
    pub fn stalled(&self) -> usize {
        self.state.stalled.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
        self.state.live.lock().map(|t| t.cancel()).ok();
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<State>, stop: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((client, _)) = accepted else { continue };
        if !state.open.load(Ordering::SeqCst) {
            // Refused: close at once (with a reset, as a dead host's port would).
            let _ = client.set_zero_linger();
            drop(client);
            continue;
        }
        if state.hanging.load(Ordering::SeqCst) {
            state.held.lock().expect("proxy lock").push(client);
            continue;
        }
        let live = state.live.lock().expect("proxy lock").clone();
        let upstream = state.upstream;
        let state = state.clone();
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(upstream).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (mut client_read, mut client_write) = client.into_split();
            let (mut server_read, mut server_write) = server.into_split();
            let stalled = AtomicBool::new(false);
            let cancelled = {
                let up = pump(
                    &mut client_read,
                    &mut server_write,
                    state.paused.subscribe(),
                    &stalled,
                    Some(&state),
                );
                let down = pump(
                    &mut server_read,
                    &mut client_write,
                    state.paused.subscribe(),
                    &stalled,
                    None,
                );
                tokio::select! {
                    () = live.cancelled() => true,
                    _ = futures::future::try_join(up, down) => false,
                }
            };
            let (Ok(client), Ok(server)) = (
                client_read.reunite(client_write),
                server_read.reunite(server_write),
            ) else {
                return;
            };
            if !cancelled {
                return;
            }
            if state.hanging.load(Ordering::SeqCst) {
                state
                    .held
                    .lock()
                    .expect("proxy lock")
                    .extend([client, server]);
            } else {
                let _ = client.set_zero_linger();
                let _ = server.set_zero_linger();
            }
        });
    }
}

/// Copies one direction until end of stream (then shuts the other side's writing down), each
/// chunk only while the proxy is not paused and the connection not `stalled`. `watch` is given
/// for the client's direction: a chunk there holding [`Proxy::stall_on`]'s request sets
/// `stalled`, which both directions share.
async fn pump(
    from: &mut OwnedReadHalf,
    to: &mut OwnedWriteHalf,
    mut paused: watch::Receiver<bool>,
    stalled: &AtomicBool,
    watch: Option<&State>,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        if let Some(state) = watch {
            let mut stall_on = state.stall_on.lock().expect("proxy lock");
            let hit = stall_on
                .as_deref()
                .is_some_and(|request| buf[..n].windows(request.len()).any(|w| w == request));
            if hit {
                *stall_on = None;
                stalled.store(true, Ordering::SeqCst);
                state.stalled.fetch_add(1, Ordering::SeqCst);
            }
        }
        // The sender lives as long as the proxy; without it there is nothing left to wait for.
        let _ = paused.wait_for(|paused| !*paused).await;
        if stalled.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        to.write_all(&buf[..n]).await?;
    }
}
