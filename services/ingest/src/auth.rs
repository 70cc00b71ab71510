//! Who may send events, and how fast.
//!
//! **Write keys.** Each client app (a *source*) sends a random key in `Authorization: Bearer`
//! or `X-API-Key`. ingest holds only each key's SHA-256 hash, from a YAML file it reads again
//! whenever the file changes (a Kubernetes Secret volume is updated in place), so keys are
//! issued, rotated and revoked without a restart. A presented key is hashed and compared with
//! every known hash in constant time. The key's source travels with each event to the database
//! and labels the event counters. `AUTH=none` accepts anyone, as the original service did.
//!
//! **Rate limits.** Token buckets (`governor`): events per second per key (a default, and
//! per-key overrides in the key file) and requests per second per client address. The client
//! address is the TCP peer, or the `X-Forwarded-For` entry a trusted proxy added when the peer
//! is one of `TRUSTED_PROXIES`.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use axum::extract::ConnectInfo;
use axum::http::{HeaderMap, header};
use base64::Engine;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use ipnet::IpNet;
use prometheus::IntCounter;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::metrics::Metrics;

/// Who may send events (`AUTH`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthMode {
    /// Only requests with a write key from the key file.
    Keys,
    /// Anyone who reaches the port (the original service's open contract).
    None,
}

/// The label value and the stored source of events taken with `AUTH=none`.
pub const ANONYMOUS: &str = "anonymous";

/// The longest key looked at: longer ones are refused unread.
const MAX_KEY_BYTES: usize = 256;

/// Prefix of the keys `ingest write-key` makes, so they are recognisable in a leak scan.
const KEY_PREFIX: &str = "dk_";

/// A token bucket: `rate` per second, at most `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub per_second: u32,
    /// 0: twice the rate.
    pub burst: u32,
}

impl Rate {
    /// The bucket's quota; `None` when the rate is 0 (no limit).
    fn quota(self) -> Option<Quota> {
        let rate = NonZeroU32::new(self.per_second)?;
        let burst = NonZeroU32::new(self.burst)
            .unwrap_or_else(|| rate.saturating_mul(NonZeroU32::MIN.saturating_add(1)));
        Some(Quota::per_second(rate).allow_burst(burst))
    }
}

/// The key file: `keys:` a list of sources and their keys' hashes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    keys: Vec<KeyLine>,
}

/// One key: its source, the SHA-256 of the key (hex), and optionally its own rate limit
/// (events per second; 0 means none) and burst.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyLine {
    source: String,
    sha256: String,
    rate: Option<u32>,
    burst: Option<u32>,
}

/// Who sent a request: the key's source (none with `AUTH=none`), its rate limiter and its
/// event counters, resolved once when the key is loaded.
pub struct Caller {
    pub source: Option<Arc<str>>,
    limiter: Option<DefaultDirectRateLimiter>,
    /// The limiter's burst: no request may carry more events than this.
    burst: u32,
    rate: Rate,
    pub accepted: IntCounter,
    pub rejected: IntCounter,
    /// `rate_limited{limit="key"}`.
    limited: IntCounter,
}

impl Caller {
    fn new(source: Option<&str>, rate: Rate, metrics: &Metrics) -> Self {
        let label = source.unwrap_or(ANONYMOUS);
        let quota = rate.quota();
        Self {
            source: source.map(Arc::from),
            limiter: quota.map(RateLimiter::direct),
            burst: quota.map_or(u32::MAX, |q| q.burst_size().get()),
            rate,
            accepted: metrics.events.with_label_values(&["accepted", label]),
            rejected: metrics.events.with_label_values(&["rejected", label]),
            limited: metrics.rate_limited.with_label_values(&["key"]),
        }
    }

    /// Takes `events` from the key's bucket: `Err` with 429 and when to retry when it is empty,
    /// 413 when more than the whole burst is asked for at once.
    pub fn take(&self, events: usize) -> Result<(), Error> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        let n = u32::try_from(events)
            .ok()
            .and_then(NonZeroU32::new)
            .unwrap_or(NonZeroU32::MIN);
        match limiter.check_n(n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => {
                self.limited.inc();
                Err(Error::RateLimited {
                    scope: "write key",
                    retry_after: not_until.wait_time_from(DefaultClock::default().now()),
                })
            }
            Err(_) => Err(Error::OverBurst {
                events,
                burst: self.burst,
            }),
        }
    }
}

