//! The one shape every background part of a node has: it runs until its token fires, and returning
//! early (with or without an error) ends the node, which then stops instead of limping on.

use std::future::Future;
use tokio_util::sync::CancellationToken;

pub trait Task: Send + 'static {
    /// Names the task in logs.
    const NAME: &'static str;

    /// Runs until `stop` fires, then finishes what it must (a drain, a goodbye) and returns.
    fn run(self, stop: CancellationToken) -> impl Future<Output = anyhow::Result<()>> + Send;
}
