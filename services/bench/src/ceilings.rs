//! The machine's own ceilings, measured with the servers' own clients on the pipeline's data:
//! RabbitMQ publish-with-confirms and consume-and-ack of one-event messages on the same queue
//! type, PostgreSQL inserts of the same rows with the worker's statement into tables
//! `dedup-worker migrate` made, and Redis' `MGET` + `SET` per batch.

use std::time::{Duration, Instant};

use chrono::Utc;
use dedup_message::message;
use dedup_message::topology::close_connection;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use hdrhistogram::Histogram;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use serde::Serialize;
use sqlx::postgres::PgPoolOptions;

use crate::services::{Backends, Binaries, Isolation};
use crate::workload::Workload;

/// Measured ceilings, in events per second (one event per message for RabbitMQ).
#[derive(Debug, Clone, Serialize)]
pub struct Ceilings {
    pub rabbitmq_publish_per_s: f64,
    pub rabbitmq_confirm_p50_ms: f64,
    pub rabbitmq_confirm_p99_ms: f64,
    pub rabbitmq_consume_ack_per_s: f64,
    pub postgres_insert_rows_per_s: f64,
    pub redis_events_per_s: f64,
    pub batch: usize,
}

impl Ceilings {
    /// Each figure's median over several rounds (the machine is noisy; one round of a second
    /// or two can land in a slow or a quiet moment). `None` for no rounds.
    pub fn median(rounds: &[Ceilings]) -> Option<Ceilings> {
        let first = rounds.first()?;
        let median = |f: fn(&Ceilings) -> f64| {
            let mut values: Vec<f64> = rounds.iter().map(f).collect();
            values.sort_by(f64::total_cmp);
            values[values.len() / 2]
        };
        Some(Ceilings {
            rabbitmq_publish_per_s: median(|c| c.rabbitmq_publish_per_s),
            rabbitmq_confirm_p50_ms: median(|c| c.rabbitmq_confirm_p50_ms),
            rabbitmq_confirm_p99_ms: median(|c| c.rabbitmq_confirm_p99_ms),
            rabbitmq_consume_ack_per_s: median(|c| c.rabbitmq_consume_ack_per_s),
            postgres_insert_rows_per_s: median(|c| c.postgres_insert_rows_per_s),
            redis_events_per_s: median(|c| c.redis_events_per_s),
            batch: first.batch,
        })
    }

    /// The lowest of the ceilings, and which one it is.
    pub fn lowest(&self) -> (&'static str, f64) {
        [
            ("RabbitMQ publish+confirm", self.rabbitmq_publish_per_s),
            ("RabbitMQ consume+ack", self.rabbitmq_consume_ack_per_s),
            ("PostgreSQL insert", self.postgres_insert_rows_per_s),
            ("Redis check+record", self.redis_events_per_s),
        ]
        .into_iter()
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap_or(("none", 0.0))
    }
}

/// Measures all ceilings with `events` events each, in an isolation of their own.
pub async fn measure(
    backends: &Backends,
    binaries: &Binaries,
    iso: &Isolation,
    events: usize,
    batch_size: usize,
) -> anyhow::Result<Ceilings> {
    let workload = Workload::new(&iso.name, 0.0, Duration::ZERO)?;
    let lines: Vec<Vec<u8>> = (0..events as u64)
        .map(|n| {
            let mut line = Vec::with_capacity(workload.event_size() + 1);
            workload.body(n, &mut line);
            line.push(b'\n');
            line
        })
        .collect();
    eprintln!(
        "ceilings: RabbitMQ ({events} persistent messages, {:?} queue, confirms)…",
        iso.topology.queue_type
    );
    let (publish, confirm_p50, confirm_p99, consume) = rabbitmq(backends, iso, &lines).await?;
    eprintln!("ceilings: PostgreSQL ({events} rows in batches of {batch_size})…");
    let postgres = postgres(backends, binaries, iso, &lines, batch_size).await?;
    eprintln!("ceilings: Redis ({events} keys in batches of {batch_size})…");
    let redis = redis(backends, iso, events, batch_size).await?;
    Ok(Ceilings {
        rabbitmq_publish_per_s: publish,
        rabbitmq_confirm_p50_ms: confirm_p50,
        rabbitmq_confirm_p99_ms: confirm_p99,
        rabbitmq_consume_ack_per_s: consume,
        postgres_insert_rows_per_s: postgres,
        redis_events_per_s: redis,
        batch: batch_size,
    })
}

