//! What an order's payload may be: a JSON object of at most [`MAX_PAYLOAD`] bytes, opaque to Orderly.

use serde_json::value::RawValue;

/// Largest order payload accepted, in bytes.
pub const MAX_PAYLOAD: usize = 64 * 1024;

/// Checks a submitted payload: a JSON object of at most [`MAX_PAYLOAD`] bytes.
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
    Ok(raw)
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
