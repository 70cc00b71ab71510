//! [`TestEnv`]: one test's private slice of the real services — a PostgreSQL schema, a Redis
//! key prefix and its own exchanges and queues — removed when the value is dropped, even
//! after a panic. A service that is not running is a loud failure that says how to start it.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use dedup_message::topology::{Topology, close_channel, close_connection};
use lapin::options::{
    BasicGetOptions, ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

/// PostgreSQL of this machine (trust auth, database `test`).
pub const POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
/// Redis of this machine.
pub const REDIS_URL: &str = "redis://127.0.0.1:6379";
/// RabbitMQ of this machine.
pub const RABBITMQ_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// RabbitMQ's management API on this machine.
pub const RABBITMQ_MANAGEMENT_URL: &str = "http://guest:guest@127.0.0.1:15672";
/// How to start the services when they are down.
const START_HINT: &str = "start the local services with scripts/ensure-services.sh";
/// How long one of the helpers' exchanges with a service may take before the test fails
/// naming it: a service that stops answering must not hang the test run.
pub const STEP_WAIT: Duration = Duration::from_secs(30);

/// `step`, failing the test when it takes longer than [`STEP_WAIT`].
pub async fn bounded<T>(what: &str, step: impl Future<Output = T>) -> T {
    within(STEP_WAIT, what, step).await
}

/// `step`, failing the test when it takes longer than `limit`.
async fn within<T>(limit: Duration, what: &str, step: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, step)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {limit:?}: a service hangs"))
}

/// One test's isolated names on the shared services.
pub struct TestEnv {
    /// Unique across concurrent tests and test processes.
    pub name: String,
    /// PostgreSQL URL whose search_path is this test's schema.
    pub database_url: String,
    pub redis_prefix: String,
    pub topology: Topology,
    /// Connected to this test's schema.
    pub pg: PgPool,
    pub amqp: Connection,
}

impl TestEnv {
    /// Creates the schema and checks every service answers.
    pub async fn new(test: &str) -> Self {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "t_{}_{}_{}",
            test.chars()
                .filter(char::is_ascii_alphanumeric)
                .take(24)
                .collect::<String>()
                .to_ascii_lowercase(),
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(5))
            .connect(POSTGRES_URL)
            .await
            .unwrap_or_else(|e| {
                panic!("PostgreSQL is not reachable at {POSTGRES_URL}: {e}; {START_HINT}")
            });
        bounded(
            "CREATE SCHEMA",
            sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {name}"))).execute(&admin),
        )
        .await
        .expect("create the test schema");
        admin.close().await;
        let database_url = format!("{POSTGRES_URL}?options[search_path]={name}");
        let pg = PgPoolOptions::new()
            .max_connections(2)
            .connect(&database_url)
            .await
            .expect("connect to the test schema");

        let client = redis::Client::open(REDIS_URL).expect("Redis URL");
        let mut conn = tokio::time::timeout(
            Duration::from_secs(5),
            client.get_multiplexed_async_connection(),
        )
        .await
        .unwrap_or_else(|_| panic!("Redis at {REDIS_URL} did not answer within 5s; {START_HINT}"))
        .unwrap_or_else(|e| panic!("Redis is not reachable at {REDIS_URL}: {e}; {START_HINT}"));
        let pong: String = bounded("Redis PING", redis::cmd("PING").query_async(&mut conn))
            .await
            .expect("Redis PING");
        assert_eq!(pong, "PONG");

        let amqp = tokio::time::timeout(
            Duration::from_secs(10),
            Connection::connect(RABBITMQ_URL, ConnectionProperties::default()),
        )
        .await
        .unwrap_or_else(|_| {
            panic!("RabbitMQ at {RABBITMQ_URL} did not answer within 10s; {START_HINT}")
        })
        .unwrap_or_else(|e| {
            panic!("RabbitMQ is not reachable at {RABBITMQ_URL}: {e}; {START_HINT}")
        });