/// Publishes every line as its own message (up to 512 unconfirmed), then consumes and acks.
async fn rabbitmq(
    backends: &Backends,
    iso: &Isolation,
    lines: &[Vec<u8>],
) -> anyhow::Result<(f64, f64, f64, f64)> {
    let conn =
        lapin::Connection::connect(&backends.rabbitmq, lapin::ConnectionProperties::default())
            .await?;
    let channel = conn.create_channel().await?;
    iso.topology.declare(&channel).await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut confirm_us = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let started = Instant::now();
    let mut in_flight = FuturesUnordered::new();
    for line in lines {
        if in_flight.len() >= 512
            && let Some(result) = in_flight.next().await
        {
            let (sent, confirm): (Instant, lapin::Result<lapin::Confirmation>) = result;
            confirm?;
            confirm_us.saturating_record(sent.elapsed().as_micros() as u64);
        }
        let sent = Instant::now();
        // As ingest sends a message of one event: lz4-compressed when that makes it smaller.
        let mut envelope = message::Envelope::new();
        envelope.push_line(line, Utc::now(), None, None);
        let (body, properties) = envelope.seal(message::Compression::Lz4);
        let confirm = channel
            .basic_publish(
                iso.topology.exchange.as_str().into(),
                iso.topology.routing_key(),
                BasicPublishOptions::default(),
                &body,
                properties,
            )
            .await?;
        in_flight.push(async move { (sent, confirm.await) });
    }
    while let Some((sent, confirm)) = in_flight.next().await {
        confirm?;
        confirm_us.saturating_record(sent.elapsed().as_micros() as u64);
    }
    let publish_rate = lines.len() as f64 / started.elapsed().as_secs_f64();

    let consume_rate = consume_and_ack(&conn, iso, lines.len()).await?;
    close_connection(&conn, 200, "ceiling measured").await;
    let ms = |q: f64| confirm_us.value_at_quantile(q) as f64 / 1000.0;
    Ok((publish_rate, ms(0.5), ms(0.99), consume_rate))
}

/// Consumes `count` messages from the isolation's queue with a prefetch of 1000, acking every
/// hundredth with a multiple-ack as the worker does; returns messages per second.
async fn consume_and_ack(
    conn: &lapin::Connection,
    iso: &Isolation,
    count: usize,
) -> anyhow::Result<f64> {
    let consumer_channel = conn.create_channel().await?;
    consumer_channel
        .basic_qos(1000, BasicQosOptions::default())
        .await?;
    let mut consumer = consumer_channel
        .basic_consume(
            iso.topology.queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let started = Instant::now();
    let mut received = 0usize;
    while received < count {
        let delivery = tokio::time::timeout(Duration::from_secs(30), consumer.next())
            .await
            .map_err(|_| anyhow::anyhow!("consuming stalled"))?
            .ok_or_else(|| anyhow::anyhow!("consumer closed"))??;
        received += 1;
        if received.is_multiple_of(100) || received == count {
            consumer_channel
                .basic_ack(delivery.delivery_tag, BasicAckOptions { multiple: true })
                .await?;
        }
    }
    Ok(count as f64 / started.elapsed().as_secs_f64())
}

/// The worker's insert, as SQL: one multi-row `INSERT … ON CONFLICT DO NOTHING` per batch.
const INSERT: &str = "
WITH inserted AS (
    INSERT INTO product_events
        (event_date, dedup_key, event_datetime, client_id, event_name, product_id, sid, r, payload, received_at, source)
    SELECT d, k, dt, c, en, p, s, r, pl::jsonb, ra, src
    FROM UNNEST($1::date[], $2::uuid[], $3::timestamptz[], $4::text[], $5::text[], $6::text[],
                $7::text[], $8::text[], $9::text[], $10::timestamptz[], $11::text[])
        AS t(d, k, dt, c, en, p, s, r, pl, ra, src)
    ON CONFLICT (event_date, dedup_key) DO NOTHING
    RETURNING 1
)
SELECT count(*) FROM inserted";

/// The source stored with each row, as a write key's would be.
const SOURCE: &str = "bench";

/// One row as the worker sends it: the key fields, a 128-bit key, the payload with its
/// members in `jsonb` order.
struct Row {
    date: chrono::NaiveDate,
    key: uuid::Uuid,
    at: chrono::DateTime<Utc>,
    fields: [String; 5],
    payload: String,
}

impl Row {
    fn of(n: usize, line: &[u8]) -> anyhow::Result<Self> {
        let value: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(line)?;
        let text = |name: &str| {
            value
                .get(name)
                .and_then(|v| v.as_str())
                .unwrap_or("")
                .to_owned()
        };
        let at: chrono::DateTime<Utc> = text("event_datetime").parse()?;
        // jsonb order: shorter names first, equal lengths bytewise.
        let mut members: Vec<(&String, &serde_json::Value)> = value.iter().collect();
        members.sort_by(|a, b| a.0.len().cmp(&b.0.len()).then_with(|| a.0.cmp(b.0)));
        let mut payload = String::from("{");
        for (i, (name, member)) in members.into_iter().enumerate() {
            if i > 0 {
                payload.push(',');
            }
            payload.push_str(&serde_json::to_string(name)?);
            payload.push(':');
            payload.push_str(&serde_json::to_string(member)?);
        }
        payload.push('}');
        Ok(Self {
            date: at.date_naive(),
            key: uuid::Uuid::from_u128(
                (n as u128).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835),
            ),
            at,
            fields: ["client_id", "event_name", "product_id", "sid", "r"].map(text),
            payload,
        })
    }
}

