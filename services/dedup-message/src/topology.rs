//! The exchanges and queues of the pipeline, declared the same way by ingest and the worker.
//!
//! A durable direct exchange routes to a durable queue (quorum by default: replicated in a
//! cluster, with a delivery limit that dead-letters poison messages). The queue dead-letters to
//! a second exchange and queue, where the worker also sends events it cannot accept.
//!
//! Past what one queue carries, the queue is split into shards (`AMQP_QUEUE_SHARDS`): shard 0
//! keeps the queue's own name, shard `i` is named `<queue>.<i>`, each bound with its own name
//! as routing key and all dead-lettering to the one dead-letter queue. ingest routes every
//! event by its dedup key ([`shard_of`]), so every copy of an event goes to one shard, and every
//! worker consumes all of them.

use clap::{Args, ValueEnum};
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, ExchangeKind};

/// Which RabbitMQ queue type the main and dead-letter queues use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum QueueType {
    /// Replicated, durable, with a delivery limit for poison messages (recommended).
    Quorum,
    /// A single-node queue, for brokers without quorum queue support.
    Classic,
}

/// The broker connection and queue names.
#[derive(Debug, Clone, Args)]
pub struct AmqpArgs {
    /// RabbitMQ URL (`amqp://user:password@host:port/vhost`, the default vhost is `%2f`).
    #[arg(
        long,
        env = "RABBITMQ_URL",
        hide_env_values = true,
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub rabbitmq_url: dedup_runtime::secret::SecretUrl,
    #[command(flatten)]
    pub topology: Topology,
}

/// Connects to RabbitMQ at `url`. An `amqps://` URL is verified against the system's trusted
/// roots and `ca_pem`, the PEM text of `TLS_CA_FILE` (`dedup_runtime::tls::TlsArgs::ca_pem`).
pub async fn connect(url: &str, ca_pem: Option<&str>) -> lapin::Result<lapin::Connection> {
    let tls = lapin::tcp::OwnedTLSConfig {
        identity: None,
        cert_chain: ca_pem.map(str::to_owned),
    };
    lapin::DefaultConnectionBuilder::new()?
        .with_uri_str(url.to_owned())
        .with_properties(lapin::ConnectionProperties::default())
        .with_tls_config(tls)
        .connect()
        .await
}

/// How long connecting to the broker may take, and then, separately, the setup on the new
/// connection (its channels, declaring the topology, qos, consuming). A broker that hangs
/// part-way never answers; without a bound the reconnection would wait for the client to miss
/// its heartbeats (two intervals, two minutes at RabbitMQ's default), publishing or consuming
/// nothing meanwhile.
pub const SETUP_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// How long closing a connection or channel (or cancelling a consumer) may wait for the
/// broker's answer. A broker that hangs never answers, and a wait on it would outlast the
/// pod's grace period (SIGKILL comes 5 s after SHUTDOWN_GRACE) or stall a reconnection; the
/// close is then abandoned, and the socket goes with the process or the dropped connection.
pub const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Closes `connection` with `code` and `text`, waiting at most [`CLOSE_WAIT`] for the broker.
pub async fn close_connection(connection: &lapin::Connection, code: u16, text: &str) {
    let _ = tokio::time::timeout(CLOSE_WAIT, connection.close(code, text.into())).await;
}

/// Closes `channel` with `code` and `text`, waiting at most [`CLOSE_WAIT`] for the broker.
pub async fn close_channel(channel: &lapin::Channel, code: u16, text: &str) {
    let _ = tokio::time::timeout(CLOSE_WAIT, channel.close(code, text.into())).await;
}

