//! Listing orders, shared by `GET /orders` and `orders.list`: the request (states, a limit, a cursor)
//! read from a query string or a JSON body, checked the same way for both, and the page as both
//! answer it, `{"orders": [...], "next_cursor": ...}`, newest state change first.

use crate::api::intake::{bounded_read, Intake, IntakeError};
use crate::domain::order::{CurrentStep, State};
use crate::store::Page;
use base64::Engine;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Orders on a page unless the request says otherwise.
pub const DEFAULT_LIMIT: usize = 50;
/// The most orders one page holds.
pub const MAX_LIMIT: usize = 500;

/// A checked listing request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListRequest {
    /// The states to list; every state when empty.
    pub states: Vec<State>,
    pub limit: usize,
    /// The index sequence to continue below, from the previous page's `next_cursor`.
    pub below: Option<u64>,
}

impl ListRequest {
    /// From the pairs of a query string: `state` (repeated, or names separated by commas), `limit`,
    /// `cursor`.
    pub fn from_pairs(pairs: &[(String, String)]) -> Result<ListRequest, IntakeError> {
        let mut states = Vec::new();
        let mut limit = None;
        let mut cursor = None;
        for (key, value) in pairs {
            match key.as_str() {
                "state" => states.push(value.clone()),
                "limit" => limit = Some(value.clone()),
                "cursor" => cursor = Some(value.clone()),
                other => {
                    return Err(bad(format!(
                        "unknown parameter {other:?} (expected state, limit, cursor)"
                    )))
                }
            }
        }
        let limit = match limit {
            Some(text) => Some(
                text.trim()
                    .parse::<i64>()
                    .map_err(|_| bad(format!("limit: {text:?} is not a whole number")))?,
            ),
            None => None,
        };
        ListRequest::checked(&states, limit, cursor.as_deref())
    }

    /// From the body of `orders.list`: empty, or `{"state": [...] | "A,B", "limit": n, "cursor": "..."}`.
    pub fn from_json(body: &[u8]) -> Result<ListRequest, IntakeError> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum States {
            One(String),
            Many(Vec<String>),
        }
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Body {
            state: Option<States>,
            limit: Option<i64>,
            cursor: Option<String>,
        }
        if body.iter().all(u8::is_ascii_whitespace) {
            return ListRequest::checked(&[], None, None);
        }
        let body: Body = serde_json::from_slice(body).map_err(|e| {
            bad(format!(
                "expected {{\"state\": [...], \"limit\": n, \"cursor\": \"...\"}}: {e}"
            ))
        })?;
        let states = match body.state {
            None => Vec::new(),
            Some(States::One(names)) => vec![names],
            Some(States::Many(names)) => names,
        };
        ListRequest::checked(&states, body.limit, body.cursor.as_deref())
    }

    fn checked(
        states: &[String],
        limit: Option<i64>,
        cursor: Option<&str>,
    ) -> Result<ListRequest, IntakeError> {
        let mut parsed = Vec::new();
        for name in states.iter().flat_map(|s| s.split(',')) {
            let name = name.trim();
            if name.is_empty() {
                continue;
            }
            let state = parse_state(name)?;
            if !parsed.contains(&state) {
                parsed.push(state);
            }
        }
        let limit = match limit {
            None => DEFAULT_LIMIT,
            Some(n) if (1..=MAX_LIMIT as i64).contains(&n) => n as usize,
            Some(n) => return Err(bad(format!("limit must be 1 to {MAX_LIMIT}, not {n}"))),
        };
        let below = cursor
            .filter(|c| !c.is_empty())
            .map(decode_cursor)
            .transpose()?;
        Ok(ListRequest {
            states: parsed,
            limit,
            below,
        })
    }
}

/// A state by the name documents give it; an unknown one is refused with the names there are.
fn parse_state(name: &str) -> Result<State, IntakeError> {
    serde_json::from_value(serde_json::Value::String(name.to_owned()))
        .map_err(|e| bad(format!("state {name:?}: {e}")))
}

fn bad(message: String) -> IntakeError {
    IntakeError::BadRequest(message)
}

/// What a cursor holds: the index sequence the next page continues below.
#[derive(Serialize, Deserialize)]
struct Cursor {
    below: u64,
}

fn encode_cursor(below: u64) -> String {
    let json = serde_json::to_vec(&Cursor { below }).unwrap_or_default();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
}

fn decode_cursor(text: &str) -> Result<u64, IntakeError> {
    let refused = || bad(format!("cursor {text:?} is not one a listing gave"));
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text.trim())
        .map_err(|_| refused())?;
    let cursor: Cursor = serde_json::from_slice(&json).map_err(|_| refused())?;
    Ok(cursor.below)
}

/// One order on a page.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[schema(as = ListedOrder)]
pub struct Item {
    pub order_id: Uuid,
    pub state: State,
    pub current_step: CurrentStep,
    pub start_time: DateTime<Utc>,
    pub complete_time: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
}

/// The answer to a listing.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Listing {
    pub orders: Vec<Item>,
    pub next_cursor: Option<String>,
}

impl From<Page> for Listing {
    fn from(page: Page) -> Listing {
        let next_cursor = page.next.map(encode_cursor);
        let orders = page
            .orders
            .into_iter()
            .map(|listed| Item {
                order_id: listed.order.order_id,
                state: listed.order.state,
                current_step: listed.order.current_step,
                start_time: listed.order.start_time,
                complete_time: listed.order.complete_time,
                updated_at: listed.order.updated_at,
            })
            .collect();
        Listing {
            orders,
            next_cursor,
        }
    }
}

/// The page `request` asks for, read within the bound every read has.
pub async fn list(intake: &Intake, request: &ListRequest) -> Result<Listing, IntakeError> {
    let store = intake.store();
    let read = store.list(&request.states, request.below, request.limit);
    Ok(bounded_read(&intake.client(), read).await?.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn states_come_repeated_or_separated_by_commas() {
        let request = ListRequest::from_pairs(&pairs(&[
            ("state", "Completed,Failed"),
            ("state", "Failed"),
        ]))
        .unwrap();
        assert_eq!(request.states, [State::Completed, State::Failed]);
        assert_eq!(request.limit, DEFAULT_LIMIT);
        let json = ListRequest::from_json(br#"{"state":["Queued","Running"],"limit":2}"#).unwrap();
        assert_eq!(json.states, [State::Queued, State::Running]);
        assert_eq!(json.limit, 2);
        assert_eq!(ListRequest::from_json(b"").unwrap().states, []);
    }

    #[test]
    fn bad_requests_are_refused_with_what_is_allowed() {
        let e = ListRequest::from_pairs(&pairs(&[("state", "Done")])).unwrap_err();
        assert_eq!(e.status(), 400);
        assert!(e.to_string().contains("Completed"), "{e}");
        for limit in ["0", "501", "ten"] {
            let e = ListRequest::from_pairs(&pairs(&[("limit", limit)])).unwrap_err();
            assert_eq!(e.status(), 400, "{limit}");
        }
        let e = ListRequest::from_pairs(&pairs(&[("cursor", "not-a-cursor")])).unwrap_err();
        assert_eq!(e.status(), 400);
        assert!(ListRequest::from_json(br#"{"limit":0}"#).is_err());
        assert!(ListRequest::from_json(br#"{"states":["Failed"]}"#).is_err());
    }

    #[test]
    fn a_cursor_reads_back_as_the_sequence_it_holds() {
        let text = encode_cursor(12345);
        let request = ListRequest::from_pairs(&pairs(&[("cursor", &text)])).unwrap();
        assert_eq!(request.below, Some(12345));
    }
}