/// Inserts the rows with the worker's statement, one batch after another, into tables made by
/// `dedup-worker migrate`.
async fn postgres(
    backends: &Backends,
    binaries: &Binaries,
    iso: &Isolation,
    lines: &[Vec<u8>],
    batch_size: usize,
) -> anyhow::Result<f64> {
    crate::services::migrate(&binaries.worker, backends, iso).await?;
    let db = PgPoolOptions::new()
        .max_connections(1)
        .connect(&iso.database_url)
        .await?;
    let mut rows = lines
        .iter()
        .enumerate()
        .map(|(n, line)| Row::of(n, line))
        .collect::<anyhow::Result<Vec<Row>>>()?;
    let mut days: Vec<chrono::NaiveDate> = rows.iter().map(|r| r.date).collect();
    days.sort_unstable();
    days.dedup();
    sqlx::query("SELECT dedup_ensure_partitions($1)")
        .bind(days)
        .execute(&db)
        .await?;
    let received_at = Utc::now();
    let mut elapsed = Duration::ZERO;
    for chunk in rows.chunks_mut(batch_size.max(1)) {
        // The worker's lock order.
        chunk.sort_unstable_by_key(|r| (r.date, r.key));
        let column = |i: usize| {
            chunk
                .iter()
                .map(|r| r.fields[i].as_str())
                .collect::<Vec<_>>()
        };
        let started = Instant::now();
        let inserted: i64 = sqlx::query_scalar(INSERT)
            .bind(chunk.iter().map(|r| r.date).collect::<Vec<_>>())
            .bind(chunk.iter().map(|r| r.key).collect::<Vec<_>>())
            .bind(chunk.iter().map(|r| r.at).collect::<Vec<_>>())
            .bind(column(0))
            .bind(column(1))
            .bind(column(2))
            .bind(column(3))
            .bind(column(4))
            .bind(chunk.iter().map(|r| r.payload.as_str()).collect::<Vec<_>>())
            .bind(vec![received_at; chunk.len()])
            .bind(vec![SOURCE; chunk.len()])
            .fetch_one(&db)
            .await?;
        elapsed += started.elapsed();
        anyhow::ensure!(inserted as usize == chunk.len(), "rows were not all new");
    }
    db.close().await;
    Ok(lines.len() as f64 / elapsed.as_secs_f64())
}

/// Runs what the worker asks of Redis per batch, with Redis' own commands: one `MGET` of the
/// batch's recent keys, then one pipeline of `SET … PX` recording them.
async fn redis(
    backends: &Backends,
    iso: &Isolation,
    events: usize,
    batch_size: usize,
) -> anyhow::Result<f64> {
    let client = redis::Client::open(backends.redis.as_str())?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    // Keys shaped like the worker's: hash tag, day, 128-bit key in hex.
    let keys: Vec<String> = (0..events as u128)
        .map(|n| {
            let key = n.wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835);
            format!("{{{}}}:k:20260101:{key:032x}", iso.name)
        })
        .collect();
    let started = Instant::now();
    for chunk in keys.chunks(batch_size.max(1)) {
        let known: Vec<Option<u8>> = redis::cmd("MGET").arg(chunk).query_async(&mut conn).await?;
        anyhow::ensure!(known.len() == chunk.len(), "MGET answered the wrong count");
        let mut pipe = redis::pipe();
        for key in chunk {
            pipe.cmd("SET")
                .arg(key)
                .arg(1)
                .arg("PX")
                .arg(3_600_000)
                .ignore();
        }
        let () = pipe.query_async(&mut conn).await?;
    }
    Ok(keys.len() as f64 / started.elapsed().as_secs_f64())
}
