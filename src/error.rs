//! The shape errors with a cause share: what was being done, then the cause, which stays reachable
//! through `source()` for whoever walks the chain.

/// Any error, as a cause.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// `context`, and the cause's own words after it when there is one.
pub fn with_cause(context: &str, source: Option<&(dyn std::error::Error + Send + Sync)>) -> String {
    match source {
        Some(source) if context.is_empty() => source.to_string(),
        Some(source) => format!("{context}: {source}"),
        None => context.to_owned(),
    }
}
