//! Wake-ups for the steps this node runs: a node that accepts a cancel for an order another node is
//! running sends the order's id on `orders.interrupt.<owner node>`. The owner checks the document
//! (a wake-up is a hint; anyone could send one) and, if it holds the cancel, interrupts the step so
//! the rollback starts now rather than when the step ends.

use crate::domain::order::{parse_order_id, State};
use crate::engine::interrupt::Interrupts;
use crate::queue::setup::interrupt_subject;
use crate::store::OrderStore;
use crate::task::Task;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

pub struct WakeListener {
    client: async_nats::Client,
    node_id: String,
    store: OrderStore,
    interrupts: Interrupts,
}

impl WakeListener {
    pub fn new(
        client: async_nats::Client,
        node_id: String,
        store: OrderStore,
        interrupts: Interrupts,
    ) -> WakeListener {
        WakeListener {
            client,
            node_id,
            store,
            interrupts,
        }
    }

    async fn wake(&self, payload: &[u8]) {
        let Ok(id) = std::str::from_utf8(payload).map(str::trim) else {
            return;
        };
        let Ok(order_id) = parse_order_id(id) else {
            tracing::debug!(payload = %id.chars().take(80).collect::<String>(), "interrupt for an unreadable order id; ignored");
            return;
        };
        if !self.interrupts.is_running(order_id) {
            return;
        }
        match self.store.get(order_id).await {
            Ok(Some(stored)) if stored.order.state == State::Cancelling => {
                self.interrupts.interrupt(order_id);
            }
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(order.id = %order_id, error = %e, "cannot read an order to interrupt; its owner sees the cancel at its next write")
            }
        }
    }
}

impl Task for WakeListener {
    const NAME: &'static str = "interrupt listener";

    async fn run(self, stop: CancellationToken) -> anyhow::Result<()> {
        let subject = interrupt_subject(&self.node_id);
        let mut wakes =
            self.client.subscribe(subject.clone()).await.map_err(|e| {
                anyhow::anyhow!(e).context(format!("cannot subscribe to {subject}"))
            })?;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                wake = wakes.next() => match wake {
                    Some(message) => self.wake(&message.payload).await,
                    None => return Ok(()),
                },
            }
        }
    }
}
