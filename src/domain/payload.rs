//! What an order's payload may be: a JSON object of at most [`MAX_PAYLOAD`] bytes, opaque to Orderly.

use serde_json::value::RawValue;

/// Largest order payload accepted, in bytes.
pub const MAX_PAYLOAD: usize = 64 * 1024;

/// Deepest nesting of arrays and objects a payload (the object itself counted) or a step's output may
/// have. The document puts them up to six levels deeper (an output in `history`), and serde_json
/// reads at most 127 levels into a JSON value: this leaves every reader of a document that parses it
/// into a value room to do so.
pub const MAX_DEPTH: usize = 120;

/// Checks a submitted payload: a JSON object of at most [`MAX_PAYLOAD`] bytes, nested at most
/// [`MAX_DEPTH`] deep.
pub fn validate_payload(body: &[u8]) -> Result<Box<RawValue>, String> {
    if body.len() > MAX_PAYLOAD {
        return Err(format!(
            "payload is {} bytes; the limit is {MAX_PAYLOAD}",
            body.len()
        ));
    }
    let raw: Box<RawValue> =
        serde_json::from_slice(body).map_err(|e| format!("payload is not valid JSON: {e}"))?;
    if !raw.get().starts_with('{') {
        return Err("payload must be a JSON object".into());
    }
    if depth(raw.get()) > MAX_DEPTH {
        return Err(format!(
            "payload is nested more than {MAX_DEPTH} arrays or objects deep"
        ));
    }
    Ok(raw)
}

/// The deepest nesting of arrays and objects in `json`, which is valid JSON.
pub fn depth(json: &str) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let (mut in_string, mut escaped) = (false, false);
    for byte in json.bytes() {
        match (in_string, escaped, byte) {
            (true, true, _) => escaped = false,
            (true, false, b'\\') => escaped = true,
            (true, false, b'"') => in_string = false,
            (true, false, _) => {}
            (false, _, b'"') => in_string = true,
            (false, _, b'[' | b'{') => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            (false, _, b']' | b'}') => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// The payload as the document shows it: the JSON object itself if it is one, else its first 256
/// bytes as a JSON string.
pub fn shown_payload(payload: &[u8]) -> Box<RawValue> {
    if let Ok(raw) = validate_payload(payload) {
        return raw;
    }
    let text = String::from_utf8_lossy(&payload[..payload.len().min(256)]);
    let quoted = serde_json::to_string(&text).expect("a string always serializes");
    RawValue::from_string(quoted).expect("a JSON string is valid JSON")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_may_not_be_nested_too_deep() {
        let nested = |n: usize| format!("{{\"a\":{}{}}}", "[".repeat(n - 1), "]".repeat(n - 1));
        assert!(validate_payload(nested(MAX_DEPTH).as_bytes()).is_ok());
        assert!(validate_payload(nested(MAX_DEPTH + 1).as_bytes())
            .unwrap_err()
            .contains("nested"));
        let brackets_in_strings =
            format!("{{\"a\":\"{}\\\"{}\"}}", "[".repeat(500), "{".repeat(500));
        assert!(validate_payload(brackets_in_strings.as_bytes()).is_ok());
    }

    #[test]
    fn payload_must_be_a_small_json_object() {
        assert!(validate_payload(br#"{"customer":"ada"}"#).is_ok());
        assert!(validate_payload(b" {} ").is_ok());
        assert!(validate_payload(b"[1,2]")
            .unwrap_err()
            .contains("JSON object"));
        assert!(validate_payload(b"\"x\"")
            .unwrap_err()
            .contains("JSON object"));
        assert!(validate_payload(b"{nope")
            .unwrap_err()
            .contains("not valid JSON"));
        let big = format!("{{\"x\":\"{}\"}}", "a".repeat(MAX_PAYLOAD));
        assert!(validate_payload(big.as_bytes())
            .unwrap_err()
            .contains("limit"));
    }
}