        let env = Self {
            redis_prefix: name.clone(),
            topology: Topology::prefixed(&name),
            name,
            database_url,
            pg,
            amqp,
        };
        env.declare().await;
        env
    }

    /// Rows in this test's `product_events`.
    pub async fn stored_rows(&self) -> i64 {
        bounded(
            "counting the stored rows",
            sqlx::query_scalar("SELECT count(*) FROM product_events").fetch_one(&self.pg),
        )
        .await
        .unwrap_or(-1)
    }

    /// The `r` of every stored row with how often it is stored, most copies first.
    pub async fn stored_r_counts(&self) -> Vec<(String, i64)> {
        bounded(
            "reading the stored rows",
            sqlx::query_as(
                "SELECT r, count(*) FROM product_events GROUP BY r ORDER BY count(*) DESC, r",
            )
            .fetch_all(&self.pg),
        )
        .await
        .expect("read stored rows")
    }

    /// Messages ready in `queue` (0 when the queue does not exist yet).
    pub async fn ready_messages(&self, queue: &str) -> u32 {
        bounded(&format!("reading the depth of {queue}"), async {
            let channel = self.amqp.create_channel().await.expect("channel");
            let result = channel
                .queue_declare(
                    queue.into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await;
            let count = result.map(|q| q.message_count()).unwrap_or(0);
            close_channel(&channel, 200, "done").await;
            count
        })
        .await
    }

    /// Publishes each event as its own message, the way ingest does for single requests.
    pub async fn publish_each(&self, events: &[serde_json::Value]) {
        for e in events {
            self.publish_raw(
                &crate::events::ndjson(std::slice::from_ref(e)),
                dedup_message::message::Envelope::properties(chrono::Utc::now(), 1),
            )
            .await;
        }
    }

    /// Waits (up to `within`) until the test schema holds `rows` rows and no queue (of any
    /// shard) has a ready message.
    pub async fn settle(&self, rows: i64, within: Duration) {
        crate::eventually(
            within,
            &format!("{rows} stored rows and empty queues"),
            || async {
                if self.stored_rows().await != rows {
                    return None;
                }
                for queue in self.topology.queues() {
                    if self.ready_messages(&queue).await != 0 {
                        return None;
                    }
                }
                Some(())
            },
        )
        .await;
    }

    /// Ready and unacknowledged messages of `queue` from the management API (which refreshes
    /// its numbers every few seconds: poll it).
    pub async fn queue_depth(&self, queue: &str) -> dedup_runtime::queue_depth::QueueDepth {
        let reader = dedup_runtime::queue_depth::DepthReader::new(
            RABBITMQ_MANAGEMENT_URL,
            Duration::from_secs(5),
        )
        .expect("management URL");
        reader
            .read("/", queue)
            .await
            .unwrap_or_else(|e| panic!("RabbitMQ's management API: {e}; {START_HINT}"))
    }

    /// Takes every message from `queue`, acking them; returns bodies (decompressed as the
    /// worker would) and headers.
    pub async fn drain(&self, queue: &str) -> Vec<(Vec<u8>, Option<FieldTable>)> {
        self.drain_raw(queue)
            .await
            .into_iter()
            .map(|(data, properties)| {
                let body = dedup_message::message::Envelope::open(&data, &properties)
                    .unwrap_or_else(|e| panic!("a message on {queue} cannot be decoded: {e}"))
                    .into_owned();
                (body, properties.headers().clone())
            })
            .collect()
    }

    /// Takes every message from `queue`, acking them; returns bodies and properties as sent.
    pub async fn drain_raw(&self, queue: &str) -> Vec<(Vec<u8>, lapin::BasicProperties)> {
        bounded(&format!("draining {queue}"), async {
            let channel = self.amqp.create_channel().await.expect("channel");
            let mut out = Vec::new();
            while let Ok(Some(message)) = channel
                .basic_get(queue.into(), BasicGetOptions { no_ack: true })
                .await
            {
                out.push((
                    message.delivery.data.clone(),
                    message.delivery.properties.clone(),
                ));
            }
            close_channel(&channel, 200, "done").await;
            out
        })
        .await
    }

    /// Declares this test's topology (as ingest and the worker do).
    pub async fn declare(&self) {
        bounded("declaring the test topology", async {
            let channel = self.amqp.create_channel().await.expect("channel");
            self.topology
                .declare(&channel)
                .await
                .expect("declare the test topology");
            close_channel(&channel, 200, "done").await;
        })
        .await;
    }

    /// Publishes a raw body to the test's exchange with publisher confirms, as ingest would.
    pub async fn publish_raw(&self, body: &[u8], properties: lapin::BasicProperties) {
        self.publish_raw_to(0, body, properties).await;
    }

    /// [`TestEnv::publish_raw`] to the queue of shard `shard`.
    pub async fn publish_raw_to(
        &self,
        shard: u16,
        body: &[u8],
        properties: lapin::BasicProperties,
    ) {
        bounded("publishing a test message with confirms", async {
            let channel = self.amqp.create_channel().await.expect("channel");
            channel
                .confirm_select(Default::default())
                .await
                .expect("confirm mode");
            let confirm = channel
                .basic_publish(
                    self.topology.exchange.as_str().into(),
                    self.topology.shard_routing_key(shard),
                    Default::default(),
                    body,
                    properties,
                )
                .await
                .expect("publish")
                .await
                .expect("confirm");
            assert!(confirm.is_ack(), "the broker refused a test message");
            close_channel(&channel, 200, "done").await;
        })
        .await;
    }

    /// Redis keys under this test's prefix.
    pub async fn redis_keys(&self) -> Vec<String> {
        bounded("listing the test's Redis keys", async {
            let mut conn = redis_connection().await;
            scan_keys(&mut conn, &format!("{{{}}}:*", self.redis_prefix))
                .await
                .expect("SCAN")
        })
        .await
    }

    /// Deletes every Redis key under this test's prefix (a targeted "FLUSHALL").
    pub async fn flush_redis(&self) {
        let keys = self.redis_keys().await;
        if keys.is_empty() {
            return;
        }
        bounded("deleting the test's Redis keys", async {
            let mut conn = redis_connection().await;
            let _: () = redis::cmd("DEL")
                .arg(keys)
                .query_async(&mut conn)
                .await
                .expect("DEL");
        })
        .await;
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        let name = self.name.clone();
        let prefix = self.redis_prefix.clone();
        let topology = self.topology.clone();
        // Clean up on a thread of its own: Drop cannot await, and may run during a panic.
        let cleaner = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(cleanup(&name, &prefix, &topology));
        });
        let _ = cleaner.join();
    }
}

