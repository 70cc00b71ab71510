//! Step 1's other half: events the pipeline cannot accept go to the dead-letter queue, each
//! alone with the reason in a header, confirmed by the broker before the batch is acked. They
//! are never dropped silently and never block the events behind them.

use dedup_message::message::dead_letter_properties;
use dedup_message::topology::Topology;
use lapin::options::BasicPublishOptions;
use lapin::{Channel, Confirmation};

use crate::batch::DeadLetter;
use crate::error::{Error, Result};

/// Publishes every letter to the dead-letter exchange and waits for all confirms.
pub async fn publish(channel: &Channel, topology: &Topology, letters: &[DeadLetter]) -> Result<()> {
    let mut confirms = Vec::with_capacity(letters.len());
    for letter in letters {
        let properties =
            dead_letter_properties(&format!("{}: {}", letter.reason.label(), letter.detail));
        let confirm = channel
            .basic_publish(
                topology.dead_letter_exchange().as_str().into(),
                topology.dead_letter_routing_key(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &letter.body,
                properties,
            )
            .await?;
        confirms.push(confirm);
    }
    for confirm in confirms {
        match confirm.await? {
            Confirmation::Ack(None) | Confirmation::NotRequested => {}
            Confirmation::Ack(Some(_)) => {
                return Err(Error::DeadLetter(format!(
                    "queue {:?} is not bound to exchange {:?}",
                    topology.dead_letter_queue(),
                    topology.dead_letter_exchange()
                )));
            }
            Confirmation::Nack(_) => {
                return Err(Error::DeadLetter("negative acknowledgement".into()));
            }
        }
    }
    Ok(())
}
