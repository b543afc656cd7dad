//! Loading work messages into a stream, and reading how many are left.

use async_nats::jetstream;
use futures::StreamExt;
use uuid::Uuid;

/// Publishes `count` orders, `{prefix}.<uuidv7>` each with a small JSON payload, and waits for the
/// stream to confirm every one. Returns their ids.
pub async fn preload(
    js: &jetstream::Context,
    prefix: &str,
    count: usize,
) -> anyhow::Result<Vec<Uuid>> {
    let ids: Vec<Uuid> = (0..count).map(|_| Uuid::now_v7()).collect();
    let acks = futures::stream::iter(ids.iter().enumerate().map(|(n, id)| {
        let js = js.clone();
        let subject = format!("{prefix}.{id}");
        async move {
            let body = serde_json::json!({ "customer": "bench", "n": n }).to_string();
            js.publish(subject, body.into()).await?.await?;
            anyhow::Ok(())
        }
    }))
    .buffer_unordered(256)
    .collect::<Vec<_>>()
    .await;
    acks.into_iter().collect::<Result<Vec<()>, _>>()?;
    Ok(ids)
}

/// The messages in `stream` now (for a work queue: those not yet acknowledged).
pub async fn messages(js: &jetstream::Context, stream: &str) -> anyhow::Result<u64> {
    let info = js.get_stream_no_info(stream).await?.get_info().await?;
    Ok(info.state.messages)
}

/// The last sequence of `stream`: every message ever stored in it, for a fresh one.
pub async fn last_sequence(js: &jetstream::Context, stream: &str) -> anyhow::Result<u64> {
    let info = js.get_stream_no_info(stream).await?.get_info().await?;
    Ok(info.state.last_sequence)
}
