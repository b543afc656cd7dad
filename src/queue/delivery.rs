//! What one delivery of a work message says about itself, and what the stream says about a message.

use crate::store::StoreError;
use async_nats::jetstream::{self, stream::LastRawMessageErrorKind};
use uuid::Uuid;

/// One delivery of a work message.
#[derive(Debug, Clone, Copy)]
pub struct Delivery {
    pub order_id: Uuid,
    /// 1 on the first delivery.
    pub delivered: u32,
    pub stream_seq: u64,
    /// When the stream stored the message.
    pub published: chrono::DateTime<chrono::Utc>,
}

/// Whether the stream still holds the message with sequence `seq`.
pub async fn message_exists(
    stream: &jetstream::stream::Stream,
    seq: u64,
) -> Result<bool, StoreError> {
    match stream.get_raw_message(seq).await {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(false),
        Err(e) => Err(StoreError::unavailable(
            format!("cannot look up message {seq}"),
            e,
        )),
    }
}