/// Names and shape of the queues. Both binaries must agree on these.
#[derive(Debug, Clone, Args)]
pub struct Topology {
    /// Exchange ingest publishes to.
    #[arg(long, env = "AMQP_EXCHANGE", default_value = "product_events")]
    pub exchange: String,
    /// Queue the workers consume from (bound to the exchange with its own name as routing key).
    #[arg(long, env = "AMQP_QUEUE", default_value = "product_events")]
    pub queue: String,
    /// Exchange for messages the pipeline cannot process (default: AMQP_QUEUE + `.dlx`).
    #[arg(long = "dead-letter-exchange", env = "AMQP_DEAD_LETTER_EXCHANGE")]
    pub dead_letter_exchange_name: Option<String>,
    /// Queue that keeps dead-lettered messages for inspection (default: AMQP_QUEUE + `.dlq`).
    #[arg(long = "dead-letter-queue", env = "AMQP_DEAD_LETTER_QUEUE")]
    pub dead_letter_queue_name: Option<String>,
    /// Queue type of both queues.
    #[arg(long, env = "AMQP_QUEUE_TYPE", value_enum, default_value = "quorum")]
    pub queue_type: QueueType,
    /// Deliveries after which a message that keeps failing is dead-lettered (quorum queues).
    #[arg(long, env = "AMQP_DELIVERY_LIMIT", default_value_t = 20)]
    pub delivery_limit: u32,
    /// Queues the events are spread over by their dedup key (AMQP_QUEUE, then AMQP_QUEUE.1 …),
    /// each consumed by every worker: past one queue leader's message rate. ingest and the
    /// workers must agree on it. Lowering it leaves the queues past the new count unconsumed:
    /// let them drain first.
    #[arg(long, env = "AMQP_QUEUE_SHARDS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=i64::from(MAX_SHARDS)))]
    pub shards: u16,
}

/// The most shards a queue may be split into (`AMQP_QUEUE_SHARDS`, the resource's `shards`).
pub const MAX_SHARDS: u16 = 1024;

/// The queue of shard `shard` of `queue`: the queue's own name for shard 0 (so one shard is the
/// plain queue, and going to more keeps it consumed), else `<queue>.<shard>`. The one place the
/// naming rule lives; the operator and KEDA's trigger rely on it.
pub fn shard_queue(queue: &str, shard: u16) -> String {
    match shard {
        0 => queue.to_owned(),
        n => format!("{queue}.{n}"),
    }
}

/// A regular expression (as RabbitMQ's management API reads one) matching the names of
/// `queue`'s shards past shard 0, `<queue>.<n>`, and nothing else.
pub fn shard_queue_pattern(queue: &str) -> String {
    format!(r"{CASE_SENSITIVE}^{}\.[1-9][0-9]*$", literal(queue))
}

/// A regular expression (as RabbitMQ's management API, and so KEDA's RabbitMQ scaler, reads
/// one) matching exactly the names in `names`.
pub fn exact_names_pattern<S: AsRef<str>>(names: &[S]) -> String {
    let names: Vec<String> = names.iter().map(|n| literal(n.as_ref())).collect();
    format!("{CASE_SENSITIVE}^({})$", names.join("|"))
}

/// RabbitMQ's management API matches a `name` regex caselessly, but queue names are
/// case-sensitive: without this, `Product_Events` would count as `product_events`.
const CASE_SENSITIVE: &str = "(?-i)";