async fn cleanup(schema: &str, prefix: &str, topology: &Topology) {
    // Bounded: a cleanup that cannot finish leaves leftovers and says so, never hangs a test.
    if tokio::time::timeout(
        Duration::from_secs(30),
        cleanup_unbounded(schema, prefix, topology),
    )
    .await
    .is_err()
    {
        eprintln!("cleanup of test {schema} did not finish within 30 s; leftovers may remain");
    }
}

async fn cleanup_unbounded(schema: &str, prefix: &str, topology: &Topology) {
    if let Ok(pool) = PgPoolOptions::new()
        .max_connections(1)
        .connect(POSTGRES_URL)
        .await
    {
        // A session of the code under test that still holds a lock in the schema (a worker
        // killed mid-transaction) would block DROP SCHEMA: end those sessions first.
        let _ = sqlx::query(
            "SELECT pg_terminate_backend(l.pid) FROM pg_locks l
             JOIN pg_class c ON c.oid = l.relation JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = $1 AND l.pid <> pg_backend_pid()",
        )
        .bind(schema)
        .execute(&pool)
        .await;
        let _ = sqlx::query("SET lock_timeout = '10s'").execute(&pool).await;
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP SCHEMA IF EXISTS {schema} CASCADE"
        )))
        .execute(&pool)
        .await;
        pool.close().await;
    }
    if let Ok(client) = redis::Client::open(REDIS_URL)
        && let Ok(mut conn) = client.get_multiplexed_async_connection().await
    {
        let keys = scan_keys(&mut conn, &format!("{{{prefix}}}:*"))
            .await
            .unwrap_or_default();
        if !keys.is_empty() {
            let _: Result<(), _> = redis::cmd("DEL").arg(keys).query_async(&mut conn).await;
        }
    }
    if let Ok(conn) = Connection::connect(RABBITMQ_URL, ConnectionProperties::default()).await {
        if let Ok(channel) = conn.create_channel().await {
            for queue in &topology.all_queues() {
                let _ = channel
                    .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                    .await;
            }
            for exchange in [&topology.exchange, &topology.dead_letter_exchange()] {
                let _ = channel
                    .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                    .await;
            }
        }
        close_connection(&conn, 200, "test cleanup").await;
    }
}

/// A connection to this machine's Redis.
async fn redis_connection() -> redis::aio::MultiplexedConnection {
    redis::Client::open(REDIS_URL)
        .expect("Redis URL")
        .get_multiplexed_async_connection()
        .await
        .unwrap_or_else(|e| panic!("Redis is not reachable at {REDIS_URL}: {e}; {START_HINT}"))
}

/// Every key matching `pattern`, with SCAN: unlike KEYS it never blocks Redis, however many
/// keys other tests or benchmarks hold.
pub async fn scan_keys(
    conn: &mut redis::aio::MultiplexedConnection,
    pattern: &str,
) -> redis::RedisResult<Vec<String>> {
    let mut cursor: u64 = 0;
    let mut keys = Vec::new();
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(5000)
            .query_async(conn)
            .await?;
        keys.extend(batch);
        if next == 0 {
            return Ok(keys);
        }
        cursor = next;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[tokio::test]
    #[should_panic(expected = "a hung step did not finish within 100ms")]
    async fn a_step_that_never_finishes_fails_the_test_naming_it() {
        super::within(
            Duration::from_millis(100),
            "a hung step",
            std::future::pending::<()>(),
        )
        .await;
    }

    #[tokio::test]
    async fn a_step_within_its_limit_gives_its_value() {
        let value = super::within(Duration::from_secs(5), "a quick step", async { 7 }).await;
        assert_eq!(value, 7);
    }
}