/// The loaded keys.
struct Keys {
    /// Each key's hash and caller; a source may have several keys (during a rotation).
    keys: Vec<([u8; 32], Arc<Caller>)>,
}

impl Keys {
    /// Parses a key file. Keys whose hash and rate are unchanged from `previous` keep their
    /// caller, so a reload does not refill their buckets.
    fn parse(
        text: &[u8],
        default_rate: Rate,
        metrics: &Metrics,
        previous: Option<&Keys>,
    ) -> anyhow::Result<Self> {
        let file: KeyFile = serde_yaml::from_slice(text).context(
            "it must be YAML of the form `keys: [{source: NAME, sha256: HEX}, …]` (rate and burst optional)",
        )?;
        let mut keys = Vec::with_capacity(file.keys.len());
        for (i, line) in file.keys.into_iter().enumerate() {
            let entry = i + 1;
            anyhow::ensure!(
                dedup_message::message::is_source_name(&line.source),
                "key {entry}: source {:?} is not a source name (1-64 letters, digits, '_', '-' or '.', starting with a letter or digit)",
                line.source
            );
            let mut hash = [0u8; 32];
            hex::decode_to_slice(line.sha256.trim(), &mut hash).map_err(|_| {
                anyhow::anyhow!(
                    "key {entry} ({}): sha256 must be 64 hex digits, the SHA-256 of the key (`ingest write-key` prints it)",
                    line.source
                )
            })?;
            anyhow::ensure!(
                keys.iter().all(|(h, _)| h != &hash),
                "key {entry} ({}): the same key is listed twice",
                line.source
            );
            let rate = Rate {
                per_second: line.rate.unwrap_or(default_rate.per_second),
                burst: line.burst.unwrap_or(if line.rate.is_some() {
                    0
                } else {
                    default_rate.burst
                }),
            };
            let kept = previous.and_then(|p| {
                p.keys.iter().find(|(h, c)| {
                    h == &hash && c.rate == rate && c.source.as_deref() == Some(&line.source)
                })
            });
            let caller = match kept {
                Some((_, caller)) => caller.clone(),
                None => Arc::new(Caller::new(Some(&line.source), rate, metrics)),
            };
            keys.push((hash, caller));
        }
        Ok(Self { keys })
    }

    /// The caller whose key is `presented`. Every known hash is compared, in constant time.
    fn find(&self, presented: &[u8]) -> Option<Arc<Caller>> {
        let digest: [u8; 32] = Sha256::digest(presented).into();
        let mut found = None;
        for (hash, caller) in &self.keys {
            if bool::from(hash.ct_eq(&digest)) {
                found = Some(caller);
            }
        }
        found.cloned()
    }
}

/// Settings of the [`Guard`].
#[derive(Debug, Clone)]
pub struct GuardSettings {
    pub mode: AuthMode,
    pub keys_path: Option<PathBuf>,
    pub reload_interval: Duration,
    pub key_rate: Rate,
    pub address_rate: Rate,
    pub trusted_proxies: Vec<IpNet>,
}

/// Checks every event request: the client address's rate, then the write key.
pub struct Guard {
    settings: GuardSettings,
    /// `None` with `AUTH=none`.
    keys: Option<RwLock<Arc<Keys>>>,
    /// The caller of every request with `AUTH=none`.
    anonymous: Arc<Caller>,
    addresses: Option<DefaultKeyedRateLimiter<IpAddr>>,
    metrics: Metrics,
}

impl Guard {
    /// Loads the key file (with `AUTH=keys`); an unreadable or invalid file is an error that
    /// says what to fix.
    pub fn new(settings: GuardSettings, metrics: &Metrics) -> anyhow::Result<Arc<Self>> {
        let keys = match settings.mode {
            AuthMode::None => None,
            AuthMode::Keys => {
                let path = settings.keys_path.as_deref().context(
                    "AUTH=keys needs WRITE_KEYS_PATH, the file of write keys (make one with \
                     `ingest write-key --source NAME`); or set AUTH=none to take events from anyone",
                )?;
                let keys = Keys::parse(&read(path)?, settings.key_rate, metrics, None)
                    .with_context(|| format!("the write key file {} is invalid", path.display()))?;
                metrics.write_keys.set(keys.keys.len() as i64);
                Some(RwLock::new(Arc::new(keys)))
            }
        };
        Ok(Arc::new(Self {
            anonymous: Arc::new(Caller::new(None, settings.key_rate, metrics)),
            addresses: settings.address_rate.quota().map(RateLimiter::keyed),
            keys,
            settings,
            metrics: metrics.clone(),
        }))
    }