/// `name` as a pattern matching itself: a backslash before each character that means
/// something outside a class (the same set in PCRE, which RabbitMQ uses, and Rust's regex).
fn literal(name: &str) -> String {
    let mut pattern = String::with_capacity(name.len() + 8);
    for c in name.chars() {
        if r"\.+*?()|[]{}^$".contains(c) {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern
}

/// The shard number of `name` when it names a shard of `queue` past shard 0 (the inverse of
/// [`shard_queue`] there).
pub fn shard_number(queue: &str, name: &str) -> Option<u16> {
    let digits = name.strip_prefix(queue)?.strip_prefix('.')?;
    if digits.starts_with('0') || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().filter(|&n| n > 0)
}

/// The `shards` queues of `queue`, shard 0 first.
pub fn shard_queues(queue: &str, shards: u16) -> Vec<String> {
    (0..shards.max(1)).map(|i| shard_queue(queue, i)).collect()
}

/// The shard of `count` that an event with dedup key bytes `key` goes to. It reads the key's
/// second half (Redis buckets read the first), so one shard's keys still spread over every
/// Redis bucket.
pub fn shard_of(key: &[u8; 16], count: u16) -> u16 {
    let tail = u64::from_le_bytes(key[8..].try_into().unwrap_or_default());
    // The remainder is below `count`, a u16.
    (tail % u64::from(count.max(1))) as u16
}

impl Topology {
    /// The dead-letter exchange: as configured, else the queue's name + `.dlx`. The one place
    /// the naming rule lives; the operator and the chart rely on it.
    pub fn dead_letter_exchange(&self) -> String {
        self.dead_letter_exchange_name
            .clone()
            .unwrap_or_else(|| format!("{}.dlx", self.queue))
    }

    /// The dead-letter queue: as configured, else the queue's name + `.dlq`.
    pub fn dead_letter_queue(&self) -> String {
        self.dead_letter_queue_name
            .clone()
            .unwrap_or_else(|| format!("{}.dlq", self.queue))
    }

    /// The queue of shard `shard` ([`shard_queue`]).
    pub fn shard_queue(&self, shard: u16) -> String {
        shard_queue(&self.queue, shard)
    }

    /// Every queue the workers consume, shard 0 first.
    pub fn queues(&self) -> Vec<String> {
        shard_queues(&self.queue, self.shards)
    }

    /// Every queue of the topology: the ones the workers consume, then the dead-letter queue.
    pub fn all_queues(&self) -> Vec<String> {
        let mut queues = self.queues();
        queues.push(self.dead_letter_queue());
        queues
    }

    /// Routing key of the main queue (shard 0).
    pub fn routing_key(&self) -> ShortString {
        self.shard_routing_key(0)
    }

    /// Routing key of shard `shard`'s queue: its name.
    pub fn shard_routing_key(&self, shard: u16) -> ShortString {
        ShortString::from(self.shard_queue(shard))
    }

    /// Routing key of the dead-letter queue.
    pub fn dead_letter_routing_key(&self) -> ShortString {
        ShortString::from(self.dead_letter_queue().as_str())
    }

    /// Declares both exchanges and queues and their bindings; idempotent.
    ///
    /// Fails with the broker's `PRECONDITION_FAILED` when a queue already exists with other
    /// arguments (for example classic versus quorum): see [`describe_declare_error`].
    pub async fn declare(&self, channel: &Channel) -> lapin::Result<()> {
        self.declare_exchanges_and_dead_letters(channel).await?;
        for queue in self.queues() {
            self.declare_queue(channel, &queue).await?;
        }
        Ok(())
    }

    /// Declares what a consumer of `queue` (one of [`Topology::queues`]) needs: both exchanges,
    /// the dead-letter queue and `queue` itself with its binding. A consumer declares only its
    /// own queue so that another shard's queue being wrong or missing cannot stop it.
    pub async fn declare_consumed(&self, channel: &Channel, queue: &str) -> lapin::Result<()> {
        self.declare_exchanges_and_dead_letters(channel).await?;
        self.declare_queue(channel, queue).await
    }

    async fn declare_exchanges_and_dead_letters(&self, channel: &Channel) -> lapin::Result<()> {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        for exchange in [&self.exchange, &self.dead_letter_exchange()] {
            channel
                .exchange_declare(
                    exchange.as_str().into(),
                    ExchangeKind::Direct,
                    durable,
                    FieldTable::default(),
                )
                .await?;
        }
        let mut dlq_args = FieldTable::default();
        dlq_args.insert("x-queue-type".into(), self.queue_type_value());
        channel
            .queue_declare(
                self.dead_letter_queue().as_str().into(),
                QueueDeclareOptions::durable(),
                dlq_args,
            )
            .await?;
        channel
            .queue_bind(
                self.dead_letter_queue().as_str().into(),
                self.dead_letter_exchange().as_str().into(),
                self.dead_letter_routing_key(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(())
    }

    /// Declares one consumed queue, bound to the exchange under its own name.
    async fn declare_queue(&self, channel: &Channel, queue: &str) -> lapin::Result<()> {
        channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions::durable(),
                self.queue_arguments(),
            )
            .await?;
        channel
            .queue_bind(
                queue.into(),
                self.exchange.as_str().into(),
                queue.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(())
    }

    fn queue_type_value(&self) -> AMQPValue {
        let name = match self.queue_type {
            QueueType::Quorum => "quorum",
            QueueType::Classic => "classic",
        };
        AMQPValue::LongString(name.into())
    }

    fn queue_arguments(&self) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), self.queue_type_value());
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(self.dead_letter_exchange().as_str().into()),
        );
        args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(self.dead_letter_queue().as_str().into()),
        );
        if self.queue_type == QueueType::Quorum {
            args.insert(
                "x-delivery-limit".into(),
                AMQPValue::LongLongInt(i64::from(self.delivery_limit)),
            );
        }
        args
    }

    /// A topology whose every name starts with `prefix`: what tests use to isolate themselves.
    pub fn prefixed(prefix: &str) -> Self {
        Self {
            exchange: format!("{prefix}.events"),
            queue: format!("{prefix}.events"),
            dead_letter_exchange_name: None,
            dead_letter_queue_name: None,
            queue_type: QueueType::Quorum,
            delivery_limit: 20,
            shards: 1,
        }
    }
}

