//! The worker's errors say what to do with the batch in hand: retry it, or give up on the
//! session (the broker redelivers everything not acknowledged).

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A setting is unusable; the process cannot start.
    #[error("configuration error: {0}")]
    Config(String),
    /// PostgreSQL failed; the batch is retried in place with backoff.
    #[error("PostgreSQL error: {0}")]
    Postgres(#[source] sqlx::Error),
    #[error("migrations failed: {0}")]
    Migrate(String),
    /// The broker connection or channel failed; unacknowledged deliveries come back.
    #[error("RabbitMQ error: {0}")]
    Amqp(#[from] lapin::Error),
    /// Dead-lettering was refused by the broker; the batch is retried.
    #[error("the broker did not confirm a dead-lettered message: {0}")]
    DeadLetter(String),
    /// A fault injected by a test at the given stage: behaves like a crash.
    #[cfg(test)]
    #[error("injected crash at {0:?}")]
    InjectedCrash(crate::fault::Stage),
}

impl Error {
    /// Whether retrying the same batch on the same channel can succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Postgres(_) | Error::DeadLetter(_))
    }

    /// The metric label of the stage that failed.
    pub fn stage(&self) -> &'static str {
        match self {
            Error::Postgres(_) | Error::Migrate(_) => "postgres",
            Error::Amqp(_) | Error::DeadLetter(_) => "amqp",
            Error::Config(_) => "other",
            #[cfg(test)]
            Error::InjectedCrash(_) => "other",
        }
    }
}