    /// Re-reads the key file every `reload_interval` and takes it when it changed and is
    /// valid (an invalid one is logged and counted; the keys in use stay); forgets idle
    /// client addresses. Runs until `stop`.
    pub async fn watch(self: Arc<Self>, stop: CancellationToken) {
        let mut last = self
            .settings
            .keys_path
            .as_deref()
            .and_then(|p| std::fs::read(p).ok());
        let mut tick = tokio::time::interval(self.settings.reload_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Some(addresses) = &self.addresses {
                addresses.retain_recent();
                addresses.shrink_to_fit();
            }
            let (Some(lock), Some(path)) = (&self.keys, self.settings.keys_path.as_deref()) else {
                continue;
            };
            let text = match read(path) {
                Ok(text) if last.as_ref() == Some(&text) => continue,
                Ok(text) => text,
                Err(e) => {
                    self.reload_failed(&e);
                    continue;
                }
            };
            let previous = lock.read().unwrap_or_else(|e| e.into_inner()).clone();
            match Keys::parse(
                &text,
                self.settings.key_rate,
                &self.metrics,
                Some(&previous),
            ) {
                Ok(keys) => {
                    tracing::info!(keys = keys.keys.len(), path = %path.display(), "Write keys reloaded.");
                    self.metrics.write_keys.set(keys.keys.len() as i64);
                    self.metrics.key_reloads.with_label_values(&["ok"]).inc();
                    *lock.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(keys);
                    last = Some(text);
                }
                Err(e) => {
                    self.reload_failed(&e.context(format!("{} is invalid", path.display())));
                    last = Some(text);
                }
            }
        }
    }

    fn reload_failed(&self, error: &anyhow::Error) {
        tracing::error!(error = %format!("{error:#}"), "Write keys not reloaded; the keys in use stay. Fix the file.");
        self.metrics.key_reloads.with_label_values(&["error"]).inc();
    }

    /// Admits a request or says why not: 429 when its address is over its rate, 401 without
    /// a valid key.
    pub fn admit(
        &self,
        headers: &HeaderMap,
        peer: Option<&ConnectInfo<SocketAddr>>,
    ) -> Result<Arc<Caller>, Error> {
        if let Some(addresses) = &self.addresses
            && let Some(address) = client_address(
                peer.map(|p| p.0.ip()),
                headers,
                &self.settings.trusted_proxies,
            )
            && let Err(not_until) = addresses.check_key(&address)
        {
            self.metrics
                .rate_limited
                .with_label_values(&["address"])
                .inc();
            return Err(Error::RateLimited {
                scope: "client address",
                retry_after: not_until.wait_time_from(DefaultClock::default().now()),
            });
        }
        let Some(lock) = &self.keys else {
            return Ok(self.anonymous.clone());
        };
        let Some(presented) = presented_key(headers) else {
            self.metrics
                .auth_failures
                .with_label_values(&["missing"])
                .inc();
            return Err(Error::Unauthorized(
                "Authentication credentials were not provided. Send your write key as \
                 `Authorization: Bearer <key>` or `X-API-Key: <key>`.",
            ));
        };
        let keys = lock.read().unwrap_or_else(|e| e.into_inner()).clone();
        match keys.find(presented) {
            Some(caller) => Ok(caller),
            None => {
                self.metrics
                    .auth_failures
                    .with_label_values(&["invalid"])
                    .inc();
                Err(Error::Unauthorized("Invalid write key."))
            }
        }
    }
}

fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| {
        format!(
            "cannot read the write key file {} (WRITE_KEYS_PATH)",
            path.display()
        )
    })
}

/// The key a request presents: `Authorization: Bearer <key>`, else `X-API-Key`. Empty or
/// overlong values present none.
fn presented_key(headers: &HeaderMap) -> Option<&[u8]> {
    let bearer = headers.get(header::AUTHORIZATION).and_then(|v| {
        let v = v.as_bytes();
        let (scheme, rest) = v.split_at_checked(7)?;
        scheme
            .eq_ignore_ascii_case(b"bearer ")
            .then_some(rest.trim_ascii())
    });
    let key = bearer.or_else(|| headers.get("x-api-key").map(|v| v.as_bytes().trim_ascii()))?;
    (!key.is_empty() && key.len() <= MAX_KEY_BYTES).then_some(key)
}