/// Turns a declare failure into advice an operator can act on.
pub fn describe_declare_error(topology: &Topology, error: &lapin::Error) -> String {
    let text = error.to_string();
    if text.contains("PRECONDITION_FAILED") || text.contains("inequivalent arg") {
        format!(
            "queue {:?} (or a shard of it) or {:?} already exists with different arguments \
             ({text}); make AMQP_QUEUE_TYPE / AMQP_DELIVERY_LIMIT match it, or delete the queue",
            topology.queue,
            topology.dead_letter_queue()
        )
    } else {
        format!("could not declare the AMQP topology: {text}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_names_are_recognised_and_nothing_else() {
        for (name, shard) in [
            ("t.events.1", Some(1)),
            ("t.events.1023", Some(1023)),
            ("t.events", None),
            ("t.events.0", None),
            ("t.events.01", None),
            ("t.events.dlq", None),
            ("t.events.1.dlq", None),
            ("t.eventsx.1", None),
            ("t.events.99999", None),
        ] {
            assert_eq!(shard_number("t.events", name), shard, "{name}");
        }
        for n in [1, 7, 1024] {
            assert_eq!(
                shard_number("t.events", &shard_queue("t.events", n)),
                Some(n)
            );
        }
        // The name's own dots and other signs are literal in the pattern.
        assert_eq!(
            shard_queue_pattern("t.ev+ents"),
            r"(?-i)^t\.ev\+ents\.[1-9][0-9]*$"
        );
        assert_eq!(
            exact_names_pattern(&["t.ev+ents", "t.ev+ents.1"]),
            r"(?-i)^(t\.ev\+ents|t\.ev\+ents\.1)$"
        );
    }

    #[test]
    fn shard_zero_keeps_the_queue_name_and_the_others_are_numbered() {
        let mut topology = Topology::prefixed("t");
        assert_eq!(topology.queues(), vec!["t.events"]);
        assert_eq!(topology.all_queues(), vec!["t.events", "t.events.dlq"]);
        topology.shards = 3;
        assert_eq!(
            topology.queues(),
            vec!["t.events", "t.events.1", "t.events.2"]
        );
        assert_eq!(topology.shard_routing_key(2).as_str(), "t.events.2");
        // Dead letters of every shard go to the one dead-letter queue named after the queue.
        assert_eq!(topology.dead_letter_queue(), "t.events.dlq");
    }

    #[test]
    fn shards_spread_keys_and_one_shard_takes_everything() {
        let mut seen = [0u32; 4];
        for i in 0u32..4000 {
            let key = *blake3::hash(&i.to_le_bytes()).as_bytes();
            let key: [u8; 16] = key[..16].try_into().expect("16 bytes");
            assert_eq!(shard_of(&key, 1), 0);
            seen[usize::from(shard_of(&key, 4))] += 1;
        }
        // 1000 expected per shard; a hash this far off would be broken.
        assert!(seen.iter().all(|&n| (800..1200).contains(&n)), "{seen:?}");
    }
}