/// The client's address: the TCP peer, unless the peer is a trusted proxy; then the last
/// `X-Forwarded-For` entry no trusted proxy added (proxies append the address they saw, so
/// entries left of an untrusted one may be forged). `None` without a peer (in-process tests).
pub fn client_address(
    peer: Option<IpAddr>,
    headers: &HeaderMap,
    trusted: &[IpNet],
) -> Option<IpAddr> {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    let mut client = peer?.to_canonical();
    if !is_trusted(&client) {
        return Some(client);
    }
    let values: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .map(|v| v.to_str().unwrap_or(""))
        .collect();
    for entry in values.iter().rev().flat_map(|v| v.rsplit(',')) {
        let entry = entry.trim();
        let Some(ip) = entry
            .parse::<IpAddr>()
            .ok()
            .or_else(|| entry.parse::<SocketAddr>().ok().map(|s| s.ip()))
        else {
            // Garbage: the proxy that appended it is not one of ours; stop at the last good one.
            break;
        };
        client = ip.to_canonical();
        if !is_trusted(&client) {
            break;
        }
    }
    Some(client)
}

/// A new write key for `source` and the line that lists it in the key file.
pub fn new_key(source: &str) -> anyhow::Result<(String, String)> {
    anyhow::ensure!(
        dedup_message::message::is_source_name(source),
        "{source:?} is not a source name: use 1-64 letters, digits, '_', '-' or '.', starting \
         with a letter or digit"
    );
    let key = format!(
        "{KEY_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>())
    );
    let hash = hex::encode(Sha256::digest(key.as_bytes()));
    let line = format!("  - source: {source}\n    sha256: {hash}\n");
    Ok((key, line))
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    /// A peer that is not a trusted proxy is the client, whatever it claims to forward for.
    #[test]
    fn untrusted_peers_are_the_client() {
        let forged = headers(&[("x-forwarded-for", "1.2.3.4")]);
        assert_eq!(
            client_address(ip("9.9.9.9"), &forged, &nets(&["10.0.0.0/8"])),
            ip("9.9.9.9")
        );
        assert_eq!(client_address(ip("10.0.0.5"), &forged, &[]), ip("10.0.0.5"));
        assert_eq!(client_address(None, &forged, &[]), None);
    }

    /// Behind trusted proxies the client is the last entry none of them added; what the client
    /// itself put in front is ignored.
    #[test]
    fn trusted_proxies_name_the_client() {
        let trusted = nets(&["10.0.0.0/8", "fd00::/8"]);
        let h = headers(&[("x-forwarded-for", "6.6.6.6, 5.5.5.5, 10.1.1.1")]);
        assert_eq!(client_address(ip("10.0.0.2"), &h, &trusted), ip("5.5.5.5"));
        // Two headers are one list, in order.
        let h = headers(&[
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-for", "5.5.5.5:4711"),
        ]);
        assert_eq!(client_address(ip("10.0.0.2"), &h, &trusted), ip("5.5.5.5"));
        // Only proxies in the chain: the first of them.
        let h = headers(&[("x-forwarded-for", "10.2.2.2, 10.1.1.1")]);
        assert_eq!(client_address(ip("10.0.0.2"), &h, &trusted), ip("10.2.2.2"));
        // Garbage stops the walk at the last good address.
        let h = headers(&[("x-forwarded-for", "5.5.5.5, bogus, 10.1.1.1")]);
        assert_eq!(client_address(ip("10.0.0.2"), &h, &trusted), ip("10.1.1.1"));
        // No header: the proxy itself.
        assert_eq!(
            client_address(ip("10.0.0.2"), &HeaderMap::new(), &trusted),
            ip("10.0.0.2")
        );
        // IPv4-mapped IPv6 peers are their IPv4 address.
        assert_eq!(
            client_address(
                ip("::ffff:10.0.0.2"),
                &headers(&[("x-forwarded-for", "7.7.7.7")]),
                &trusted
            ),
            ip("7.7.7.7")
        );
    }

    #[test]
    fn keys_come_from_bearer_or_x_api_key() {
        assert_eq!(
            presented_key(&headers(&[("authorization", "Bearer abc")])),
            Some(&b"abc"[..])
        );
        assert_eq!(
            presented_key(&headers(&[("authorization", "bearer  abc ")])),
            Some(&b"abc"[..])
        );
        assert_eq!(
            presented_key(&headers(&[("x-api-key", "xyz")])),
            Some(&b"xyz"[..])
        );
        assert_eq!(
            presented_key(&headers(&[("authorization", "Basic abc")])),
            None
        );
        assert_eq!(
            presented_key(&headers(&[("authorization", "Bearer ")])),
            None
        );
        let long = "k".repeat(MAX_KEY_BYTES + 1);
        assert_eq!(presented_key(&headers(&[("x-api-key", &long)])), None);
        assert_eq!(presented_key(&HeaderMap::new()), None);
    }

    /// A new key is found by its printed line, under its source; other keys are not.
    #[test]
    fn new_keys_are_found_by_their_line() {
        let metrics = Metrics::new();
        let (key, line) = new_key("web").unwrap();
        let (other, other_line) = new_key("ios").unwrap();
        assert!(key.starts_with(KEY_PREFIX) && key.len() > 40, "{key}");
        let text = format!("keys:\n{line}{other_line}");
        let keys = Keys::parse(
            text.as_bytes(),
            Rate {
                per_second: 0,
                burst: 0,
            },
            &metrics,
            None,
        )
        .unwrap();
        assert_eq!(
            keys.find(key.as_bytes()).unwrap().source.as_deref(),
            Some("web")
        );
        assert_eq!(
            keys.find(other.as_bytes()).unwrap().source.as_deref(),
            Some("ios")
        );
        assert!(keys.find(b"dk_guess").is_none());
        assert!(new_key("no spaces").is_err());
    }

    /// Each mistake in a key file is named, with the entry it is in.
    #[test]
    fn bad_key_files_say_what_is_wrong() {
        let metrics = Metrics::new();
        let none = Rate {
            per_second: 0,
            burst: 0,
        };
        let hash = "a".repeat(64);
        let cases = [
            ("keys: nope", "YAML of the form"),
            ("keys:\n  - source: web\n    sha: x", "YAML of the form"),
            (
                "keys:\n  - source: 'a b'\n    sha256: x",
                "key 1: source \"a b\"",
            ),
            (
                "keys:\n  - source: web\n    sha256: abc",
                "key 1 (web): sha256 must be 64 hex",
            ),
            (
                &format!(
                    "keys:\n  - {{source: a, sha256: {hash}}}\n  - {{source: b, sha256: {hash}}}"
                ),
                "key 2 (b): the same key is listed twice",
            ),
        ];
        for (text, expected) in cases {
            let error = Keys::parse(text.as_bytes(), none, &metrics, None)
                .err()
                .unwrap();
            let error = format!("{error:#}");
            assert!(error.contains(expected), "{text}: {error}");
        }
    }

    /// Per-key rates override the default; a reload keeps the bucket of an unchanged key and
    /// starts a new one for a changed rate.
    #[test]
    fn key_rates_and_reloads() {
        let metrics = Metrics::new();
        let default = Rate {
            per_second: 1,
            burst: 3,
        };
        let (_, web) = new_key("web").unwrap();
        let (_, ios) = new_key("ios").unwrap();
        let ios_fast = format!("{}    rate: 100\n", ios);
        let keys = Keys::parse(
            format!("keys:\n{web}{ios_fast}").as_bytes(),
            default,
            &metrics,
            None,
        )
        .unwrap();
        let (web_caller, ios_caller) = (keys.keys[0].1.clone(), keys.keys[1].1.clone());
        assert_eq!((web_caller.burst, ios_caller.burst), (3, 200));
        for _ in 0..3 {
            web_caller.take(1).unwrap();
        }
        match web_caller.take(1) {
            Err(Error::RateLimited { retry_after, .. }) => {
                assert!(
                    retry_after > Duration::from_millis(500)
                        && retry_after <= Duration::from_secs(1),
                    "{retry_after:?}"
                )
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            web_caller.take(4),
            Err(Error::OverBurst {
                events: 4,
                burst: 3
            })
        ));

        let reloaded = Keys::parse(
            format!("keys:\n{web}{ios}").as_bytes(),
            default,
            &metrics,
            Some(&keys),
        )
        .unwrap();
        assert!(
            Arc::ptr_eq(&reloaded.keys[0].1, &web_caller),
            "unchanged key keeps its bucket"
        );
        assert!(
            !Arc::ptr_eq(&reloaded.keys[1].1, &ios_caller),
            "changed rate, new bucket"
        );
        assert!(
            reloaded.keys[0].1.take(1).is_err(),
            "the bucket stayed empty"
        );
    }
}
